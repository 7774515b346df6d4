"""What an RNP model decides on a dataset, layer by layer."""

import dataclasses

import numpy as np

from keras_rnp.evaluation import flops_ratio_and_spread
from keras_rnp.evaluation import per_image_losses
from keras_rnp.rnp_model import RNPModel


@dataclasses.dataclass
class Report:
    """The decisions of an RNP model on a dataset.

    Attributes:
        layers: one dict per gated layer: `"layer"` (its name),
            `"action_counts"` (images that took 1..groups groups),
            `"action_share"` (the same as fractions), `"mean_action"`,
            `"mean_flops"` (per image) and `"flops_share"` (of all FLOPs).
        other_flops: FLOPs per image outside the gated convolutions (the
            layers before them, the head, the decision network).
        full_flops: FLOPs per image of the unwrapped backbone.
        actions: `[N, L]` int actions, in the dataset's order.
        flops: `[N]` FLOPs per image (decision network included).
        labels: `[N]` labels, or None for a dataset of images only.
        predictions: `[N]` predicted classes.
        losses: `[N]` cross-entropy of each image, or None without labels.
        budget: the run-time budget used.
    """

    layers: list
    other_flops: float
    full_flops: float
    actions: np.ndarray
    flops: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray
    losses: np.ndarray
    budget: float

    @property
    def images(self):
        return len(self.flops)

    @property
    def accuracy(self):
        if self.labels is None:
            return None
        return float(np.mean(self.predictions == self.labels))

    @property
    def mean_flops(self):
        return float(np.mean(self.flops))

    @property
    def flops_ratio(self):
        """Mean FLOPs per image over the backbone's."""
        return flops_ratio_and_spread(self.flops, self.full_flops)[0]

    @property
    def flops_spread(self):
        """Standard deviation of the per-image FLOPs ratio (0: every image
        took the same path, i.e. static pruning in disguise)."""
        return flops_ratio_and_spread(self.flops, self.full_flops)[1]

    def summary(self):
        """The numbers as a JSON-ready dict (no per-image arrays)."""
        return {
            "images": self.images,
            "budget": self.budget,
            "accuracy": self.accuracy,
            "mean_flops": self.mean_flops,
            "full_flops": self.full_flops,
            "flops_ratio": self.flops_ratio,
            "flops_spread": self.flops_spread,
            "other_flops": self.other_flops,
            "layers": self.layers,
        }

    def table(self):
        """The per-layer table as text."""
        groups = len(self.layers[0]["action_counts"]) if self.layers else 0
        head = " ".join(f"{f'a={a}':>6}" for a in range(1, groups + 1))
        lines = [
            f"{'layer':<20} {head} {'mean a':>7} {'MFLOPs':>9} {'share':>6}"
        ]
        total = self.mean_flops
        for row in self.layers:
            shares = " ".join(f"{s:>6.1%}" for s in row["action_share"])
            lines.append(
                f"{row['layer']:<20} {shares} {row['mean_action']:>7.2f} "
                f"{row['mean_flops'] / 1e6:>9.2f} {row['flops_share']:>6.1%}"
            )
        lines.append(
            f"{'other':<20} {' ' * len(head)} {'':>7} "
            f"{self.other_flops / 1e6:>9.2f} {self.other_flops / total:>6.1%}"
        )
        accuracy = "-" if self.accuracy is None else f"{self.accuracy:.4f}"
        lines.append(
            f"{self.images} images, budget {self.budget:g}: accuracy "
            f"{accuracy}, {self.mean_flops / 1e6:.2f} MFLOPs per image "
            f"({self.flops_ratio:.3f} of the full network, spread "
            f"{self.flops_spread:.3f})"
        )
        return "\n".join(lines)


