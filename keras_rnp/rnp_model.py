"""RNPModel: a chain CNN with runtime channel pruning and its training."""

import math
import os
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_rnp import chain
from keras_rnp import io_utils
from keras_rnp.decision_network import DecisionNetwork
from keras_rnp.schedules import linearly_decaying_epsilon

PENALTY_MODES = ("flat", "flops")
# Compiled run() functions, kept outside the models so that they are not
# tracked (and saved) as part of them.
_RUN_FUNCTIONS = weakref.WeakKeyDictionary()


@keras.saving.register_keras_serializable(package="keras_rnp")
class RNPModel(keras.Model):
    """A CNN whose gated convolutions compute only the channel groups that a
    recurrent decision network chooses, image by image (Runtime Neural
    Pruning, Lin et al., NeurIPS 2017).

    Build it with `keras_rnp.wrap(model)`. Calling it returns what the
    backbone returns, under greedy decisions; `run()` also returns the
    actions taken and the FLOPs each image cost. `fit()` runs the paper's
    Algorithm 1: the training steps alternate between `decision_steps`
    Q-learning updates of the decision network (backbone frozen,
    epsilon-greedy) and `backbone_steps` fine-tuning updates of the backbone
    (decision network frozen, greedy), round after round.

    Args:
        backbone: the plain Keras model (a chain CNN, see `keras_rnp.wrap`).
            Its layers are used as they are: wrap() passes a clone.
        groups: channel groups `k` per gated convolution (actions 1..k).
        penalty: `p`, the reward paid per extra group: `r_t = -p(a_t - 1)`.
        penalty_mode: `"flat"` (the paper's `-p(a_t - 1)` at every layer) or
            `"flops"` (the same, weighted by the layer's share of the gated
            FLOPs, scaled so the weights average 1).
        gamma: discount of the Q-learning target.
        epsilon_start: exploration rate at the first decision step.
        epsilon_end: exploration rate from `epsilon_decay_steps` on.
        epsilon_decay_steps: decision steps over which epsilon falls
            linearly from `epsilon_start` to `epsilon_end`.
        backbone_epsilon: exploration rate of the actions under which the
            backbone is fine-tuned. 0 (the paper) fine-tunes under the
            greedy decisions only; a small rate keeps the backbone good at
            the widths the policy does not currently choose.
        distillation: in-place distillation in the fine-tuning steps, a
            weight `d` in [0, 1]. With `d > 0` each fine-tuning step also
            runs the full network (every group) and minimizes
            `L(y, full) + (1 - d) L(y, path) + d H(full, path)`, where
            `H` is the cross-entropy of the path's prediction against the
            full network's (held constant): the narrow paths learn from the
            full network, which keeps learning from the labels. 0 (the
            paper) trains the path taken on the labels only, with one
            forward pass per step; `d > 0` costs about twice that.
        decision_steps: `N1`, decision-network updates per round (0 only
            fine-tunes the backbone: with `backbone_epsilon=1`, under
            random actions, which trains every width before Q-learning).
        backbone_steps: `N2`, backbone updates per round (0 keeps the
            backbone frozen).
        code_dim: width of the decision network's per-layer encoders.
        hidden_units: width of its LSTM cell.
        gate_first: also gate the first convolution.
        alpha_momentum: momentum of the running mean of the classification
            loss; `alpha = 1 / running mean`, so `alpha * L_cls` is about 1.
        seed: seed of the exploration's random numbers (None draws one
            from NumPy's global generator, which `keras.utils.set_random_seed`
            seeds).
        **kwargs: base `keras.Model` arguments (`name`, ...).

    Example:

    ```python
    rnp = keras_rnp.wrap(backbone, groups=4)
    rnp.compile(optimizer=keras.optimizers.SGD(1e-3), metrics=["accuracy"])
    rnp.fit(train_ds, epochs=5, validation_data=val_ds)
    out = rnp.run(images)  # logits, actions, flops
    ```
    """

    def __init__(
        self,
        backbone,
        groups=4,
        penalty=0.1,
        penalty_mode="flat",
        gamma=1.0,
        epsilon_start=1.0,
        epsilon_end=0.1,
        epsilon_decay_steps=1000,
        backbone_epsilon=0.0,
        distillation=0.0,
        decision_steps=100,
        backbone_steps=100,
        code_dim=32,
        hidden_units=32,
        gate_first=False,
        alpha_momentum=0.99,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_backend()
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        _check_int("groups", groups, minimum=1)
        _check_number("penalty", penalty, minimum=0.0)
        if penalty_mode not in PENALTY_MODES:
            raise ValueError(
                f"penalty_mode must be one of {PENALTY_MODES}. Received: "
                f"penalty_mode={penalty_mode!r}."
            )
        _check_number("gamma", gamma, minimum=0.0, maximum=1.0)
        _check_number("epsilon_start", epsilon_start, 0.0, 1.0)
        _check_number("epsilon_end", epsilon_end, 0.0, 1.0)
        _check_int("epsilon_decay_steps", epsilon_decay_steps, minimum=0)
        _check_number("backbone_epsilon", backbone_epsilon, 0.0, 1.0)
        _check_number("distillation", distillation, 0.0, 1.0)
        _check_int("decision_steps", decision_steps, minimum=0)
        _check_int("backbone_steps", backbone_steps, minimum=0)
        if decision_steps + backbone_steps == 0:
            raise ValueError(
                "decision_steps + backbone_steps must be at least 1. "
                f"Received: decision_steps={decision_steps}, "
                f"backbone_steps={backbone_steps}."
            )
        _check_int("code_dim", code_dim, minimum=1)
        _check_int("hidden_units", hidden_units, minimum=1)
        _check_number("alpha_momentum", alpha_momentum, 0.0, 1.0)

        self.backbone = backbone
        self.groups = int(groups)
        self.penalty = float(penalty)
        self.penalty_mode = penalty_mode
        self.gamma = float(gamma)
        self.epsilon_start = float(epsilon_start)
        self.epsilon_end = float(epsilon_end)
        self.epsilon_decay_steps = int(epsilon_decay_steps)
        self.backbone_epsilon = float(backbone_epsilon)
        self.distillation = float(distillation)
        self.decision_steps = int(decision_steps)
        self.backbone_steps = int(backbone_steps)
        self.code_dim = int(code_dim)
        self.hidden_units = int(hidden_units)
        self.gate_first = bool(gate_first)
        self.alpha_momentum = float(alpha_momentum)
        if seed is None:
            # Drawn from NumPy's global generator, which
            # keras.utils.set_random_seed seeds; kept in the config.
            seed = int(np.random.randint(0, 2**31 - 1))
        self.seed = seed

        self._plan = chain.plan_chain(backbone, self.groups, self.gate_first)
        units = self._plan.units
        self.decision = DecisionNetwork(
            [unit.in_channels for unit in units],
            self.groups,
            code_dim=self.code_dim,
            hidden_units=self.hidden_units,
            name="decision",
        )
        self.decision.build()
        self.decision_flops = chain.count_decision_flops(
            [unit.in_channels for unit in units],
            self.code_dim,
            self.hidden_units,
            self.groups,
        )
        gated = np.array([unit.full_flops for unit in units])
        if penalty_mode == "flops":
            weights = gated / gated.sum() * len(units)
        else:
            weights = np.ones(len(units))
        # cost_t(a) = w_t * (a - 1): what the penalty charges for action a.
        # A NumPy array, so that traced functions embed it as a constant
        # (a captured eager tensor would become an input of exported graphs).
        self.action_cost = (
            weights[:, None] * np.arange(self.groups)[None, :]
        ).astype("float32")
        self._output_shape = tuple(backbone.outputs[0].shape)
        # Whether the backbone outputs probabilities rather than logits.
        self.ends_in_softmax = _ends_in_softmax(self._plan.head)
        # Which runtime the sliced inference graph is built for: "tensorflow"
        # (empty action groups skipped with tf.cond, outputs merged with
        # DynamicStitch) or "onnx" (no control flow, which tf2onnx converts
        # badly; outputs merged with a Gather, faster than the
        # ScatterElements that DynamicStitch becomes).
        self._graph_target = "tensorflow"
        # Training state, saved with the model.
        self.step_counter = self.add_weight(
            shape=(),
            dtype="int64",
            initializer="zeros",
            trainable=False,
            # Every replica counts the same step: keep one count.
            aggregation="only_first_replica",
            name="step_counter",
        )
        self.decision_step_counter = self.add_weight(
            shape=(),
            dtype="int64",
            initializer="zeros",
            trainable=False,
            # Every replica counts the same step: keep one count.
            aggregation="only_first_replica",
            name="decision_step_counter",
        )
        self.loss_ema = self.add_weight(
            shape=(),
            dtype="float32",
            initializer="zeros",
            trainable=False,
            # Replicas update it from their shares of the batch: the mean
            # of their updates is the update from the whole batch.
            aggregation="mean",
            name="loss_ema",
        )
        self._loss_tracker_ = keras.metrics.Mean(name="loss")
        self.q_loss_tracker = keras.metrics.Mean(name="q_loss")
        self.reward_tracker = keras.metrics.Mean(name="reward")
        self.epsilon_tracker = keras.metrics.Mean(name="epsilon")
        self.flops_ratio_tracker = keras.metrics.Mean(name="flops_ratio")
        self.decision_optimizer = None
        self._per_sample_loss = None
        self.built = True

    # ------------------------------------------------------------------
    # Structure.

    @property
    def num_gated_layers(self):
        """Number of gated convolutions, `L`."""
        return len(self._plan.units)

    @property
    def full_flops(self):
        """FLOPs per image of the unwrapped backbone (see `count_flops`)."""
        return self._plan.full_flops

    @property
    def gated_layers(self):
        """The gated Conv2D layers, in order."""
        return [unit.conv for unit in self._plan.units]

    def flops_from_actions(self, actions):
        """FLOPs per image for `[B, L]` actions, decision network included.

        This is the cost of what `run()` executes: every layer outside the
        gated units at full width, each gated convolution on its active
        input and output groups, the first dense layer of the head on the
        channels the last unit kept, and the decision network.
        """
        actions = tf.cast(actions, tf.float32)
        plan = self._plan
        total = plan.pre_flops + plan.head_flops + self.decision_flops
        previous = None
        for t, unit in enumerate(plan.units):
            total += unit.flops(previous, actions[:, t])
            previous = actions[:, t]
        return total + plan.head_gated_flops * previous / self.groups

    # ------------------------------------------------------------------
    # Forward pass.

    def _forward(
        self,
        images,
        actions=None,
        budget=0.0,
        epsilon=None,
        training=False,
        sliced=False,
    ):
        """Runs the network, deciding layer by layer.

        Args:
            images: `[B, H, W, C]` float tensor.
            actions: None to decide, else `[B, L]` int tensor to force.
            budget: scalar or `[B]` budget weight for greedy decisions.
            epsilon: None for greedy decisions, else the exploration rate.
            training: passed to the backbone's layers.
            sliced: compute only the active channels (inference); else run
                every channel and zero the skipped ones (training).

        Returns:
            `(outputs, actions [B, L] int32, q_values [B, L, k])`.
        """
        x = images
        for layer in self._plan.pre:
            x = layer(x, training=training)
        batch = tf.shape(images)[0]
        budget = tf.broadcast_to(tf.cast(budget, tf.float32), [batch])
        state = self.decision.initial_state(batch)
        finite_images = tf.reduce_all(tf.math.is_finite(images), axis=[1, 2, 3])
        taken, q_values = [], []
        previous = None
        last = len(self._plan.units) - 1
        for t, unit in enumerate(self._plan.units):
            q, state = self.decision.step(t, tf.stop_gradient(x), state)
            q_values.append(q)
            if actions is not None:
                action = tf.cast(actions[:, t], tf.int32)
            else:
                scores = q - budget[:, None] * self.action_cost[t][None, :]
                action = tf.argmax(scores, axis=-1, output_type=tf.int32) + 1
                # Images with NaN or Inf pixels (or non-finite Q-values,
                # where argmax means nothing) take the full network.
                finite = finite_images & tf.reduce_all(
                    tf.math.is_finite(scores), axis=-1
                )
                action = tf.where(finite, action, self.groups)
                if epsilon is not None:
                    action = self._explore(action, epsilon, t)
            taken.append(action)
            if sliced:
                x = self._call_unit_sliced(unit, x, previous, action, t == last)
            else:
                x = unit.call_masked(x, action, training=training)
            previous = action
        if not sliced:
            x = self._plan.call_head(x, training=training)
        return x, tf.stack(taken, axis=1), tf.stack(q_values, axis=1)

    def _call_unit_sliced(self, unit, x, previous, action, with_head):
        """Runs a gated unit on its active channels, image group by group.

        Images are grouped by (previous action, action), so each group runs
        one smaller dense convolution on exactly the channels its images
        use: the work done is the work `flops_from_actions` counts. Outputs
        are padded back to full width with zeros for the next layer, or, for
        the last unit, go through the head's sliced dense layer.
        """
        k = self.groups
        if unit.in_gated:
            key = (previous - 1) * k + (action - 1)
            pairs = [(i, o) for i in range(1, k + 1) for o in range(1, k + 1)]
        else:
            key = action - 1
            pairs = [(None, o) for o in range(1, k + 1)]

        def run_group(part, group):
            a_in, a_out = pairs[group]
            active_in = unit.in_channels
            if a_in is not None:
                active_in = a_in * (unit.in_channels // k)
            active_out = a_out * (unit.out_channels // k)
            y = unit.call_sliced(part, active_in, active_out)
            if with_head:
                return self._plan.call_head_sliced(y, active_out)
            padding = unit.out_channels - active_out
            if not padding:
                return y
            return tf.pad(y, [[0, 0], [0, 0], [0, 0], [0, padding]])

        def partition_positions():
            return tf.dynamic_partition(
                tf.range(tf.shape(x)[0]), key, len(pairs)
            )

        if self._graph_target == "onnx":
            positions = partition_positions()
            # No control flow, and Gathers rather than the Compress and
            # ScatterElements that dynamic_partition/stitch become.
            outputs = [
                run_group(tf.gather(x, index), group)
                for group, index in enumerate(positions)
            ]
            # Row i of the concatenated outputs belongs to image order[i].
            order = tf.concat(positions, axis=0)
            batch = tf.shape(order)[0]
            inverse = tf.scatter_nd(order[:, None], tf.range(batch), [batch])
            return tf.gather(tf.concat(outputs, axis=0), inverse)

        if with_head:
            output_shape = self._output_shape[1:]
        else:
            output_shape = unit.output_shape
        empty = tf.zeros([0, *output_shape], x.dtype)

        def grouped():
            positions = partition_positions()
            parts = tf.dynamic_partition(x, key, len(pairs))
            outputs = [
                # An empty group must not reach the convolution (see
                # GatedUnit.call_sliced); skipping it also saves the call.
                tf.cond(
                    tf.size(part) > 0,
                    lambda part=part, group=group: run_group(part, group),
                    lambda: empty,
                )
                for group, part in enumerate(parts)
            ]
            return tf.dynamic_stitch(positions, outputs)

        def uniform():
            # Every image is in one group (always so at batch 1): run it on
            # the whole batch, without splitting and merging.
            branches = [
                lambda group=group: run_group(x, group)
                for group in range(len(pairs))
            ]
            return tf.switch_case(tf.reduce_min(key), branches)

        is_uniform = tf.logical_and(
            tf.size(key) > 0, tf.reduce_min(key) == tf.reduce_max(key)
        )
        return tf.cond(is_uniform, uniform, grouped)

    def _explore(self, greedy, epsilon, layer):
        """Replaces each greedy action by a uniformly random one with
        probability `epsilon`.

        The random numbers are stateless, keyed by (seed, training step,
        layer, replica): a run resumed from a checkpoint (which holds the
        step counter) explores exactly as the uninterrupted run would, and
        replicas under a distribution strategy draw different numbers.
        """
        shape = tf.shape(greedy)
        key = tf.stack(
            [
                tf.constant(self.seed, tf.int64),
                tf.cast(self.step_counter, tf.int64),
            ]
        )
        key = tf.random.experimental.stateless_fold_in(key, layer)
        replica = tf.distribute.get_replica_context()
        if replica is not None:
            key = tf.random.experimental.stateless_fold_in(
                key, replica.replica_id_in_sync_group
            )
        explore = tf.random.stateless_uniform(shape, seed=key)
        random = tf.random.stateless_uniform(
            shape,
            seed=tf.random.experimental.stateless_fold_in(key, 1),
            minval=1,
            maxval=self.groups + 1,
            dtype=tf.int32,
        )
        return tf.where(explore < epsilon, random, greedy)

    def call(self, inputs, training=False):
        images = self._check_images(inputs)

        def forward():
            outputs, _, _ = self._forward(
                images, training=training, sliced=not training
            )
            return outputs

        def empty():
            # oneDNN convolutions mis-shape empty batches; nothing to run.
            return self._empty_outputs()["logits"]

        if images.shape[0] is not None:  # Eager, or a static batch.
            return forward() if images.shape[0] else empty()
        return tf.cond(tf.shape(images)[0] > 0, forward, empty)

    def predict(self, x, *args, **kwargs):
        """`keras.Model.predict`; an empty array gives empty outputs."""
        if isinstance(x, (np.ndarray, tf.Tensor)) and x.shape[:1] == (0,):
            return self(self._check_images(x)).numpy()
        return super().predict(x, *args, **kwargs)

    def run(self, images, actions=None, budget=0.0):
        """Runs the model and reports what each image cost.

        Args:
            images: `[B, H, W, C]` images, as the backbone takes them.
            actions: None to let the decision network decide (greedy); an
                int in `1..groups` to force it at every gated layer; or a
                `[B, L]` array of ints in `1..groups` to force per image and
                layer.
            budget: a float >= 0 (or one per image) that moves the
                trade-off at run time: `a_t = argmax_a [Q(s_t, a) - budget *
                cost_t(a)]`, where `cost_t(a) = w_t (a - 1)` is what the
                training penalty charges (`w_t = 1` for the flat penalty).
                0 is the learned policy; larger values compute less.

        Returns:
            A dict of tensors: `"logits"` `[B, classes]` (what the backbone
            outputs), `"actions"` `[B, L]` int32 in `1..groups`, `"flops"`
            `[B]` float32 (the backbone work executed plus the decision
            network) and `"q_values"` `[B, L, groups]` float32.

        Images with NaN or Inf pixels do not raise: their Q-values are not
        finite, so they take the full network (`groups` at every layer);
        their logits are whatever the backbone computes from such pixels
        (often NaN). An empty batch returns empty outputs.

        Raises:
            ValueError: for images of the wrong rank, size, channels or
                dtype, actions out of range or a negative or non-finite
                budget.
        """
        images = self._check_images(images)
        batch = images.shape[0]
        if actions is not None:
            actions = self._check_actions(actions, batch)
        budget = _check_budget(budget, batch)
        if batch == 0:
            # oneDNN convolutions mis-shape empty batches; nothing to run.
            return self._empty_outputs()
        budget = tf.broadcast_to(budget, [batch])
        if actions is None:
            return self._run_function(forced=False)(images, budget)
        return self._run_function(forced=True)(images, actions, budget)

    def _empty_outputs(self):
        steps, groups = self.num_gated_layers, self.groups
        return {
            "logits": tf.zeros((0, *self._output_shape[1:]), tf.float32),
            "actions": tf.zeros((0, steps), tf.int32),
            "flops": tf.zeros((0,), tf.float32),
            "q_values": tf.zeros((0, steps, groups), tf.float32),
        }

    def infer(self, images, actions=None, budget=0.0):
        """`run()` without input checks, as graph-friendly tensors.

        Computes only the active channel groups. Used by `run()` and the
        exporters; call `run()` unless you trace your own function.
        """
        outputs, taken, q_values = self._forward(
            images, actions=actions, budget=budget, sliced=True
        )
        return {
            "logits": outputs,
            "actions": taken,
            "flops": self.flops_from_actions(taken),
            "q_values": q_values,
        }

    def _run_function(self, forced):
        """`infer` compiled once for any batch size."""
        functions = _RUN_FUNCTIONS.setdefault(self, {})
        if forced not in functions:
            images = tf.TensorSpec(
                (None, *self._plan.input_shape), self.compute_dtype
            )
            budget = tf.TensorSpec((None,), tf.float32)
            if forced:
                actions = tf.TensorSpec((None, self.num_gated_layers), "int32")
                functions[forced] = tf.function(
                    lambda images, actions, budget: self.infer(
                        images, actions=actions, budget=budget
                    ),
                    input_signature=[images, actions, budget],
                )
            else:
                functions[forced] = tf.function(
                    lambda images, budget: self.infer(images, budget=budget),
                    input_signature=[images, budget],
                )
        return functions[forced]

    def _check_images(self, images):
        """Images as a float tensor; a clear error for the wrong rank,
        size, channels or dtype (dimensions unknown while tracing pass)."""
        images = tf.convert_to_tensor(images)
        expected = (None, *self._plan.input_shape)
        if images.shape.rank != 4 or any(
            got is not None and got != want
            for got, want in zip(images.shape[1:], expected[1:], strict=True)
        ):
            raise ValueError(
                f"Expected images of shape {expected}. Received: "
                f"images.shape={tuple(images.shape)}."
            )
        if not images.dtype.is_floating:
            raise ValueError(
                "Expected float images. Received: "
                f"images.dtype={images.dtype.name}."
            )
        return tf.cast(images, self.compute_dtype)

    def _check_actions(self, actions, batch):
        num_layers = self.num_gated_layers
        if isinstance(actions, (int, np.integer)):
            actions = np.full((batch, num_layers), actions)
        actions = np.asarray(actions)
        if actions.shape != (batch, num_layers) or not np.issubdtype(
            actions.dtype, np.integer
        ):
            raise ValueError(
                f"Expected actions as an int or an int array of shape "
                f"({batch}, {num_layers}). Received: actions with shape "
                f"{actions.shape} and dtype {actions.dtype}."
            )
        if actions.size and (actions.min() < 1 or actions.max() > self.groups):
            raise ValueError(
                f"Expected actions in 1..{self.groups}. Received: actions "
                f"from {actions.min()} to {actions.max()}."
            )
        return tf.constant(actions, tf.int32)

    # ------------------------------------------------------------------
    # Training.

    def compile(
        self,
        optimizer="rmsprop",
        decision_optimizer="adam",
        loss=None,
        metrics=None,
        **kwargs,
    ):
        """Configures training.

        Args:
            optimizer: the backbone's optimizer (fine-tuning steps).
            decision_optimizer: the decision network's optimizer (Q-learning
                steps), separate from the backbone's.
            loss: the classification loss. Defaults to sparse categorical
                cross-entropy, from logits unless the backbone ends in a
                softmax. Its per-image value also makes the final reward.
            metrics: as in `keras.Model.compile`; defaults to
                `["accuracy"]`.
            **kwargs: other `keras.Model.compile` arguments.
        """
        if loss is None:
            loss = keras.losses.SparseCategoricalCrossentropy(
                from_logits=not self.ends_in_softmax
            )
        if metrics is None:
            metrics = ["accuracy"]
        super().compile(
            optimizer=optimizer, loss=loss, metrics=metrics, **kwargs
        )
        loss_object = keras.losses.get(loss)
        if isinstance(loss_object, keras.losses.Loss):
            self._per_sample_loss = loss_object.call
        else:
            self._per_sample_loss = loss_object
        self.decision_optimizer = keras.optimizers.get(decision_optimizer)
        self.optimizer.build(self.backbone.trainable_variables)
        self.decision_optimizer.build(self.decision.trainable_variables)

    @property
    def metrics(self):
        ours = [
            self._loss_tracker_,
            self.q_loss_tracker,
            self.reward_tracker,
            self.epsilon_tracker,
            self.flops_ratio_tracker,
        ]
        others = [
            m
            for m in super().metrics
            if m.name != "loss" and all(m is not o for o in ours)
        ]
        return [ours[0], *others, *ours[1:]]

    def epsilon(self):
        """The exploration rate at the current decision step."""
        return linearly_decaying_epsilon(
            self.decision_step_counter,
            self.epsilon_decay_steps,
            self.epsilon_start,
            self.epsilon_end,
        )

    def alpha(self):
        """Weight of the classification loss in the final reward."""
        return 1.0 / tf.maximum(self.loss_ema, 1e-6)

    def in_decision_phase(self):
        """True when the next training step updates the decision network."""
        period = self.decision_steps + self.backbone_steps
        return tf.math.floormod(self.step_counter, period) < self.decision_steps

    def make_train_function(self, force=False):
        """Under a strategy with several replicas, one compiled function per
        phase, chosen on the host before each step.

        The optimizers' updates are synchronization points between
        replicas, which tf.distribute does not allow inside a `tf.cond`;
        on one device the phase is picked inside the graph instead.
        """
        replicas = self.distribute_strategy.num_replicas_in_sync
        if replicas == 1 or (self.train_function is not None and not force):
            return super().make_train_function(force)
        if self.steps_per_execution > 1:
            raise ValueError(
                "RNPModel trains with steps_per_execution=1 under a "
                f"distribution strategy ({replicas} replicas). Received: "
                f"steps_per_execution={self.steps_per_execution}."
            )
        functions = {}
        for phase in ("decision", "backbone"):
            super().make_train_function(force=True)
            functions[phase] = self.train_function

        def train_function(iterator):
            decision = bool(self.in_decision_phase().numpy())
            phase = "decision" if decision else "backbone"
            # Read by train_step when the function is traced.
            self._phase = phase
            try:
                return functions[phase](iterator)
            finally:
                self._phase = None

        self.train_function = train_function
        return train_function

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        phase = getattr(self, "_phase", None)
        if self.decision_steps == 0 or phase == "backbone":
            self._backbone_step(x, y, sample_weight)
        elif self.backbone_steps == 0 or phase == "decision":
            self._decision_step(x, y, sample_weight)
        else:
            tf.cond(
                self.in_decision_phase(),
                lambda: self._decision_step(x, y, sample_weight),
                lambda: self._backbone_step(x, y, sample_weight),
            )
        self.step_counter.assign_add(1)
        return self.get_metrics_result()

    def _decision_step(self, x, y, sample_weight):
        """One Q-learning update of the decision network (backbone frozen)."""
        epsilon = self.epsilon()
        with tf.GradientTape() as tape:
            logits, actions, q_values = self._forward(
                x, epsilon=epsilon, training=False
            )
            q_loss, episode_return = self._q_learning_loss(
                y, logits, actions, q_values
            )
            # Gradients are summed over replicas: scale each one's share.
            scaled = q_loss / _num_replicas()
        variables = self.decision.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.decision_optimizer.apply(gradients, variables)
        self.decision_step_counter.assign_add(1)
        self.q_loss_tracker.update_state(q_loss)
        self.reward_tracker.update_state(episode_return)
        self.epsilon_tracker.update_state(epsilon)
        self._update_metrics(x, y, logits, actions, sample_weight)
        return tf.constant(0)

    def _q_learning_loss(self, y, logits, actions, q_values):
        """Q-learning loss and the mean episode return.

        Rewards: `r_t = -p w_t (a_t - 1)`, and the last step also gets
        `-alpha * L_cls`. Target: `y_t = r_t + gamma * max_a Q(s_{t+1}, a)`
        for `t < L`, `y_L = r_L`, held constant. Loss: the mean of
        `(y_t - Q(s_t, a_t))^2` over the batch and the steps.
        """
        cls_loss = tf.cast(self._per_sample_loss(y, logits), tf.float32)
        self._recalibrate_alpha(cls_loss)
        index = actions - 1
        rewards = -self.penalty * _gather_per_layer(
            tf.constant(self.action_cost), index
        )
        final = (
            tf.one_hot(self.num_gated_layers - 1, self.num_gated_layers)[
                None, :
            ]
            * (-self.alpha() * cls_loss)[:, None]
        )
        rewards += final
        next_values = tf.reduce_max(q_values[:, 1:], axis=-1)
        bootstrap = tf.concat(
            [self.gamma * next_values, tf.zeros_like(next_values[:, :1])],
            axis=1,
        )
        targets = tf.stop_gradient(rewards + bootstrap)
        taken = tf.gather(q_values, index, batch_dims=2)
        loss = tf.reduce_mean(tf.square(targets - taken))
        return loss, tf.reduce_mean(tf.reduce_sum(rewards, axis=1))

    def _recalibrate_alpha(self, cls_loss):
        mean = tf.reduce_mean(cls_loss)
        momentum = tf.where(self.loss_ema > 0, self.alpha_momentum, 0.0)
        self.loss_ema.assign(momentum * self.loss_ema + (1 - momentum) * mean)

    def _backbone_step(self, x, y, sample_weight):
        """One fine-tuning update of the backbone under the decisions."""
        epsilon = self.backbone_epsilon or None
        with tf.GradientTape() as tape:
            logits, actions, _ = self._forward(
                x, epsilon=epsilon, training=True
            )
            loss = self.compute_loss(
                x=x,
                y=y,
                y_pred=logits,
                sample_weight=sample_weight,
                training=True,
            )
            total = loss
            if self.distillation:
                total = self._distillation_loss(
                    x, y, logits, loss, sample_weight
                )
            scaled = self.optimizer.scale_loss(total)
        variables = self.backbone.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply(gradients, variables)
        self._update_metrics(x, y, logits, actions, sample_weight, loss)
        return tf.constant(0)

    def _distillation_loss(self, x, y, logits, loss, sample_weight):
        """`L(y, full) + (1 - d) L(y, path) + d H(full, path)`, from
        `loss = L(y, path)` as `compute_loss` gave it (so the model's
        regularization losses are counted once, unscaled)."""
        batch = tf.shape(x)[0]
        full, _, _ = self._forward(
            x,
            actions=tf.fill([batch, self.num_gated_layers], self.groups),
            training=True,
        )
        if self.ends_in_softmax:
            teacher = full
            log_student = tf.math.log(tf.maximum(logits, 1e-7))
        else:
            teacher = tf.nn.softmax(full)
            log_student = tf.nn.log_softmax(logits)
        teacher = tf.stop_gradient(tf.cast(teacher, tf.float32))
        soft = -tf.reduce_sum(
            teacher * tf.cast(log_student, tf.float32), axis=-1
        )
        hard = tf.cast(self._per_sample_loss(y, logits), tf.float32)
        full_loss = tf.cast(self._per_sample_loss(y, full), tf.float32)
        per_image = full_loss + self.distillation * (soft - hard)
        if sample_weight is not None:
            per_image *= tf.cast(tf.reshape(sample_weight, [-1]), tf.float32)
        # As compute_loss does: the batch mean, divided among the replicas.
        extra = tf.reduce_mean(per_image) / _num_replicas()
        return loss + tf.cast(extra, loss.dtype)

    def _update_metrics(self, x, y, logits, actions, sample_weight, loss=None):
        if loss is None:
            loss = self.compute_loss(
                x=x,
                y=y,
                y_pred=logits,
                sample_weight=sample_weight,
                training=False,
            )
        # compute_loss() divides by the number of replicas (for summed
        # gradients); report the loss itself.
        self._loss_tracker_.update_state(loss * _num_replicas())
        self.flops_ratio_tracker.update_state(
            self.flops_from_actions(actions) / self.full_flops
        )
        super().compute_metrics(x, y, logits, sample_weight)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        logits, actions, _ = self._forward(x, sliced=True)
        self._update_metrics(x, y, logits, actions, sample_weight)
        decision_only = ("q_loss", "reward", "epsilon")
        return {
            name: value
            for name, value in self.get_metrics_result().items()
            if name not in decision_only
        }

    # ------------------------------------------------------------------
    # Serialization.

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "groups": self.groups,
            "penalty": self.penalty,
            "penalty_mode": self.penalty_mode,
            "gamma": self.gamma,
            "epsilon_start": self.epsilon_start,
            "epsilon_end": self.epsilon_end,
            "epsilon_decay_steps": self.epsilon_decay_steps,
            "backbone_epsilon": self.backbone_epsilon,
            "distillation": self.distillation,
            "decision_steps": self.decision_steps,
            "backbone_steps": self.backbone_steps,
            "code_dim": self.code_dim,
            "hidden_units": self.hidden_units,
            "gate_first": self.gate_first,
            "alpha_momentum": self.alpha_momentum,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def save(self, filepath, overwrite=True, **kwargs):
        """Saves like `keras.Model.save`, atomically.

        The model is written to a temporary file beside `filepath`, then
        renamed into place: a crash during the write leaves a previous
        file at `filepath` intact.
        """
        if os.path.exists(filepath) and not overwrite:
            raise ValueError(
                "Expected a new file (or overwrite=True). Received: "
                f"filepath={os.fspath(filepath)!r}, which exists."
            )
        with io_utils.atomic_path(filepath) as staging:
            super().save(staging, **kwargs)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config is not None and self.decision_optimizer is not None:
            config["decision_optimizer"] = keras.saving.serialize_keras_object(
                self.decision_optimizer
            )
        return config

    def compile_from_config(self, config):
        self.compile(**keras.saving.deserialize_keras_object(config))


def _num_replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def _gather_per_layer(table, index):
    """`table[t, index[b, t]]` for a `[L, k]` table and `[B, L]` index."""
    one_hot = tf.one_hot(index, tf.shape(table)[1], dtype=table.dtype)
    return tf.reduce_sum(one_hot * table[None], axis=-1)


def _ends_in_softmax(head):
    last = head[-1]
    if isinstance(last, keras.layers.Softmax):
        return True
    activation = getattr(last, "activation", None)
    return getattr(activation, "__name__", None) == "softmax"


def _check_backend():
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "keras_rnp needs the TensorFlow backend of Keras 3 (set "
            "KERAS_BACKEND=tensorflow). Received: "
            f"backend={keras.backend.backend()}."
        )


def _check_int(name, value, minimum):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        raise ValueError(
            f"{name} must be an integer >= {minimum}. Received: "
            f"{name}={value!r}."
        )


def _check_number(name, value, minimum=None, maximum=None):
    ok = (
        isinstance(value, (int, float, np.number))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (minimum is None or value >= minimum)
        and (maximum is None or value <= maximum)
    )
    if not ok:
        bounds = (
            f"in [{minimum}, {maximum}]"
            if maximum is not None
            else f">= {minimum}"
        )
        raise ValueError(
            f"{name} must be a finite number {bounds}. Received: "
            f"{name}={value!r}."
        )


def _check_budget(budget, batch):
    values = np.asarray(budget, dtype=np.float64)
    if values.ndim > 1 or (values.ndim == 1 and values.shape[0] != batch):
        raise ValueError(
            f"budget must be a number or one number per image ({batch}). "
            f"Received: budget with shape {values.shape}."
        )
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(
            f"budget must be finite and >= 0. Received: budget={budget!r}."
        )
    return tf.constant(values, tf.float32)
