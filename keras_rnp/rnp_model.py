"""RNPModel: a CNN with runtime channel pruning.

The model half: its configuration, the state that training updates (step
counters, the running loss mean), the forward pass (`call`, `run`,
`infer`) and serialization. The layers it is made of are in
`keras_rnp.layers`, how they run in `keras_rnp.execution`, the decisions
in `keras_rnp.policy`, and training (Algorithm 1) in `keras_rnp.trainer`.
"""

import inspect
import os
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_rnp import distribute
from keras_rnp import execution
from keras_rnp import flops as flops_lib
from keras_rnp import io_utils
from keras_rnp import planner
from keras_rnp import policy
from keras_rnp import residual_planner
from keras_rnp import validation
from keras_rnp.layers.decision_network import DecisionNetwork
from keras_rnp.trainer import RNPTrainer

# Compiled run() functions, kept outside the models so that they are not
# tracked (and saved) as part of them.
_RUN_FUNCTIONS = weakref.WeakKeyDictionary()


@keras.saving.register_keras_serializable(package="keras_rnp")
class RNPModel(RNPTrainer, distribute.MultiWorkerFit, keras.Model):
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
        backbone: the plain Keras model (a chain or residual CNN, see
            `keras_rnp.wrap`).
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
        width_aware_bn: give each batch norm inside a gated unit one set
            of statistics per input width (the previous gated layer's
            action), so that every width is normalised with its own
            statistics in training, inference and the exports; False (the
            paper) shares one set across widths.
        width_aware_affine: with `width_aware_bn`, also give each input
            width its own batch-norm gamma and beta (trainable, starting
            from the batch norm's), as slimmable networks' private batch
            norms do.
        sandwich_paths: supernet training in the fine-tuning steps, the
            sandwich rule of slimmable networks: with `n > 0` each step
            trains the full path on the labels and `n` narrower paths
            (the narrowest, one group everywhere, and `n - 1` drawn at
            random per image and layer) on the full path's predictions,
            in one update, about `n + 1` times the work of a plain step.
            With `decision_steps=0` this is a supernet stage that trains
            every width before the decision network. 0 (the paper)
            fine-tunes the path the decision network takes.
        fixed_paths: paths (each one action per gated layer, ints in
            `1..groups`) that every fine-tuning step trains on the full
            path's predictions, beside the full path on the labels and
            any `sandwich_paths`, in place of the path the decision
            network takes (`backbone_epsilon` then does nothing): the
            shared weights fine-tuned for chosen operating points
            (`keras_rnp.choose_path`), about `len(fixed_paths) +
            sandwich_paths + 1` times the work of a plain step. () (the
            paper) trains none.
        target_update_steps: DQN's target network: with `n > 0` the
            Q-learning targets come from a copy of the decision network,
            refreshed every `n` decision steps; 0 (the paper) bootstraps
            from the network being trained.
        double_dqn: Double DQN targets: the decision network picks the
            next action, the target network values it.
        default_path: None (the paper), or one action per gated layer
            (ints in `1..groups`) that the greedy decisions keep unless an
            image's Q-values prefer another by more than `path_margin`:
            `a_t = argmax_a [Q(s_t, a) - budget * cost_t(a) + path_margin
            * [a == path_t]]`, in `run()`, `predict()`, training and every
            export (`keras_rnp.choose_path` picks both on validation data).
        path_margin: a number in `[0, 1e30]`; 0 is the learned policy,
            `keras_rnp.policy.FIXED_PATH_MARGIN` the fixed path (budget 0).
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
        width_aware_bn=False,
        width_aware_affine=False,
        sandwich_paths=0,
        fixed_paths=(),
        target_update_steps=0,
        double_dqn=False,
        default_path=None,
        path_margin=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        validation.check_backend()
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        validation.check_model_arguments(locals())
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
        self.width_aware_bn = bool(width_aware_bn)
        self.width_aware_affine = bool(width_aware_affine)
        self.sandwich_paths = int(sandwich_paths)
        self.target_update_steps = int(target_update_steps)
        self.double_dqn = bool(double_dqn)
        if seed is None:
            # Drawn from NumPy's global generator, which
            # keras.utils.set_random_seed seeds; kept in the config.
            seed = int(np.random.randint(0, 2**31 - 1))
        self.seed = seed

        plan = planner.plan_chain
        if planner.is_residual(backbone):
            plan = residual_planner.plan_residual
        self._plan = plan(
            backbone,
            self.groups,
            gate_first=self.gate_first,
            width_aware=self.width_aware_bn,
            width_affine=self.width_aware_affine,
        )
        # Per-width batch-norm statistics (tracked here, so saved).
        self.width_norms = [
            norm
            for unit in self._plan.units
            for norm in unit.width_norms.values()
        ]
        in_channels = [unit.in_channels for unit in self._plan.units]
        self.fixed_paths = tuple(
            validation.check_path(
                f"fixed_paths[{i}]", path, len(in_channels), self.groups
            )
            for i, path in enumerate(fixed_paths)
        )
        self.set_default_path(default_path, path_margin)
        self.decision = DecisionNetwork(
            in_channels,
            self.groups,
            code_dim=self.code_dim,
            hidden_units=self.hidden_units,
            name="decision",
        )
        self.decision.build()
        # DQN's target network: a copy of the decision network, refreshed
        # every target_update_steps decision steps (None: the paper).
        self.target_decision = None
        if self.target_update_steps:
            self.target_decision = self.decision.copy("target_decision")
        self.decision_flops = flops_lib.decision_flops(
            in_channels, self.code_dim, self.hidden_units, self.groups
        )
        # cost_t(a) = w_t * (a - 1): what the penalty charges for action a.
        self.action_cost = policy.action_costs(
            self._plan.gated_flops, self.groups, penalty_mode
        )
        # Whether the backbone outputs probabilities rather than logits.
        self.ends_in_softmax = self._plan.ends_in_softmax
        # Training state, saved with the model.
        # Every replica counts the same steps: keep one count. Replicas
        # update the loss mean from their shares of the batch: the mean of
        # their updates is the update from the whole batch.
        self.step_counter = self._state("step_counter", "int64")
        self.decision_step_counter = self._state(
            "decision_step_counter", "int64"
        )
        self.loss_ema = self._state("loss_ema", "float32", aggregation="mean")
        self._init_trainer()
        self.built = True

    def _state(self, name, dtype, aggregation="only_first_replica"):
        """A scalar training-state variable, saved with the model."""
        return self.add_weight(
            shape=(),
            dtype=dtype,
            initializer="zeros",
            trainable=False,
            aggregation=aggregation,
            name=name,
        )

    # ------------------------------------------------------------------
    # Structure.

    @property
    def plan(self):
        """The `keras_rnp.planner.Plan`: the backbone cut into the layers
        before the gated units, the units (`GatedConv2D`) and the head."""
        return self._plan

    @property
    def image_shape(self):
        """`(H, W, C)` of one input image."""
        return self._plan.image_shape

    @property
    def num_gated_layers(self):
        """Number of decision steps `L`: the gated convolutions of a chain,
        the gated blocks of a residual network."""
        return len(self._plan.units)

    @property
    def full_flops(self):
        """FLOPs per image of the unwrapped backbone (see `count_flops`)."""
        return self._plan.full_flops

    @property
    def gated_layers(self):
        """The Conv2D layers whose output channels are gated, in order."""
        return self._plan.gated_convs

    def flops_from_actions(self, actions):
        """FLOPs per image for `[B, L]` actions, decision network included.

        This is the cost of what `run()` executes: every layer outside the
        gated units at full width, each gated convolution on its active
        input and output groups, the first dense layer of the head on the
        channels the last unit kept, and the decision network.
        """
        actions = tf.cast(actions, tf.float32)
        return self._plan.path_flops(actions, extra_flops=self.decision_flops)

    def set_default_path(self, path, margin=0.0):
        """Sets `default_path` (None, or `L` ints in `1..groups`) and
        `path_margin` (a number in `[0, 1e30]`), as in the class doc;
        `keras_rnp.choose_path` picks both. Saved with the model; exports
        made afterwards use them. Raises a ValueError for bad values."""
        path, margin = validation.check_default_path(
            path, margin, len(self._plan.units), self.groups
        )
        self.default_path, self.path_margin = path, margin
        # A NumPy array: traced functions embed it as a constant.
        self._path_bonus = policy.path_bonus(path, margin, self.groups)
        # Compiled functions embed the old path: run()'s are traced again;
        # Keras' are made again, the train function in place (fit() reads
        # it every step, so a change inside fit() applies from the next).
        _RUN_FUNCTIONS.pop(self, None)
        for name in ("train_function", "test_function", "predict_function"):
            if getattr(self, name, None) is not None:
                getattr(self, f"make_{name}")(force=True)

    # ------------------------------------------------------------------
    # Forward pass.

    @tf.autograph.experimental.do_not_convert
    def forward(
        self,
        images,
        actions=None,
        budget=0.0,
        epsilon=None,
        training=False,
        mode=execution.MASKED,
        target_decision=None,
    ):
        """Runs the network, deciding layer by layer (no input checks).

        Args:
            images: `[B, H, W, C]` float tensor.
            actions: None to decide, else `[B, L]` int tensor to force.
            budget: scalar or `[B]` budget weight for greedy decisions.
            epsilon: None for greedy decisions, else the exploration rate.
            training: passed to the backbone's layers.
            mode: `keras_rnp.execution.MASKED` (every channel computed, the
                skipped ones zeroed: training), `SLICED` (only the active
                channels: inference), `SLICED_BLOCKS`, `SLICED_PREFIXES` or
                `SLICED_ONNX` (for LiteRT and ONNX: `keras_rnp.execution`).
            target_decision: a decision network to step beside the
                model's on the same states (DQN's target network).

        Returns:
            `(outputs, actions [B, L] int32, q_values [B, L, k])`, and the
            target network's Q-values last when `target_decision` is given.
        """
        if actions is not None:

            def choose(t, q):
                return tf.cast(actions[:, t], tf.int32)

        else:
            batch = tf.shape(images)[0]
            budget = tf.broadcast_to(tf.cast(budget, tf.float32), [batch])
            # Checked before the cast to the compute dtype: onnxruntime has
            # no IsInf for float16.
            finite = tf.reduce_all(tf.math.is_finite(images), axis=[1, 2, 3])

            bonus = self._path_bonus

            def choose(t, q):
                action = policy.greedy_actions(
                    q,
                    budget,
                    self.action_cost[t],
                    finite,
                    None if bonus is None else bonus[t],
                )
                if epsilon is not None:
                    step = self.step_counter
                    action = policy.explore(
                        action, epsilon, self.groups, self.seed, step, t
                    )
                return action

        return execution.forward(
            self._plan,
            self.decision,
            tf.cast(images, self.compute_dtype),
            choose,
            mode=mode,
            training=training,
            target_decision=target_decision,
        )

    def call(self, inputs, training=False):
        images = self._check_images(inputs)
        mode = execution.MASKED if training else execution.SLICED
        return execution.unless_empty(
            images,
            lambda: self.forward(images, training=training, mode=mode)[0],
            lambda: execution.empty_outputs(self._plan)["logits"],
        )

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
                0 is the learned policy; larger values compute less. With
                a default path, `path_margin * [a == path_t]` is added
                inside the argmax (see `set_default_path`).

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
            actions = validation.check_actions(
                actions, batch, self.num_gated_layers, self.groups
            )
        budget = validation.check_budget(budget, batch)

        def run():
            all_budgets = tf.broadcast_to(budget, [batch])
            if actions is None:
                return self._run_function(forced=False)(images, all_budgets)
            return self._run_function(forced=True)(images, actions, all_budgets)

        return execution.unless_empty(
            images, run, lambda: execution.empty_outputs(self._plan)
        )

    def infer(self, images, actions=None, budget=0.0, mode=execution.SLICED):
        """`run()` without input checks, as graph-friendly tensors.

        Computes only the active channel groups. Used by `run()` and the
        exporters (`mode=execution.SLICED_ONNX` for ONNX, `SLICED_PREFIXES`
        or `SLICED_BLOCKS` for LiteRT); call `run()` unless you trace your
        own function.
        """
        outputs, taken, q_values = self.forward(
            images, actions=actions, budget=budget, mode=mode
        )
        return {
            "logits": outputs,
            "actions": taken,
            "flops": self.flops_from_actions(taken),
            "q_values": q_values,
        }

    def set_weights(self, weights):
        """Sets the weights as `get_weights()` lists them, keeping the
        training progress.

        The step counters (so Algorithm 1's phase and the epsilon
        schedule's position) and the running loss mean keep their current
        values: restoring earlier network weights, as
        `keras.callbacks.EarlyStopping(restore_best_weights=True)` does,
        must not move training backwards. Checkpoints (`save`,
        `load_weights`, `BackupAndRestore`) restore them with the rest.
        """
        progress = [self.step_counter, self.decision_step_counter]
        progress.append(self.loss_ema)
        values = [variable.numpy() for variable in progress]
        super().set_weights(weights)
        for variable, value in zip(progress, values, strict=True):
            variable.assign(value)

    def export(self, filepath, format="tf_saved_model", **kwargs):
        """Not supported: use `keras_rnp.export_saved_model` or
        `keras_rnp.export_onnx`.

        Keras' exporter traces `call()` alone: it would drop the budget and
        forced-actions signatures and the `actions` and `flops` outputs.

        Raises:
            ValueError: always, naming the functions to use.
        """
        raise ValueError(
            "RNPModel.export() is not supported: it would export call() "
            "alone, without the budget, actions and flops. Use "
            "keras_rnp.export_saved_model(rnp, path) (a SavedModel for TF "
            "Serving) or keras_rnp.export_onnx(rnp, path). Received: "
            f"format={format!r}."
        )

    def _run_function(self, forced):
        """`infer` compiled once for any batch size."""
        functions = _RUN_FUNCTIONS.setdefault(self, {})
        if forced not in functions:
            images = tf.TensorSpec(
                (None, *self._plan.image_shape), self._input_dtype
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
        return validation.check_images(
            images, self._plan.image_shape, self._input_dtype
        )

    @property
    def _input_dtype(self):
        # Images stay float32 under mixed precision until forward() has
        # checked that they are finite (a float16 cast turns large pixels
        # into Inf).
        half = self.compute_dtype in ("float16", "bfloat16")
        return "float32" if half else self.compute_dtype

    # ------------------------------------------------------------------
    # Serialization.

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            **{name: getattr(self, name) for name in _ARGUMENTS},
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


# The constructor's arguments after `backbone`, as get_config lists them
# (each kept as the attribute of its name).
_ARGUMENTS = tuple(
    name
    for name, parameter in inspect.signature(
        RNPModel.__init__
    ).parameters.items()
    if name not in ("self", "backbone")
    and parameter.kind is not parameter.VAR_KEYWORD
)
