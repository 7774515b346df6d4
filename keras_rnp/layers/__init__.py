"""The Keras layers an RNP model is made of.

- `GatedConv2D`: a convolution and its channel-wise tail, run on a prefix
  of its channel groups (masked for training, sliced for inference).
- `GatedBlock`: the inner convolutions of a residual block, one action
  per image gating every inner width.
- `GatedHead`: the classifier head, reading only the active channels.
- `DecisionNetwork`: the recurrent Q-network that chooses the groups.
- `WidthBatchNorm`: batch-norm statistics per input width, for a gated
  unit's batch norms.
"""

from keras_rnp.layers.decision_network import DecisionNetwork
from keras_rnp.layers.gated_block import GatedBlock
from keras_rnp.layers.gated_conv2d import GatedConv2D
from keras_rnp.layers.gated_head import GatedHead
from keras_rnp.layers.width_batch_norm import WidthBatchNorm

__all__ = [
    "DecisionNetwork",
    "GatedBlock",
    "GatedConv2D",
    "GatedHead",
    "WidthBatchNorm",
]
