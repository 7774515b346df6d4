"""The decision network: per-layer encoders, one shared LSTM cell, decoders."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="keras_rnp")
class DecisionNetwork(keras.layers.Layer):
    """Recurrent Q-network that scores the channel-group actions of each layer.

    At gated layer `t` it reads the feature map `s_t` entering that layer:
    global average pooling, then the layer's own encoder (a dense layer with
    ReLU to `code_dim` values), one step of an LSTM cell shared by all
    layers, and the layer's own decoder (a dense layer to `groups`
    Q-values, one per action `1..groups`).

    Args:
        input_channels: list of the channel counts entering each gated
            layer, one entry per gated layer.
        groups: number of actions (channel groups) per layer.
        code_dim: width of each encoder's output.
        hidden_units: width of the LSTM cell.
        **kwargs: base `keras.layers.Layer` arguments.

    Call it through `initial_state()` and `step()`; `RNPModel` does.
    """

    def __init__(
        self, input_channels, groups, code_dim=32, hidden_units=32, **kwargs
    ):
        super().__init__(**kwargs)
        self.input_channels = [int(c) for c in input_channels]
        self.groups = int(groups)
        self.code_dim = int(code_dim)
        self.hidden_units = int(hidden_units)
        self.encoders = [
            keras.layers.Dense(code_dim, activation="relu", name=f"encoder_{t}")
            for t in range(len(self.input_channels))
        ]
        self.cell = keras.layers.LSTMCell(hidden_units, name="cell")
        self.decoders = [
            keras.layers.Dense(groups, name=f"decoder_{t}")
            for t in range(len(self.input_channels))
        ]

    def build(self, input_shape=None):
        for encoder, channels in zip(
            self.encoders, self.input_channels, strict=True
        ):
            encoder.build((None, channels))
        self.cell.build((None, self.code_dim))
        for decoder in self.decoders:
            decoder.build((None, self.hidden_units))
        self.built = True

    def copy(self, name):
        """A frozen network with this one's structure and weights (DQN's
        target network)."""
        twin = DecisionNetwork(
            self.input_channels,
            self.groups,
            code_dim=self.code_dim,
            hidden_units=self.hidden_units,
            name=name,
        )
        twin.build()
        twin.trainable = False
        twin.set_weights(self.get_weights())
        return twin

    def initial_state(self, batch_size):
        """Zero LSTM state `[h, c]` for a batch."""
        zeros = tf.zeros((batch_size, self.hidden_units), self.compute_dtype)
        return [zeros, zeros]

    def step(self, t, feature_map, state):
        """Q-values `[B, groups]` for gated layer `t`, and the next state.

        `feature_map` may hold only the first channels of the layer's
        input (a sliced uniform batch passes on its active ones); the
        others count as zeros, as in the full feature map.
        """
        pooled = tf.reduce_mean(feature_map, axis=[1, 2])
        channels = self.input_channels[t]
        if pooled.shape[-1] != channels:
            padding = channels - tf.shape(pooled)[-1]
            pooled = tf.pad(pooled, [[0, 0], [0, padding]])
            pooled = tf.ensure_shape(pooled, (None, channels))
        code = self.encoders[t](pooled)
        output, state = self.cell(code, state)
        # Q-values in float32 whatever the compute dtype (mixed precision).
        return tf.cast(self.decoders[t](output), tf.float32), state

    def call(self, inputs):
        raise NotImplementedError(
            "DecisionNetwork is stepped layer by layer with step(); "
            "call the RNPModel instead."
        )

    def get_config(self):
        return {
            **super().get_config(),
            "input_channels": self.input_channels,
            "groups": self.groups,
            "code_dim": self.code_dim,
            "hidden_units": self.hidden_units,
        }
