"""keras_rnp: Runtime Neural Pruning for Keras 3 (TensorFlow backend)."""

import pathlib

from setuptools import find_packages
from setuptools import setup

HERE = pathlib.Path(__file__).parent

setup(
    name="keras-rnp",
    version="0.1.0",
    description=(
        "Runtime Neural Pruning (Lin et al., NeurIPS 2017) for Keras 3: "
        "per-image channel pruning decided by a recurrent Q-network."
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["keras_rnp", "keras_rnp.*"]),
    install_requires=[
        # TensorFlow 2.16+ ships with Keras 3 (not tf_keras).
        "tensorflow>=2.16",
        "keras>=3.8",
        "tensorflow-datasets>=4.9",
        "tf2onnx>=1.16",
        "onnxruntime>=1.17",
        # The LiteRT (TensorFlow Lite) interpreter, for export_litert's files.
        "ai-edge-litert>=1.2",
        "absl-py>=1.0",
        "numpy>=1.23",
    ],
    extras_require={
        # The quickstart's data (the 8x8 digits) ships inside scikit-learn.
        # The CIFAR example writes TensorBoard logs and PNG plots.
        "examples": [
            "scikit-learn>=1.2",
            "tensorboard",
            "matplotlib>=3.7",
        ],
        "test": [
            "pytest>=7.4",
            # make test runs the suite in two processes (pytest -n 2).
            "pytest-xdist>=3.5",
            "hypothesis>=6.80",
            "ruff>=0.6",
            "scikit-learn>=1.2",
            "scipy>=1.10",
            "tensorboard",
            "matplotlib>=3.7",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: Keras",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