def report(rnp, dataset, budget=0.0, print_fn=print, batch_size=256):
    """Runs an RNP model on a dataset and tabulates its decisions.

    Args:
        rnp: a `keras_rnp.RNPModel`.
        dataset: what `evaluate` and `predict` take: an array of images,
            an `(images, labels)` tuple of arrays, or batches of either (a
            `tf.data.Dataset` or any iterable), in a fixed order.
        budget: the run-time budget (see `RNPModel.run`).
        print_fn: called with the table; None prints nothing.
        batch_size: batch size for arrays (batched datasets keep theirs).

    Returns:
        A `Report`: the per-layer table as data, and per-image actions,
        FLOPs, predictions and losses.
    """
    if not isinstance(rnp, RNPModel):
        raise TypeError(
            "keras_rnp.report() expects a keras_rnp.RNPModel (see "
            f"keras_rnp.wrap). Received: {type(rnp).__name__}."
        )
    actions, flops, logits, labels = [], [], [], []
    for batch in _batches(dataset, rnp.image_shape, batch_size):
        if isinstance(batch, (tuple, list)):
            images, batch_labels = batch[0], batch[1]
            labels.append(np.asarray(batch_labels).reshape(-1))
        else:
            images = batch
        out = rnp.run(images, budget=budget)
        actions.append(out["actions"].numpy())
        flops.append(out["flops"].numpy())
        logits.append(out["logits"].numpy())
    if not actions:
        raise ValueError("keras_rnp.report() received an empty dataset.")
    actions = np.concatenate(actions).astype(np.int64)
    flops = np.concatenate(flops).astype(np.float64)
    logits = np.concatenate(logits)
    labels = np.concatenate(labels).astype(np.int64) if labels else None
    losses = None
    if labels is not None:
        losses = per_image_losses(
            labels, logits, from_logits=not rnp.ends_in_softmax
        ).astype(np.float64)

    per_layer = rnp.plan.step_flops(actions.astype(np.float64))
    layers = []
    for t, (unit, layer_flops) in enumerate(
        zip(rnp.plan.units, per_layer, strict=True)
    ):
        action = actions[:, t]
        counts = np.bincount(action - 1, minlength=rnp.groups)
        layers.append(
            {
                "layer": unit.label,
                "action_counts": counts.tolist(),
                "action_share": (counts / len(action)).tolist(),
                "mean_action": float(action.mean()),
                "mean_flops": float(layer_flops.mean()),
                "flops_share": float(layer_flops.mean() / flops.mean()),
            }
        )
    gated = np.sum(per_layer, axis=0)
    result = Report(
        layers=layers,
        other_flops=float(np.mean(flops - gated)),
        full_flops=float(rnp.full_flops),
        actions=actions,
        flops=flops,
        labels=labels,
        predictions=logits.argmax(axis=-1),
        losses=losses,
        budget=float(budget),
    )
    if print_fn is not None:
        print_fn(result.table())
    return result


def _batches(dataset, image_shape, batch_size):
    """Batches of images or `(images, labels)` from what `predict` or
    `evaluate` would take; a clear error for anything else."""
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2:
        images, labels = (np.asarray(part) for part in dataset)
        if images.ndim == len(image_shape) + 1:
            if len(images) != len(labels):
                raise ValueError(
                    "keras_rnp.report() expects as many labels as images. "
                    f"Received: {len(images)} images, {len(labels)} labels."
                )
            return [
                (images[i : i + batch_size], labels[i : i + batch_size])
                for i in range(0, len(images), batch_size)
            ]
    if isinstance(dataset, np.ndarray) or hasattr(dataset, "numpy"):
        images = np.asarray(dataset)
        if images.ndim != len(image_shape) + 1:
            raise ValueError(
                "keras_rnp.report() expects images of shape "
                f"{(None, *image_shape)}, (images, labels), or a dataset of "
                f"batches. Received: an array of shape {images.shape}."
            )
        return [
            images[i : i + batch_size]
            for i in range(0, len(images), batch_size)
        ]
    if not hasattr(dataset, "__iter__"):
        raise ValueError(
            "keras_rnp.report() expects images, (images, labels) or a "
            "dataset of batches. Received: "
            f"{type(dataset).__name__}."
        )
    return dataset


def _ranks(x):
    """Ranks 1..n of `x`, tied values sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Start index of each run of equal values, and the run of each element.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    run = np.cumsum(np.r_[True, sorted_x[1:] != sorted_x[:-1]]) - 1
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((starts + ends + 1) / 2.0)[run]
    return ranks


def rank_correlation(a, b):
    """Spearman's rank correlation of two 1-D arrays (ties share their mean
    rank); 0 when either is constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(
            "Expected two 1-D arrays of one length >= 2. Received shapes "
            f"{a.shape} and {b.shape}."
        )
    ra, rb = _ranks(a) - (len(a) + 1) / 2.0, _ranks(b) - (len(b) + 1) / 2.0
    denominator = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
    if denominator == 0:
        return 0.0  # A constant has no rank order.
    return float(np.sum(ra * rb) / denominator)
