"""Exports an RNP model (.keras) to ONNX.

    python converters/rnp_to_onnx.py --input=rnp.keras --output=rnp.onnx

Inputs `images` and `budget` (float32 `[N]` or `[1]`; `[0.0]` is the
learned policy); outputs `logits`, `probabilities`, `actions` and `flops`.
"""

import common
from absl import app
from absl import flags

import keras_rnp

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "The RNP model (.keras).")
flags.DEFINE_string("output", None, "The ONNX file to write.")
flags.DEFINE_integer("opset", 17, "The ONNX opset (13 or later).")
flags.DEFINE_bool("overwrite", False, "Replace an existing output file.")
flags.mark_flags_as_required(["input", "output"])


def convert(input_path, output_path, opset=17, overwrite=False, verbose=False):
    common.check_input(input_path)
    common.check_output(output_path, overwrite, suffix=".onnx")
    keras_rnp.export.check_opset(opset)
    with common.quiet(verbose):
        rnp = common.load_model(input_path, want_rnp=True)
        keras_rnp.export_onnx(rnp, output_path, opset=opset)
    print(
        f"Wrote {output_path} (opset {opset}; inputs images and budget, "
        "outputs logits, probabilities, actions, flops)."
    )


def main(argv):
    del argv
    common.run(
        lambda: convert(
            FLAGS.input,
            FLAGS.output,
            FLAGS.opset,
            FLAGS.overwrite,
            FLAGS.verbose,
        )
    )


if __name__ == "__main__":
    app.run(main)
