"""Converts a plain Keras CNN (.keras) into an RNP model (.keras).

    python converters/keras_to_rnp.py --input=cnn.keras --output=rnp.keras \
        --groups=4

The RNP model still has to be trained (`rnp.fit`) before its decisions are
useful; with forced full actions it computes exactly what the CNN computes.
"""

import common
from absl import app
from absl import flags

import keras_rnp

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "The plain Keras model (.keras).")
flags.DEFINE_string("output", None, "Where to write the RNP model (.keras).")
flags.DEFINE_integer("groups", 4, "Channel groups per gated convolution.")
flags.DEFINE_bool("gate_first", False, "Also gate the first convolution.")
flags.DEFINE_float("penalty", 0.1, "Reward paid per extra channel group.")
flags.DEFINE_bool("overwrite", False, "Replace an existing output file.")
flags.mark_flags_as_required(["input", "output"])


def convert(
    input_path,
    output_path,
    groups=4,
    gate_first=False,
    penalty=0.1,
    overwrite=False,
    verbose=False,
):
    """Wraps the model at `input_path` and saves it to `output_path`."""
    common.check_input(input_path)
    common.check_output(output_path, overwrite, suffix=".keras")
    with common.quiet(verbose):
        model = common.load_model(input_path, want_rnp=False)
        rnp = keras_rnp.wrap(
            model, groups=groups, gate_first=gate_first, penalty=penalty
        )
    rnp.save(output_path)
    print(
        f"Wrote {output_path}: {rnp.num_gated_layers} gated layers, "
        f"{groups} groups, {rnp.full_flops:,.0f} FLOPs per image at full "
        "width."
    )


def main(argv):
    del argv
    common.run(
        lambda: convert(
            FLAGS.input,
            FLAGS.output,
            FLAGS.groups,
            FLAGS.gate_first,
            FLAGS.penalty,
            FLAGS.overwrite,
            FLAGS.verbose,
        )
    )


if __name__ == "__main__":
    app.run(main)
