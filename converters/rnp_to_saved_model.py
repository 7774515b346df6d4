"""Exports an RNP model (.keras) as a SavedModel for TF Serving.

    python converters/rnp_to_saved_model.py --input=rnp.keras \
        --output=serving/rnp --version=1

writes serving/rnp/1/ with the signatures serving_default (images) and
serving_budget (images, budget).
"""

import os

import common
from absl import app
from absl import flags

import keras_rnp

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "The RNP model (.keras).")
flags.DEFINE_string("output", None, "The model's base directory.")
flags.DEFINE_integer("version", 1, "The version subdirectory.")
flags.DEFINE_bool("overwrite", False, "Replace an existing version.")
flags.mark_flags_as_required(["input", "output"])


def convert(input_path, output_path, version=1, overwrite=False, verbose=False):
    common.check_input(input_path)
    if version < 1:
        raise common.ConverterError(
            f"--version must be a positive integer; received {version}"
        )
    common.check_output(
        os.path.join(output_path, str(version)), overwrite, parents=True
    )
    with common.quiet(verbose):
        rnp = common.load_model(input_path, want_rnp=True)
        path = keras_rnp.export_saved_model(
            rnp, output_path, version=version, overwrite=overwrite
        )
    print(
        f"Wrote {path} (signatures serving_default, serving_budget, "
        "serving_actions)."
    )


def main(argv):
    del argv
    common.run(
        lambda: convert(
            FLAGS.input,
            FLAGS.output,
            FLAGS.version,
            FLAGS.overwrite,
            FLAGS.verbose,
        )
    )


if __name__ == "__main__":
    app.run(main)
