"""GatedConv2D: a convolution whose output channels run in nested groups.

The one place that knows how a gated unit executes for a number of active
input and output channel groups: masked (training: every channel computed,
the skipped ones zeroed) or sliced (inference: a smaller convolution on the
active channels, batch norm folded into it).
"""

import keras
import tensorflow as tf

from keras_rnp import flops as flops_lib
from keras_rnp.layers.width_batch_norm import WidthBatchNorm

_L = keras.layers


@keras.saving.register_keras_serializable(package="keras_rnp")
class GatedConv2D(keras.layers.Layer):
    """A Conv2D and the channel-wise layers after it, run on a prefix of
    its output channel groups.

    The convolution's `filters` are split into `groups` contiguous groups;
    action `a` computes groups `1..a` and leaves the rest exactly zero at
    the unit's output, after batch norm and activation, so the next
    convolution can ignore them. `keras_rnp.wrap()` builds one per gated
    convolution of a plain model, around that model's own layers.

    Args:
        conv: the `keras.layers.Conv2D` (or its serialized form).
        tail: the channel-wise layers that follow it (batch norm,
            activations, pooling, padding, dropout, depthwise convolutions
            with one filter per channel), in order.
        groups: channel groups `k`; `conv.filters` must be divisible by it.
        in_gated: whether the input comes from another gated unit, so that
            only its first `a_{t-1}` of `k` input groups are active (and
            the convolution reads only those when sliced).
        width_aware: for a unit whose input is gated, give each batch norm
            of the tail one set of statistics per input width (the
            previous action; see `WidthBatchNorm`), instead of one set for
            all widths.
        width_affine: with `width_aware`, also give each input width its
            own batch-norm gamma and beta (see `WidthBatchNorm`).
        out_gated: whether the output channels are gated (the default);
            False computes every output channel from the active inputs (the
            last convolution of a residual block, which writes the whole
            stream).
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `[B, H, W, C_in]` feature map; channels that a previous
            gated unit skipped are already 0.
        action: `[B]` int tensor in `1..groups`, the groups to keep.
        previous_action: `[B]` int tensor, the previous gated layer's
            action (the input width); needed by width-aware batch norm.
        training: passed to batch norm and dropout.

    Output shape:
        `[B, H', W', filters]`, channels past `action * filters / k`
        exactly 0 in each image.

    Example:

    ```python
    unit = keras_rnp.layers.GatedConv2D(
        keras.layers.Conv2D(16, 3, padding="same"),
        tail=[keras.layers.BatchNormalization(), keras.layers.ReLU()],
        groups=4,
    )
    y = unit(images, action=tf.constant([1, 4]))       # masked
    z = unit.call_sliced(images, in_active=3, out_active=4)  # 4 channels
    ```
    """

    def __init__(
        self,
        conv,
        tail=(),
        groups=4,
        in_gated=False,
        width_aware=False,
        width_affine=False,
        out_gated=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(conv, dict):
            conv = keras.saving.deserialize_keras_object(conv)
        tail = [
            keras.saving.deserialize_keras_object(layer)
            if isinstance(layer, dict)
            else layer
            for layer in tail
        ]
        if not isinstance(conv, _L.Conv2D):
            raise ValueError(
                "GatedConv2D expects a keras.layers.Conv2D. Received: "
                f"conv={conv!r}."
            )
        if isinstance(groups, bool) or not isinstance(groups, int):
            raise ValueError(
                f"groups must be an integer >= 1. Received: groups={groups!r}."
            )
        if groups < 1 or conv.filters % groups:
            raise ValueError(
                "GatedConv2D expects filters divisible by groups. Received: "
                f"filters={conv.filters}, groups={groups}."
            )
        self.conv = conv
        self.tail = list(tail)
        self.groups = groups
        self.in_gated = bool(in_gated)
        self.width_aware = bool(width_aware)
        self.width_affine = bool(width_affine)
        self.out_gated = bool(out_gated)
        self.out_channels = conv.filters
        # Width-aware statistics for the tail's batch norms, by position.
        self.width_norms = {}
        self.in_channels = None
        self.input_spatial_shape = None
        self.full_flops = None
        self.tail_flops = None
        self.unit_output_shape = None

    def build(self, input_shape):
        shape = tuple(input_shape)
        if not self.conv.built:
            self.conv.build(shape)
        out = self.conv.compute_output_shape(shape)
        for layer in self.tail:
            if not layer.built:
                layer.build(out)
            out = layer.compute_output_shape(out)
        self._describe(shape)
        if self.width_aware and self.in_gated:
            for i, layer in enumerate(self.tail):
                if isinstance(layer, _L.BatchNormalization):
                    norm = WidthBatchNorm(
                        self.groups,
                        layer.moving_mean.shape[0],
                        affine=self.width_affine,
                        name=f"{layer.name}_widths",
                    )
                    norm.copy_affine_from(layer)
                    self.width_norms[str(i)] = norm
        self.built = True

    def _describe(self, input_shape):
        conv_out = self.conv.compute_output_shape(tuple(input_shape))
        self.in_channels = int(input_shape[-1])
        self.input_spatial_shape = tuple(input_shape[1:-1])
        self.full_flops = flops_lib.layer_flops(
            self.conv, input_shape, conv_out
        )
        out = conv_out
        # Depthwise convolutions in the tail run on the computed channels
        # only: their cost follows the output's active fraction.
        self.tail_flops = 0.0
        for layer in self.tail:
            layer_out = layer.compute_output_shape(out)
            self.tail_flops += flops_lib.layer_flops(layer, out, layer_out)
            out = layer_out
        self.unit_output_shape = tuple(out[1:])

    def compute_output_shape(self, input_shape):
        out = self.conv.compute_output_shape(tuple(input_shape))
        for layer in self.tail:
            out = layer.compute_output_shape(out)
        return out

    @property
    def label(self):
        """A short name for reports: the convolution's."""
        return self.conv.name

    def active_fraction_in(self, previous_action):
        """Fraction of input channels active, given the previous action."""
        if not self.in_gated:
            return 1.0
        return previous_action / self.groups

    def channel_mask(self, action):
        """A `[B, 1, 1, C]` float mask keeping the first `action` groups."""
        group_size = self.out_channels // self.groups
        mask = tf.sequence_mask(
            tf.cast(action, tf.int32) * group_size,
            self.out_channels,
            dtype=tf.float32,
        )
        return mask[:, None, None, :]

    def call(self, inputs, action, previous_action=None, training=False):
        return self.call_masked(
            inputs, action, previous_action=previous_action, training=training
        )

    def call_masked(self, x, action, previous_action=None, training=False):
        """Runs the full unit, then zeroes the skipped channel groups.

        Args:
            x: `[B, H, W, C_in]` input; its skipped channels are already 0.
            action: `[B]` int tensor, the number of groups to keep per image.
            previous_action: `[B]` int tensor, the input width of each
                image (required with width-aware batch norm).
            training: passed to batch norm and dropout.

        Returns:
            `[B, H', W', C_out]`, with channels past `action * C_out / k`
            exactly 0 in every image (if the output is gated).
        """
        if self.width_norms and previous_action is None:
            raise ValueError(
                "GatedConv2D with width-aware batch norm needs each image's "
                "previous_action. Received: previous_action=None."
            )
        y = self.conv(x)
        for i, layer in enumerate(self.tail):
            norm = self.width_norms.get(str(i))
            if norm is None:
                y = layer(y, training=training)
            else:
                y = norm.normalize(y, layer, previous_action, training)
        if not self.out_gated:
            return y
        return y * tf.cast(self.channel_mask(action), y.dtype)

    def call_sliced(self, x, in_active, out_active):
        """Inference on the active channels only: a smaller convolution.

        Computes `kernel[:, :, :in_active, :out_active]` on the first
        `in_active` input channels, with batch norm folded into it where it
        directly follows a linear convolution, then the tail on the
        `out_active` computed channels. Dropout is skipped (inference).

        Args:
            x: `[B, H, W, C]` with `C >= in_active`; channels past
                `in_active` are ignored.
            in_active: input channels to read (a Python int or a scalar
                int32 tensor).
            out_active: output channels to compute (likewise).

        Returns:
            `[B, H', W', out_active]`, equal (up to rounding) to the first
            `out_active` channels of `call_masked` in inference mode.

        Do not call it on an empty batch: with oneDNN (TensorFlow 2.21, CPU)
        a convolution on an empty batch returns a tensor of the wrong shape,
        which no later reshape in the graph repairs.
        """
        conv = self.conv
        if not isinstance(in_active, int) or in_active != x.shape[-1]:
            x = x[:, :, :, :in_active]
        # Known spatial sizes: with run-time slice sizes (tensors) the
        # channels are unknown when the graph is built, and the loop over
        # action groups (`execution`) needs the rest of the shape.
        x = tf.ensure_shape(x, (None, *self.input_spatial_shape, None))
        # Folded in float32 (batch norm's statistics are float32), then
        # cast to the compute dtype (mixed precision). The slice may be
        # chosen at run time (tensor sizes). Slice only what is cut: a
        # slice of a variable is a copy.
        kernel, bias = conv.kernel, conv.bias if conv.use_bias else None
        if not _is_whole((in_active, out_active), kernel.shape[2:]):
            kernel = kernel[:, :, :in_active, :out_active]
            bias = None if bias is None else bias[:out_active]
        kernel = tf.cast(kernel, tf.float32)
        bias = None if bias is None else tf.cast(bias, tf.float32)
        width = self.groups
        if self.in_gated:
            width = in_active // (self.in_channels // self.groups)

        def affine(i, layer):
            norm = self.width_norms.get(str(i))
            if norm is None:
                return batch_norm_affine(layer, out_active)
            return norm.affine(layer, width, out_active)

        tail = list(enumerate(self.tail))
        if _folds_first_norm(conv, tail):
            scale, offset = affine(*tail.pop(0))
            kernel = kernel * scale
            bias = offset if bias is None else bias * scale + offset
        # A known kernel rank and spatial size, whatever the slice sizes.
        size = list(conv.kernel_size) + [in_active, out_active]
        kernel = tf.reshape(tf.cast(kernel, x.dtype), size)
        bias = None if bias is None else tf.cast(bias, x.dtype)
        y = tf.nn.conv2d(
            x,
            kernel,
            strides=conv.strides,
            padding=conv.padding.upper(),
            dilations=conv.dilation_rate,
        )
        if bias is not None:
            y = tf.nn.bias_add(y, bias)
        return _run_tail(conv.activation(y), tail, affine, slice(0, out_active))

    def call_blocks(
        self,
        x,
        action,
        previous_action=None,
        uniform_branch=False,
        by_prefix=False,
        narrow_input=False,
        narrow_output=False,
    ):
        """Inference on the active channels for graphs whose weights must
        be constants (onnxruntime's fast convolutions need them; LiteRT).

        The kernel is cut into blocks of one input group by one output
        group; block `(i, o)` runs on exactly the images whose previous
        action exceeds `i` and whose action exceeds `o` (gathered, then
        added back in place), so each image costs what `call_sliced`
        costs, and the graph holds every weight once, whatever the
        actions; it has no control flow. With `uniform_branch` (ONNX), a
        batch whose images all took one action after one input width runs
        instead one convolution on the kernel prefix it needs, chosen by a
        tree of `tf.cond` branches over the `(input width, action)` pairs
        (no gathers); the prefixes are slices of the kernel, which the
        ONNX export keeps as `Slice` nodes of one stored kernel. With
        `by_prefix` (LiteRT), no blocks: every image runs once, as one
        convolution on the kernel prefix of its (input width, action)
        pair, each pair on the images that took it, with no control flow
        (the prefixes become constants of their own). Batch norm is folded
        into the kernel where it directly follows a linear convolution and
        keeps one set of statistics; with per-width statistics it is
        applied per image after it.

        Args:
            x: `[B, H, W, C_in]` input; its skipped channels are 0.
            action: `[B]` int tensor, the groups to compute per image.
            previous_action: `[B]` int tensor, each image's input width
                (for a unit whose input is gated).
            uniform_branch: add the branch for uniform batches.
            by_prefix: run the prefixes instead of the blocks.
            narrow_input: (with `uniform_branch`) `x` holds the groups up
                to the largest input width of the batch, not necessarily
                all `C_in` channels (what `narrow_output` hands on).
            narrow_output: (with `uniform_branch`) return one tensor of
                the groups up to the largest action of the batch, `[B, H',
                W', max(action) * C_out / k]`: a uniform batch then hands
                on its convolution's output as it is, with no zero groups
                to write and no concatenation.

        Returns:
            A list of `k` tensors `[B, H', W', C_out / k]`, output group by
            group, each exactly 0 for the images that skipped it; one
            tensor `[B, H', W', C_out]` if the output is not gated or with
            `by_prefix` (every group, the skipped ones 0); with
            `narrow_output`, the one tensor above.

        Every weight is read outside the branches, so that the graph's
        branches take no variables (see `keras_rnp.export`).
        """
        k = self.groups
        action = tf.cast(action, tf.int32)
        if self.in_gated:
            width = tf.cast(previous_action, tf.int32)
        else:
            width = tf.fill([tf.shape(x)[0]], k)
        gathered, prefix = self.blocks_runner(
            x.dtype, width, uniform_branch, by_prefix=by_prefix
        )
        if by_prefix:
            return gathered(x, action)
        if not uniform_branch:
            outputs = gathered(x, action)
            return outputs if self.out_gated else outputs[0]

        widths = range(1, k + 1) if self.in_gated else [k]
        actions = range(1, k + 1) if self.out_gated else [k]
        cases = [(i, o) for i in widths for o in actions]

        narrow_output = narrow_output and self.out_gated
        narrow_input = narrow_input and self.in_gated

        def uniform_case(a_in, a_out):
            """The whole batch at input width `a_in` and action `a_out`:
            the `a_out` groups computed, and zeros for the others."""
            # A narrow input holds exactly the `a_in` groups here.
            y = prefix(x, a_in, a_out, exact=narrow_input)
            if not self.out_gated or narrow_output:
                return [y]
            parts = tf.split(y, a_out, axis=-1)
            # A tensor of its own per skipped group (tf2onnx cannot
            # convert a branch that returns one tensor twice).
            return parts + [tf.zeros_like(parts[0]) for _ in range(k - a_out)]

        def uniform():
            """Every image took the same action after the same input
            width: one convolution on the kernel prefix they need, chosen
            by a tree of branches (no gathers)."""
            index = (width[0] - widths[0]) * len(actions)
            if self.out_gated:
                index += action[0] - actions[0]
            return branch_tree(
                index, [lambda c=c: uniform_case(*c) for c in cases]
            )

        def mixed():
            part = x
            if narrow_input:  # The blocks read every input group.
                missing = self.in_channels - tf.shape(x)[-1]
                part = tf.pad(x, [[0, 0], [0, 0], [0, 0], [0, missing]])
                part = tf.ensure_shape(
                    part, (None, *x.shape[1:3], self.in_channels)
                )
            outputs = gathered(part, action)
            if narrow_output:
                y = tf.concat(outputs, axis=-1)
                # (At least one group: an empty batch has no largest.)
                largest = tf.maximum(tf.reduce_max(action), 1)
                columns = largest * (self.out_channels // k)
                return [y[:, :, :, :columns]]
            return outputs

        outputs = tf.cond(is_uniform(action * (k + 1) + width), uniform, mixed)
        if narrow_output:
            return outputs[0]
        return outputs if self.out_gated else outputs[0]

    def blocks_runner(self, dtype, width, uniform_branch, by_prefix=False):
        """`call_blocks`' two ways to run the unit, with every weight they
        read cut here, outside any branch (call it before `tf.cond`).

        Args:
            dtype: the compute dtype of the unit's input.
            width: `[B]` int32, each image's input width (`groups` when the
                input is not gated).
            uniform_branch: also cut the kernel prefixes `prefix` reads.
            by_prefix: return the prefixes' runner (`call_blocks`'
                `by_prefix`) in place of the blocks' (and cut the
                prefixes).

        Returns:
            `(gathered, prefix)`: `gathered(x, action)`, the kernel blocks
            each run on the images that need them (a list of the `k` output
            groups, or of one tensor if the output is not gated), or with
            `by_prefix` each image's prefix (one tensor); and
            `prefix(x, a_in, a_out)`, the whole batch at input width
            `a_in` and action `a_out` as one convolution on a kernel
            prefix, returning the `a_out` groups computed (every channel
            if the output is not gated); its `x` may hold just the `a_in`
            groups it reads.
        """
        k, conv = self.groups, self.conv
        uniform_branch = uniform_branch or by_prefix  # Both read prefixes.
        inputs = k if self.in_gated else 1
        outputs_count = k if self.out_gated else 1
        group_in = self.in_channels // inputs
        group_out = self.out_channels // outputs_count
        tail = list(enumerate(self.tail))
        # Folded only with one set of statistics: per-width ones differ
        # per image.
        folds = _folds_first_norm(conv, tail) and "0" not in self.width_norms
        if folds:
            tail.pop(0)
        # The output channels each branch computes: one group (the
        # blocks), or a prefix of `a` groups (a uniform batch).
        ranges = {
            (o * group_out, (o + 1) * group_out) for o in range(outputs_count)
        }
        if uniform_branch:
            ranges |= {(0, a * group_out) for a in range(1, outputs_count + 1)}
        affines, depthwise = {}, {}
        for i, layer in tail:
            if isinstance(layer, _L.BatchNormalization):
                norm = self.width_norms.get(str(i))
                if norm is None:
                    affines[i] = batch_norm_affine(layer, self.out_channels)
                else:
                    affines[i] = norm.image_affine(layer, width)
            elif isinstance(layer, _L.DepthwiseConv2D):
                # Sliced here, outside the branches, so that onnxruntime
                # folds each slice into a constant; one taken inside a
                # branch is recomputed every call, and the grouped
                # convolution reading it runs on non-constant weights.
                depthwise[i] = {
                    (start, stop): _depthwise_weights(layer, slice(start, stop))
                    for start, stop in ranges
                }
        kernel, bias = self._folded_weights(folds)
        kernel = tf.cast(kernel, dtype)
        shape = conv.compute_output_shape(
            (None, *self.input_spatial_shape, self.in_channels)
        )

        def convolve(part, block):
            # Known ranks inside branches (tf2onnx needs them there).
            y = tf.nn.conv2d(
                _known(part),
                _known(block),
                strides=conv.strides,
                padding=conv.padding.upper(),
                dilations=conv.dilation_rate,
            )
            return tf.cast(y, tf.float32)

        # Cut once, outside the branches below: each block one constant
        # however many branches read it.
        blocks = {
            (i, o): kernel[
                :,
                :,
                i * group_in : (i + 1) * group_in,
                o * group_out : (o + 1) * group_out,
            ]
            for i in range(inputs)
            for o in range(outputs_count)
        }

        def block(x, i, o):
            """Block (i, o) of the kernel and the input group it reads."""
            rows = slice(i * group_in, (i + 1) * group_in)
            return _known(x)[:, :, :, rows], blocks[i, o]

        # The bias and batch-norm affines of each range of columns, cut
        # here too.
        biases = {
            (start, stop): _known(bias)[start:stop]
            for start, stop in ranges
            if bias is not None
        }
        sliced_affines = {
            (i, start, stop): tuple(_known(v)[..., start:stop] for v in pair)
            for i, pair in affines.items()
            for start, stop in ranges
        }

        # With per-width statistics, a uniform batch's affines at each
        # input width: one row, whatever the batch (a prefix may run on
        # some of the images).
        width_affines = {}
        if uniform_branch:
            widths = range(1, k + 1) if self.in_gated else [k]
            for i, layer in tail:
                norm = self.width_norms.get(str(i))
                if isinstance(layer, _L.BatchNormalization) and norm:
                    for a_in in widths:
                        pair = norm.image_affine(layer, tf.constant([a_in]))
                        for start, stop in ranges:
                            width_affines[i, a_in, start, stop] = tuple(
                                v[:, start:stop] for v in pair
                            )

        def finish(columns, total, a_in=None, with_bias=True):
            """Bias and tail of the output `columns`, from their float32
            sum; `a_in` the input width of every image, if one."""
            y = tf.cast(total, dtype)
            if bias is not None and with_bias:
                y = y + tf.cast(biases[columns.start, columns.stop], y.dtype)

            def affine(i, layer):
                key = (i, a_in, columns.start, columns.stop)
                scale, offset = (
                    width_affines.get(key)
                    or sliced_affines[i, columns.start, columns.stop]
                )
                if scale.shape.rank == 2:  # Per image.
                    return scale[:, None, None, :], offset[:, None, None, :]
                return scale, offset

            return _run_tail(
                conv.activation(y), tail, affine, columns, depthwise
            )

        def gathered(x, action):
            """Each block on the images that need it, added back in place."""
            batch = tf.shape(x)[0]
            outputs = []
            for o in range(outputs_count):
                needed = action > o if self.out_gated else action > 0
                # Summed in float32: onnxruntime's CPU ScatterND cannot
                # add float16 (mixed precision).
                if o == 0:  # Every image computes block (0, 0): no gather.
                    total = convolve(*block(x, 0, 0))
                else:
                    total = tf.zeros(
                        tf.stack([batch, shape[1], shape[2], group_out]),
                        tf.float32,
                    )
                for i in range(1 if o == 0 else 0, inputs):
                    chosen = needed & (width > i) if self.in_gated else needed
                    rows = tf.where(chosen)
                    part, kernel_block = block(x, i, o)
                    y = convolve(tf.gather_nd(part, rows), kernel_block)
                    # With oneDNN, a convolution on an empty batch (no
                    # image needs the block) returns the wrong shape: pin
                    # it.
                    y = tf.reshape(y, [-1, *shape[1:3], group_out])
                    total = tf.tensor_scatter_nd_add(total, rows, y)
                y = finish(slice(o * group_out, (o + 1) * group_out), total)
                if o > 0:  # Every image keeps the first group.
                    y = y * tf.cast(needed, y.dtype)[:, None, None, None]
                outputs.append(y)
            return outputs

        def paired(x, action):
            """Each image once, as one convolution on the kernel prefix
            of its (input width, action) pair; every pair runs, on the
            images that took it (none, mostly), with no control flow. The
            bias is added per pair (the converter fuses it into the
            convolution), the tail after the merge, on the whole batch (run
            on each pair, XNNPACK refused the file at batch 1)."""
            widths = range(1, k + 1) if self.in_gated else [k]
            actions = range(1, k + 1) if self.out_gated else [k]
            act = action if self.out_gated else tf.fill(tf.shape(width), k)
            pair = width * (k + 1) + act  # One comparison per pair below.
            parts, order = [], []
            for a_in in widths:
                part = x if a_in == k else _known(x)[:, :, :, : rows(a_in)]
                for a_out in actions:
                    chosen = tf.where(pair == a_in * (k + 1) + a_out)[:, 0]
                    chosen = tf.cast(chosen, tf.int32)
                    y = convolve(tf.gather(part, chosen), prefixes[a_in, a_out])
                    y = tf.reshape(y, [-1, *shape[1:3], columns(a_out)])
                    if bias is not None:
                        y = y + biases[0, columns(a_out)]
                    pad = self.out_channels - columns(a_out)
                    if pad:
                        y = tf.pad(y, [[0, 0], [0, 0], [0, 0], [0, pad]])
                    parts.append(y)
                    order.append(chosen)
            total = merge_in_order(parts, order)
            y = finish(slice(0, self.out_channels), total, with_bias=False)
            if not self.out_gated or keeps_zeros:
                return y
            # The skipped groups' tail offsets (a batch norm's), zeroed.
            group = tf.range(self.out_channels) // group_out
            keep = tf.cast(group[None, :] < act[:, None], y.dtype)
            return y * keep[:, None, None, :]

        # Whether the tail keeps the skipped (zero) channels zero.
        keeps_zeros = activation_name(conv) in ("linear", "relu") and all(
            isinstance(layer, (_L.MaxPooling2D, _L.Dropout))
            or (isinstance(layer, _L.ReLU) and not layer.threshold)
            or (
                isinstance(layer, _L.Activation)
                and activation_name(layer) in ("linear", "relu")
            )
            for _, layer in tail
        )

        def rows(a_in):
            return a_in * group_in if self.in_gated else self.in_channels

        def columns(a_out):
            return a_out * group_out if self.out_gated else self.out_channels

        # One kernel prefix per (input width, action).
        prefixes = {}
        if uniform_branch:
            widths = range(1, k + 1) if self.in_gated else [k]
            actions = range(1, k + 1) if self.out_gated else [k]
            prefixes = {
                (i, o): kernel[:, :, : rows(i), : columns(o)]
                for i in widths
                for o in actions
            }

        def prefix(x, a_in, a_out, exact=False):
            """The whole batch at input width `a_in` and action `a_out`:
            one convolution on a kernel prefix, then its bias and tail;
            with `exact`, `x` holds just the `a_in` groups it reads."""
            part = _known(x)
            if exact:
                part = tf.ensure_shape(part, (*part.shape[:3], rows(a_in)))
            elif part.shape[-1] != rows(a_in):
                part = part[:, :, :, : rows(a_in)]
            y = convolve(part, prefixes[a_in, a_out])
            if by_prefix:
                # Run on no image, oneDNN's convolution returns the wrong
                # shape, and XNNPACK refused it without a static one.
                y = tf.reshape(y, [-1, *shape[1:3], columns(a_out)])
            return finish(slice(0, columns(a_out)), y, a_in)

        return (paired if by_prefix else gathered), prefix

    def _folded_weights(self, folds):
        """The float32 kernel and bias (None without one), with the first
        batch norm of the tail folded in when `folds`."""
        conv = self.conv
        kernel = tf.cast(conv.kernel, tf.float32)
        bias = tf.cast(conv.bias, tf.float32) if conv.use_bias else None
        if folds:
            scale, offset = batch_norm_affine(self.tail[0], self.out_channels)
            kernel = kernel * scale
            bias = offset if bias is None else bias * scale + offset
        return kernel, bias

    def get_config(self):
        return {
            **super().get_config(),
            "conv": keras.saving.serialize_keras_object(self.conv),
            "tail": [
                keras.saving.serialize_keras_object(layer)
                for layer in self.tail
            ],
            "groups": self.groups,
            "in_gated": self.in_gated,
            "width_aware": self.width_aware,
            "width_affine": self.width_affine,
            "out_gated": self.out_gated,
        }


def _folds_first_norm(conv, tail):
    """Whether the tail's first layer is a batch norm that can be folded
    into the convolution (which must then be linear). `tail` is a list of
    `(index, layer)`."""
    return (
        activation_name(conv) == "linear"
        and bool(tail)
        and isinstance(tail[0][1], _L.BatchNormalization)
    )


def _run_tail(y, tail, affine, channels, depthwise=None):
    """The tail's layers in inference on `y`, the `channels` (a slice) of
    the unit's output: each batch norm as `y * scale + offset` from
    `affine(index, layer)`, a depthwise convolution on its slice of
    filters (its `(kernel, bias)` from `depthwise[index][channels.start,
    channels.stop]` when given, sliced from the layer otherwise), dropout
    skipped, the rest as they are. `tail` is a list of `(index, layer)`."""
    for i, layer in tail:
        if isinstance(layer, _L.BatchNormalization):
            scale, offset = affine(i, layer)
            y = y * tf.cast(scale, y.dtype) + tf.cast(offset, y.dtype)
        elif isinstance(layer, _L.DepthwiseConv2D):
            if depthwise is None:
                weights = _depthwise_weights(layer, channels)
            else:
                weights = depthwise[i][channels.start, channels.stop]
            y = _depthwise(layer, y, *weights)
        elif not isinstance(layer, _L.Dropout):
            y = layer(y, training=False)
    return y


def _depthwise_weights(layer, channels):
    """A depthwise layer's kernel and bias (None without one) for
    `channels` (a slice, its bounds ints or scalar tensors)."""
    kernel = _known(tf.convert_to_tensor(layer.kernel))[:, :, channels, :]
    if not layer.use_bias:
        return kernel, None
    return kernel, _known(tf.convert_to_tensor(layer.bias))[channels]


def _depthwise(layer, y, kernel, bias):
    """A depthwise convolution (one filter per channel) of `y` with the
    `kernel` and `bias` (None without one) of its channels."""
    kernel = tf.reshape(tf.cast(kernel, y.dtype), [*layer.kernel_size, -1, 1])
    y = tf.nn.depthwise_conv2d(
        y,
        kernel,
        strides=(1, *layer.strides, 1),
        padding=layer.padding.upper(),
        dilations=layer.dilation_rate,
    )
    if bias is not None:
        y = tf.nn.bias_add(y, tf.cast(bias, y.dtype))
    return layer.activation(y)


def merge_in_order(parts, rows):
    """`parts[i]`, computed on the images `rows[i]` (`[n_i]` int32; every
    image of the batch in exactly one), concatenated back in the images'
    order."""
    order = tf.concat(rows, axis=0)
    inverse = tf.scatter_nd(
        order[:, None], tf.range(tf.size(order)), tf.shape(order)
    )
    return tf.gather(tf.concat(parts, axis=0), inverse)


def is_uniform(key):
    """Whether a non-empty `[B]` tensor holds one value throughout."""
    return tf.logical_and(
        tf.size(key) > 0, tf.reduce_min(key) == tf.reduce_max(key)
    )


def branch_tree(index, cases):
    """`cases[index]()` for a scalar int32 tensor `index`, as a balanced
    tree of `tf.cond` (ONNX `If` nodes): `ceil(log2(len(cases)))` branches
    run per call."""

    def choose(low, high):
        if high - low == 1:
            return cases[low]()
        middle = (low + high) // 2
        return tf.cond(
            index < middle,
            lambda: choose(low, middle),
            lambda: choose(middle, high),
        )

    return choose(0, len(cases))


def _known(tensor):
    """`tensor` with its static shape asserted: inside a `tf.cond` branch,
    tf2onnx loses the shapes of the tensors a branch captures, and cannot
    convert a slice or a convolution of them without one."""
    return tf.ensure_shape(tensor, tensor.shape)


def _is_whole(sizes, shape):
    """Whether `sizes` (Python ints or tensors) are known to be `shape`."""
    return all(
        isinstance(size, int) and size == dim
        for size, dim in zip(sizes, shape, strict=True)
    )


def batch_norm_affine(layer, channels):
    """Inference batch norm on the first `channels` as `y * scale + offset`."""
    scale = tf.math.rsqrt(layer.moving_variance[:channels] + layer.epsilon)
    if layer.scale:
        scale = scale * layer.gamma[:channels]
    offset = -layer.moving_mean[:channels] * scale
    if layer.center:
        offset = offset + layer.beta[:channels]
    return scale, offset


def activation_name(layer):
    """The name of a layer's activation function (e.g. `"relu"`)."""
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", str(activation))
