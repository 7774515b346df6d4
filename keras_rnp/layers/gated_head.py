"""GatedHead: a classifier head that reads only the channels kept by the
last gated unit."""

import contextlib
import contextvars

import keras
import tensorflow as tf

_L = keras.layers
REDUCER_LAYERS = (_L.GlobalAveragePooling2D, _L.GlobalMaxPooling2D, _L.Flatten)

# `{id(head): (kernel copy, group size)}`, set by `GatedHead.rows_by_group`
# in the thread (and context) that exports, and seen by no other.
_ROWS_BY_GROUP = contextvars.ContextVar("rows_by_group", default=None)


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

    @contextlib.contextmanager
    def rows_by_group(self, groups, split=False):
        """Within the block, `call_sliced` after a Flatten reads the first
        dense layer's rows from a copy ordered channel group by channel
        group, so that the rows of the first `a` groups are one contiguous
        prefix: a slice that copies nothing.

        Flatten orders a kernel's rows by position, then channel, so the
        rows of the active channels are strided: a slice of them is a copy
        (for VGG-16's first dense layer, a quarter of 102M weights per call
        at one group of four). The copy is made once, when the block is
        entered, from the current weights, and seen only by functions
        traced in this thread inside the block (`export_saved_model`
        traces its signatures there). Does nothing for a head without a
        Flatten-fed dense layer.

        With `split`, the copy is one variable per group instead, which
        `call_blocks` reads (`export_litert`): frozen, each is a constant
        of its own that a fully connected operator reads whole. The LiteRT
        converter left a slice of a large constant unfolded (VGG-16's 411
        MB kernel; 98 MiB was folded, 137 MiB not: its limit is likely 128
        MiB); XNNPACK then ran a batch matmul on the slice, which refuses
        zero rows, and the file failed at batch 1 on its first narrow call.

        Args:
            groups: the last gated unit's channel groups.
            split: one variable per group.

        Yields:
            The copy (a `tf.Variable`, or with `split` a list of one per
            group), or None.
        """
        index = self.gated_dense_index
        if index is None or not isinstance(self.head_layers[0], _L.Flatten):
            yield None
            return
        dense = self.head_layers[index]
        height, width = self.head_layers[0].input.shape[1:3]
        size = self.in_channels // groups
        kernel = keras.ops.convert_to_numpy(dense.kernel)
        kernel = kernel.reshape(height, width, groups, size, dense.units)
        kernel = kernel.transpose(2, 0, 1, 3, 4)
        name = f"{dense.name}_rows_by_group"
        if split:
            variable = [
                tf.Variable(
                    block.reshape(-1, dense.units),
                    trainable=False,
                    name=f"{name}_{o}",
                )
                for o, block in enumerate(kernel)
            ]
        else:
            kernel = kernel.reshape(-1, dense.units)
            variable = tf.Variable(kernel, trainable=False, name=name)
        del kernel  # (VGG-16's: 411 MB, held by the variables now.)
        token = _ROWS_BY_GROUP.set(
            {**(_ROWS_BY_GROUP.get() or {}), id(self): (variable, size, split)}
        )
        try:
            yield variable
        finally:
            _ROWS_BY_GROUP.reset(token)

    def _rows_copy(self, split):
        """`(copy, group size)` made by `rows_by_group(groups, split)` for
        this head in this context, or None."""
        copy, size, copy_split = (_ROWS_BY_GROUP.get() or {}).get(
            id(self), (None, None, None)
        )
        if copy is None or copy_split != split:
            return None
        return copy, size

    def call_sliced(self, y, active):
        """The head on the last unit's `active` computed channels.

        The first dense layer reads only the rows of its kernel that belong
        to those channels (within `rows_by_group`, a contiguous prefix of a
        copy). Where no dense layer reads the gated channels directly, the
        channels are padded back with zeros instead.
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
        rows_by_group = self._rows_copy(split=False)
        if isinstance(reducer, _L.Flatten) and rows_by_group:
            kernel, size = rows_by_group
            height, width = y.shape[1:3]
            # The activations in the copy's order: group, position,
            # channel within the group.
            y = tf.reshape(y, [-1, height, width, active // size, size])
            y = tf.transpose(y, [0, 3, 1, 2, 4])
            y = tf.reshape(y, [-1, height * width * active])
            kernel = kernel[: height * width * active]
        elif isinstance(reducer, _L.Flatten):
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

    def call_blocks(self, groups, action):
        """The head on the last unit's output groups (`GatedConv2D.
        call_blocks`), for graphs whose weights must be constants.

        The first dense layer's rows are cut by channel group (each row
        once; inside `rows_by_group(groups, split=True)`, each group's rows
        are a variable of their own); group `o`'s rows multiply only the
        images whose action exceeds `o`. Where no dense layer reads the
        gated channels directly, the groups are joined and the head runs
        whole.
        """
        index = self.gated_dense_index
        if index is None:
            return self.call(tf.concat(groups, axis=-1))
        reducer = self.head_layers[0]
        dense = self.head_layers[index]
        k = len(groups)
        size = self.in_channels // k
        action = tf.cast(action, tf.int32)
        batch = tf.shape(groups[0])[0]
        dtype = groups[0].dtype
        kernel = dense.kernel
        blocks = None
        if isinstance(reducer, _L.Flatten):
            height, width = groups[0].shape[1:3]
            copy = self._rows_copy(split=True)
            if copy is not None and len(copy[0]) == k:
                blocks = copy[0]
            else:
                shape = [height, width, self.in_channels, -1]
                kernel = tf.reshape(kernel, shape)
        # Summed in float32 (onnxruntime's CPU ScatterND cannot add
        # float16).
        y = tf.zeros(tf.stack([batch, dense.units]), tf.float32)
        for o, part in enumerate(groups):
            rows = tf.where(action > o)
            part = tf.gather_nd(part, rows)
            if blocks is not None:
                block = blocks[o]
                part = tf.reshape(part, [-1, height * width * size])
            elif isinstance(reducer, _L.Flatten):
                block = kernel[:, :, o * size : (o + 1) * size]
                block = tf.reshape(block, [-1, dense.units])
                part = tf.reshape(part, [-1, height * width * size])
            else:
                block = kernel[o * size : (o + 1) * size]
                part = reducer(part)
            product = tf.matmul(part, tf.cast(block, dtype))
            y = tf.tensor_scatter_nd_add(y, rows, tf.cast(product, tf.float32))
        y = tf.cast(y, dtype)
        if dense.use_bias:
            y = tf.nn.bias_add(y, tf.cast(dense.bias, dtype))
        y = dense.activation(y)
        for layer in self.head_layers[index + 1 :]:
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
