"""WidthBatchNorm: batch-norm statistics kept per input width.

Inside a gated unit, the feature map a batch norm sees depends on how many
input channel groups the previous gated layer left active: a network that
runs at several widths with one set of statistics normalises each width
with the others' (Slimmable networks, Yu et al., ICLR 2019). This keeps
one set of moving statistics per previous action; the batch norm's own
set serves the full width, so the plain network (`strip()`) keeps its
full-width statistics. With `affine=True` each width also has its own
scale and offset (gamma and beta), as slimmable networks' private batch
norms do.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="keras_rnp")
class WidthBatchNorm(keras.layers.Layer):
    """Moving statistics of a batch norm for input widths `1..groups - 1`.

    The batch norm itself (its `gamma`, `beta`, `epsilon`, `momentum`, and
    its moving statistics for the full width `groups`) is passed to each
    call: this layer holds only the extra statistics.

    Args:
        groups: channel groups `k` of the previous gated layer.
        channels: channels the batch norm normalises.
        affine: also keep a trainable gamma and beta per width `1..k-1`
            (the batch norm's own serve the full width), initialised to
            ones and zeros; `GatedConv2D` copies the batch norm's into them
            when it builds, so a new model computes what the backbone did.
        **kwargs: base `keras.layers.Layer` arguments.
    """

    def __init__(self, groups, channels, affine=False, **kwargs):
        super().__init__(**kwargs)
        self.groups = int(groups)
        self.channels = int(channels)
        self.affine_per_width = bool(affine)
        shape = (self.groups - 1, self.channels)
        self.moving_mean = self.add_weight(
            shape=shape,
            initializer="zeros",
            trainable=False,
            autocast=False,
            aggregation="mean",
            name="moving_mean",
        )
        self.moving_variance = self.add_weight(
            shape=shape,
            initializer="ones",
            trainable=False,
            autocast=False,
            aggregation="mean",
            name="moving_variance",
        )
        self.gamma = self.beta = None
        if self.affine_per_width:
            self.gamma = self.add_weight(
                shape=shape, initializer="ones", autocast=False, name="gamma"
            )
            self.beta = self.add_weight(
                shape=shape, initializer="zeros", autocast=False, name="beta"
            )
        self.built = True

    def copy_affine_from(self, batch_norm):
        """Sets every width's gamma and beta to the batch norm's."""
        if not self.affine_per_width:
            return
        rows = (self.groups - 1, 1)
        if batch_norm.scale:
            self.gamma.assign(tf.tile(batch_norm.gamma[None], rows))
        if batch_norm.center:
            self.beta.assign(tf.tile(batch_norm.beta[None], rows))

    def scale_and_offset(self, batch_norm):
        """`[k, C]` gammas and betas, width 1 first (the last row the
        batch norm's own), or None where the batch norm has none."""
        gamma = beta = None
        if batch_norm.scale:
            gamma = batch_norm.gamma[None]
            if self.affine_per_width:
                gamma = tf.concat([self.gamma, gamma], 0)
        if batch_norm.center:
            beta = batch_norm.beta[None]
            if self.affine_per_width:
                beta = tf.concat([self.beta, beta], 0)
        return gamma, beta

    def statistics(self, batch_norm):
        """`[k, C]` moving means and variances, width 1 first; the last
        row is the batch norm's own (full-width) set."""
        mean = tf.concat([self.moving_mean, batch_norm.moving_mean[None]], 0)
        variance = tf.concat(
            [self.moving_variance, batch_norm.moving_variance[None]], 0
        )
        return mean, variance

    def normalize(self, y, batch_norm, width, training=False):
        """Batch norm of `y` with each image's input-width statistics.

        Args:
            y: `[B, ..., C]` feature map.
            batch_norm: the `keras.layers.BatchNormalization` it replaces.
            width: `[B]` int, each image's previous action in `1..k`.
            training: normalise with the batch statistics of each width
                group (and update that group's moving statistics), as a
                batch norm does in training; else the moving statistics.

        Returns:
            The normalised `y`, in its dtype.
        """
        dtype = y.dtype
        y = tf.cast(y, tf.float32)
        index = tf.cast(width, tf.int32) - 1
        mean, variance = self.statistics(batch_norm)
        if training and batch_norm.trainable:
            mean, variance = self._batch_statistics(y, index, batch_norm)
        image_mean = _per_image(tf.gather(mean, index), y)
        image_variance = _per_image(tf.gather(variance, index), y)
        out = (y - image_mean) * tf.math.rsqrt(
            image_variance + batch_norm.epsilon
        )
        gamma, beta = self.scale_and_offset(batch_norm)
        if gamma is not None:
            out = out * self._row(gamma, index, y)
        if beta is not None:
            out = out + self._row(beta, index, y)
        return tf.cast(out, dtype)

    def _row(self, rows, index, like):
        """Each image's row of `[k, C]` (or the one row of `[1, C]`)."""
        if rows.shape[0] == 1:
            return rows[0]
        return _per_image(tf.gather(rows, index), like)

    def _batch_statistics(self, y, index, batch_norm):
        """Mean and variance of each width group in the batch, `[k, C]`;
        updates the moving statistics of the groups present."""
        axes = list(range(1, y.shape.rank - 1))
        positions = tf.cast(tf.reduce_prod(tf.shape(y)[1:-1]), tf.float32)
        ones = tf.ones_like(index, tf.float32)
        count = tf.math.unsorted_segment_sum(ones, index, self.groups)
        count = count * positions
        divisor = tf.maximum(count, 1.0)[:, None]
        sums = tf.math.unsorted_segment_sum(
            tf.reduce_sum(y, axes), index, self.groups
        )
        mean = sums / divisor
        centred = y - _per_image(tf.gather(mean, index), y)
        squares = tf.math.unsorted_segment_sum(
            tf.reduce_sum(tf.square(centred), axes), index, self.groups
        )
        variance = squares / divisor
        present = (count > 0)[:, None]
        momentum = batch_norm.momentum
        old_mean, old_variance = self.statistics(batch_norm)
        new_mean = tf.where(
            present,
            old_mean * momentum + tf.stop_gradient(mean) * (1 - momentum),
            old_mean,
        )
        new_variance = tf.where(
            present,
            old_variance * momentum
            + tf.stop_gradient(variance) * (1 - momentum),
            old_variance,
        )
        self.moving_mean.assign(new_mean[:-1])
        self.moving_variance.assign(new_variance[:-1])
        batch_norm.moving_mean.assign(new_mean[-1])
        batch_norm.moving_variance.assign(new_variance[-1])
        return mean, variance

    def affine(self, batch_norm, width, channels):
        """Inference batch norm at input width `width` (a Python int or a
        scalar tensor) on the first `channels`, as `y * scale + offset`."""
        scale, offset = self._affine_table(batch_norm)
        return scale[width - 1, :channels], offset[width - 1, :channels]

    def image_affine(self, batch_norm, width):
        """Inference batch norm per image as `y * scale + offset`, each
        image with its input width's statistics (and gamma and beta).

        Args:
            batch_norm: the `keras.layers.BatchNormalization`.
            width: `[B]` int, each image's previous action in `1..k`.

        Returns:
            `(scale, offset)`, each `[B, C]` float32.
        """
        index = tf.cast(width, tf.int32) - 1
        scale, offset = self._affine_table(batch_norm)
        return tf.gather(scale, index), tf.gather(offset, index)

    def _affine_table(self, batch_norm):
        """`[k, C]` inference scales and offsets, width 1 first."""
        mean, variance = self.statistics(batch_norm)
        scale = tf.math.rsqrt(variance + batch_norm.epsilon)
        gamma, beta = self.scale_and_offset(batch_norm)
        if gamma is not None:
            scale = scale * gamma  # [1, C] (shared) broadcasts.
        offset = -mean * scale
        if beta is not None:
            offset = offset + beta
        return scale, offset

    def get_config(self):
        return {
            **super().get_config(),
            "groups": self.groups,
            "channels": self.channels,
            "affine": self.affine_per_width,
        }


def _per_image(values, like):
    """`[B, C]` values broadcast against a `[B, ..., C]` tensor."""
    shape = [-1] + [1] * (like.shape.rank - 2) + [values.shape[-1]]
    return tf.reshape(values, shape)
