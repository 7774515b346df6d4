"""GatedHead: a classifier head that reads only the channels kept by the
last gated unit."""

import keras
import tensorflow as tf

_L = keras.layers
REDUCER_LAYERS = (_L.GlobalAveragePooling2D, _L.GlobalMaxPooling2D, _L.Flatten)


@keras.saving.register_keras_serializable(package="keras_rnp")
class GatedHead(keras.layers.Layer):
    """Global pooling or flatten, then dense layers, after a gated unit.

    When nothing but dropout stands between the reducer and the first
    dense layer, that dense layer reads only the rows of its kernel that
    belong to the active channels (`call_sliced`); otherwise the channels
    are padded back with zeros and the head runs whole.

    Args:
        layers: the head's layers, the reducer first.
        in_channels: channels of the feature map entering the head.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `[B, H, W, in_channels]` feature map (skipped channels 0).
        training: passed to dropout and batch norm.
    """

    def __init__(self, layers, in_channels, **kwargs):
        super().__init__(**kwargs)
        layers = [
            keras.saving.deserialize_keras_object(layer)
            if isinstance(layer, dict)
            else layer
            for layer in layers
        ]
        if not layers or not isinstance(layers[0], REDUCER_LAYERS):
            raise ValueError(
                "GatedHead expects its first layer to be "
                "GlobalAveragePooling2D, GlobalMaxPooling2D or Flatten. "
                f"Received: layers={layers!r}."
            )
        self.head_layers = layers
        self.in_channels = int(in_channels)
        self.built = all(layer.built for layer in layers)

    @property
    def gated_dense_index(self):
        """Index of the dense layer that reads the gated channels directly
        (only the reducer and dropout before it), or None."""
        for i, layer in enumerate(self.head_layers[1:], start=1):
            if isinstance(layer, _L.Dense):
                return i
            if not isinstance(layer, _L.Dropout):
                return None
        return None

    def call(self, inputs, training=False):
        x = inputs
        for layer in self.head_layers:
            x = layer(x, training=training)
        return x

    def call_sliced(self, y, active):
        """The head on the last unit's `active` computed channels.

        The first dense layer reads only the rows of its kernel that belong
        to those channels. Where no dense layer reads the gated channels
        directly, the channels are padded back with zeros instead.
        """
        index = self.gated_dense_index
        full = self.in_channels
        if index is None:
            y = tf.pad(y, [[0, 0], [0, 0], [0, 0], [0, full - active]])
            return self.call(y)
        reducer = self.head_layers[0]
        dense = self.head_layers[index]
        rest = self.head_layers[index + 1 :]
        kernel = dense.kernel
        if isinstance(reducer, _L.Flatten):
            height, width = y.shape[1:3]
            y = tf.reshape(y, [-1, height * width * active])
            if not isinstance(active, int) or active < full:
                # A slice of a variable is a copy.
                kernel = tf.reshape(kernel, [height, width, full, -1])
                kernel = tf.reshape(kernel[:, :, :active], [-1, dense.units])
        else:
            y = reducer(y)
            if not isinstance(active, int) or active < full:
                kernel = kernel[:active]
        y = tf.matmul(y, tf.cast(kernel, y.dtype))
        if dense.use_bias:
            y = tf.nn.bias_add(y, tf.cast(dense.bias, y.dtype))
        y = dense.activation(y)
        for layer in rest:
            y = layer(y, training=False)
        return y

    @property
    def ends_in_softmax(self):
        """Whether the head outputs probabilities rather than logits."""
        last = self.head_layers[-1]
        if isinstance(last, _L.Softmax):
            return True
        activation = getattr(last, "activation", None)
        return getattr(activation, "__name__", None) == "softmax"

    def get_config(self):
        return {
            **super().get_config(),
            "layers": [
                keras.saving.serialize_keras_object(layer)
                for layer in self.head_layers
            ],
            "in_channels": self.in_channels,
        }
