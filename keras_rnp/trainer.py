"""Algorithm 1 inside Keras `fit`: the trainer half of `RNPModel`.

`RNPTrainer` is a mixin, as Keras keeps its `Trainer` apart from `Model`:
compile (two optimizers), the metrics, the phase of each step, the
per-replica train functions, the Q-learning step, the fine-tuning step and
the test step. The learning math itself is in `keras_rnp.q_learning`;
the model (`keras_rnp.rnp_model`) holds the state this reads and updates.
"""

import functools
import warnings

import keras
import tensorflow as tf

from keras_rnp import execution
from keras_rnp import q_learning
from keras_rnp.policy import linearly_decaying_epsilon
from keras_rnp.policy import random_actions

PHASES = ("decision", "backbone")


class RNPTrainer:
    """Training for `RNPModel`: the paper's Algorithm 1 in `fit`.

    Training steps alternate between `decision_steps` Q-learning updates
    of the decision network (backbone frozen, epsilon-greedy) and
    `backbone_steps` fine-tuning updates of the backbone (decision network
    frozen), round after round. The host class provides `forward`,
    `flops_from_actions`, `backbone`, `decision`, the step counters and
    `loss_ema`, and the hyper-parameters.
    """

    def _init_trainer(self):
        self._loss_tracker_ = keras.metrics.Mean(name="loss")
        self.q_loss_tracker = keras.metrics.Mean(name="q_loss")
        self.reward_tracker = keras.metrics.Mean(name="reward")
        self.epsilon_tracker = keras.metrics.Mean(name="epsilon")
        self.flops_ratio_tracker = keras.metrics.Mean(name="flops_ratio")
        self.decision_optimizer = None
        self._per_sample_loss = None

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
        if self.dtype_policy.name == "mixed_float16" and not isinstance(
            self.decision_optimizer, keras.optimizers.LossScaleOptimizer
        ):
            # As compile() does for the backbone's optimizer.
            self.decision_optimizer = keras.optimizers.LossScaleOptimizer(
                self.decision_optimizer
            )
        self.optimizer.build(self._network_variables())
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
        return q_learning.alpha(self.loss_ema)

    def in_decision_phase(self):
        """True when the next training step updates the decision network."""
        return q_learning.in_decision_phase(
            self.step_counter, self.decision_steps, self.backbone_steps
        )

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`, running Algorithm 1's phases; warns when one
        of the two phases never ran (too few steps for `decision_steps`
        and `backbone_steps`)."""
        start = int(self.step_counter.numpy())
        history = super().fit(*args, **kwargs)
        _warn_if_a_phase_never_ran(
            start,
            int(self.step_counter.numpy()),
            self.decision_steps,
            self.backbone_steps,
        )
        return history

    def make_train_function(self, force=False):
        """Under a distribution strategy, one compiled function per phase,
        chosen on the host before each step.

        The optimizers' updates and the assignments of mirrored variables
        are synchronization points between replicas, which tf.distribute
        does not allow inside a `tf.cond` (even with one replica); without
        a strategy the phase is picked inside the graph instead.
        """
        if not self._distributed() or (
            self.train_function is not None and not force
        ):
            return super().make_train_function(force)
        functions = {
            phase: self._step_function(
                functools.partial(self._train_step, phase=phase)
            )
            for phase in PHASES
        }

        def train_function(iterator):
            decision = bool(self.in_decision_phase().numpy())
            logs = functions["decision" if decision else "backbone"](iterator)
            if decision and self.target_decision is not None:
                steps = int(self.decision_step_counter.numpy())
                if steps % self.target_update_steps == 0:
                    self._refresh_target(True)
            return logs

        self.train_function = train_function
        return train_function

    def _distributed(self):
        """Whether the model was built under a tf.distribute strategy
        (Keras keeps it in `_distribute_strategy`), or runs on several
        replicas."""
        strategy = getattr(self, "_distribute_strategy", None)
        replicas = self.distribute_strategy.num_replicas_in_sync
        return strategy is not None or replicas > 1

    @tf.autograph.experimental.do_not_convert
    def train_step(self, data):
        return self._train_step(data, phase=None)

    def _train_step(self, data, phase):
        """One step of Algorithm 1; `phase` None picks it in the graph."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
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
            logits, actions, q_values, *target_q = self.forward(
                x,
                epsilon=epsilon,
                training=False,
                target_decision=self.target_decision,
            )
            cls_loss = tf.cast(self._per_sample_loss(y, logits), tf.float32)
            self.loss_ema.assign(
                q_learning.updated_loss_mean(
                    self.loss_ema, cls_loss, self.alpha_momentum
                )
            )
            rewards = q_learning.rewards(
                actions, self.action_cost, self.penalty, cls_loss, self.alpha()
            )
            targets = q_learning.targets(
                rewards,
                q_values,
                self.gamma,
                target_q[0] if target_q else None,
                double=self.double_dqn,
            )
            q_loss = q_learning.q_loss(q_values, actions, targets)
            # Gradients are summed over replicas: scale each one's share.
            scaled = self.decision_optimizer.scale_loss(
                q_loss / _num_replicas()
            )
        variables = self.decision.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.decision_optimizer.apply(gradients, variables)
        self.decision_step_counter.assign_add(1)
        if self.target_decision is not None and not self._distributed():
            # Under a strategy the host does it (make_train_function).
            due = tf.math.floormod(
                self.decision_step_counter, self.target_update_steps
            )
            self._refresh_target(tf.equal(due, 0))
        self.q_loss_tracker.update_state(q_loss)
        self.reward_tracker.update_state(q_learning.episode_return(rewards))
        self.epsilon_tracker.update_state(epsilon)
        self._update_metrics(x, y, logits, actions, sample_weight)
        return tf.constant(0)

    def _refresh_target(self, due):
        """Copies the decision network into the target network where
        `due` (a bool or a scalar bool tensor)."""
        pairs = zip(
            self.target_decision.weights, self.decision.weights, strict=True
        )
        for target, online in pairs:
            if due is True:
                target.assign(online)
            else:
                target.assign(tf.where(due, online, target))

    def _backbone_step(self, x, y, sample_weight):
        """One fine-tuning update of the backbone under the decisions."""
        if self.sandwich_paths or self.fixed_paths:
            return self._sandwich_step(x, y, sample_weight)
        epsilon = self.backbone_epsilon or None
        with tf.GradientTape() as tape:
            logits, actions, _ = self.forward(x, epsilon=epsilon, training=True)
            loss = self._loss(x, y, logits, sample_weight, training=True)
            total = loss
            if self.distillation:
                total = loss + self._distillation_loss(
                    x, y, logits, sample_weight, loss.dtype
                )
            scaled = self.optimizer.scale_loss(total)
        self._update_backbone(tape, scaled)
        self._update_metrics(x, y, logits, actions, sample_weight, loss)
        return tf.constant(0)

    def _network_variables(self):
        """What fine-tuning trains: the backbone's variables and the
        per-width gammas and betas (`width_aware_affine`), if any."""
        variables = list(self.backbone.trainable_variables)
        for norm in self.width_norms:
            variables += norm.trainable_variables
        return variables

    def _update_backbone(self, tape, scaled_loss):
        variables = self._network_variables()
        gradients = tape.gradient(scaled_loss, variables)
        self.optimizer.apply(gradients, variables)

    def _sandwich_step(self, x, y, sample_weight):
        """One supernet update of the backbone (the sandwich rule).

        The full path learns from the labels; the narrowest path (one
        group everywhere) and `sandwich_paths - 1` paths drawn at random
        per image and layer, if `sandwich_paths`, and every one of
        `fixed_paths` learn from the full path's predictions, held
        constant (in-place distillation). One optimizer update for the sum.
        """
        batch = tf.shape(x)[0]
        layers, groups = self.num_gated_layers, self.groups
        full_actions = tf.fill([batch, layers], groups)
        paths = [
            tf.tile(tf.constant([path], tf.int32), [batch, 1])
            for path in self.fixed_paths
        ]
        if self.sandwich_paths:
            paths += [tf.fill([batch, layers], 1)] + [
                random_actions(
                    batch, layers, groups, self.seed, self.step_counter, s
                )
                for s in range(self.sandwich_paths - 1)
            ]
        from_logits = not self.ends_in_softmax
        with tf.GradientTape() as tape:
            full, _, _ = self.forward(x, actions=full_actions, training=True)
            loss = self._loss(x, y, full, sample_weight, training=True)
            extra = 0.0
            for actions in paths:
                logits, _, _ = self.forward(x, actions=actions, training=True)
                soft = q_learning.soft_cross_entropy(full, logits, from_logits)
                extra += _weighted_mean(soft, sample_weight)
            # As compute_loss does: divided among the replicas.
            total = loss + tf.cast(extra / _num_replicas(), loss.dtype)
            scaled = self.optimizer.scale_loss(total)
        self._update_backbone(tape, scaled)
        self._update_metrics(x, y, full, full_actions, sample_weight, loss)
        return tf.constant(0)

    def _distillation_loss(self, x, y, logits, sample_weight, dtype):
        """What in-place distillation adds to `compute_loss`'s `L(y, path)`
        (so that the model's regularization losses count once, unscaled):
        see `q_learning.distillation_per_image`."""
        batch = tf.shape(x)[0]
        full, _, _ = self.forward(
            x,
            actions=tf.fill([batch, self.num_gated_layers], self.groups),
            training=True,
        )
        per_image = q_learning.distillation_per_image(
            hard=self._per_sample_loss(y, logits),
            full_hard=self._per_sample_loss(y, full),
            student=logits,
            teacher=full,
            weight=self.distillation,
            from_logits=not self.ends_in_softmax,
        )
        # As compute_loss does: the batch mean, divided among the replicas.
        extra = _weighted_mean(per_image, sample_weight) / _num_replicas()
        return tf.cast(extra, dtype)

    def _loss(self, x, y, logits, sample_weight, training):
        return self.compute_loss(
            x=x,
            y=y,
            y_pred=logits,
            sample_weight=sample_weight,
            training=training,
        )

    def _update_metrics(self, x, y, logits, actions, sample_weight, loss=None):
        if loss is None:
            loss = self._loss(x, y, logits, sample_weight, training=False)
        # compute_loss() divides by the number of replicas (for summed
        # gradients); report the loss itself.
        self._loss_tracker_.update_state(loss * _num_replicas())
        self.flops_ratio_tracker.update_state(
            self.flops_from_actions(actions) / self.full_flops
        )
        super().compute_metrics(x, y, logits, sample_weight)

    @tf.autograph.experimental.do_not_convert
    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        logits, actions, _ = self.forward(x, mode=execution.SLICED)
        self._update_metrics(x, y, logits, actions, sample_weight)
        decision_only = ("q_loss", "reward", "epsilon")
        return {
            name: value
            for name, value in self.get_metrics_result().items()
            if name not in decision_only
        }

    def get_compile_config(self):
        config = super().get_compile_config()
        if config is not None and self.decision_optimizer is not None:
            config["decision_optimizer"] = keras.saving.serialize_keras_object(
                self.decision_optimizer
            )
        return config

    def compile_from_config(self, config):
        self.compile(**keras.saving.deserialize_keras_object(config))


def _warn_if_a_phase_never_ran(start, end, decision_steps, backbone_steps):
    if end <= start:
        return
    decision_before, backbone_before = q_learning.phase_counts(
        start, decision_steps, backbone_steps
    )
    decision_after, backbone_after = q_learning.phase_counts(
        end, decision_steps, backbone_steps
    )
    missing = []
    if decision_steps and decision_after == decision_before:
        missing.append("the decision network was not trained")
    if backbone_steps and backbone_after == backbone_before:
        missing.append("the backbone was not fine-tuned")
    if missing:
        warnings.warn(
            f"RNPModel.fit ran {end - start} training steps (steps {start} "
            f"to {end - 1}), all in one phase of Algorithm 1 "
            f"(decision_steps={decision_steps}, then "
            f"backbone_steps={backbone_steps}, per round): "
            f"{' and '.join(missing)}. Use smaller decision_steps and "
            "backbone_steps (a fraction of an epoch's steps) or train "
            "for more steps.",
            stacklevel=3,
        )


def _weighted_mean(per_image, sample_weight):
    """The batch mean of `[B]` values, weighted per image if given."""
    if sample_weight is not None:
        per_image *= tf.cast(tf.reshape(sample_weight, [-1]), tf.float32)
    return tf.reduce_mean(per_image)


def _num_replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync
