"""Exports an RNP model (.keras) to LiteRT (TensorFlow Lite).

    python converters/rnp_to_litert.py --input=rnp.keras --output=rnp.tflite
    python converters/rnp_to_litert.py ... --layout=blocks   # smaller file

Signatures serving_default (images) and serving_budget (images, budget:
float32 `[N]` or `[1]`; `[0.0]` is the learned policy); outputs logits,
probabilities, actions and flops. Run it with
`ai_edge_litert.interpreter.Interpreter(model_path=...)`.
"""

import common
from absl import app
from absl import flags

import keras_rnp

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "The RNP model (.keras).")
flags.DEFINE_string("output", None, "The LiteRT file (.tflite) to write.")
flags.DEFINE_bool("overwrite", False, "Replace an existing output file.")
flags.DEFINE_enum(
    "layout",
    "prefixes",
    list(keras_rnp.export.LITERT_LAYOUTS),
    "How the gated convolutions are stored: prefixes (one convolution per "
    "image and layer; each kernel prefix a constant of its own, so a larger "
    "file) or blocks (each weight once; 1.2x to 7x slower). See "
    "keras_rnp.export_litert.",
)
flags.mark_flags_as_required(["input", "output"])


def convert(
    input_path, output_path, overwrite=False, verbose=False, layout="prefixes"
):
    common.check_input(input_path)
    common.check_output(output_path, overwrite, suffix=".tflite")
    with common.quiet(verbose):
        rnp = common.load_model(input_path, want_rnp=True)
        keras_rnp.export_litert(rnp, output_path, layout=layout)
    print(
        f"Wrote {output_path} (signatures serving_default: images, and "
        "serving_budget: images, budget; outputs logits, probabilities, "
        "actions, flops)."
    )


def main(argv):
    del argv
    common.run(
        lambda: convert(
            FLAGS.input,
            FLAGS.output,
            FLAGS.overwrite,
            FLAGS.verbose,
            FLAGS.layout,
        )
    )


if __name__ == "__main__":
    app.run(main)
