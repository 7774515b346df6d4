"""keras_rnp: Runtime Neural Pruning (Lin et al., NeurIPS 2017) for Keras 3."""

from keras_rnp import callbacks
from keras_rnp import datasets
from keras_rnp import distribute
from keras_rnp import layers
from keras_rnp import static_pruning
from keras_rnp.evaluation import choose_path
from keras_rnp.export import export_litert
from keras_rnp.export import export_onnx
from keras_rnp.export import export_saved_model
from keras_rnp.flops import count_flops
from keras_rnp.layers import DecisionNetwork
from keras_rnp.policy import linearly_decaying_epsilon
from keras_rnp.report import Report
from keras_rnp.report import rank_correlation
from keras_rnp.report import report
from keras_rnp.rnp_model import RNPModel
from keras_rnp.wrap import rewrap
from keras_rnp.wrap import strip
from keras_rnp.wrap import wrap

__version__ = "0.1.0"

__all__ = [
    "DecisionNetwork",
    "RNPModel",
    "Report",
    "callbacks",
    "choose_path",
    "count_flops",
    "datasets",
    "distribute",
    "export_litert",
    "export_onnx",
    "export_saved_model",
    "layers",
    "linearly_decaying_epsilon",
    "rank_correlation",
    "report",
    "rewrap",
    "static_pruning",
    "strip",
    "wrap",
]
