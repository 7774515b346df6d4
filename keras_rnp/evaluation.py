"""Measuring pruned networks: accuracy, losses and FLOPs, and comparisons.

Per image: `accuracy`, `per_image_losses` and `flops_ratio_and_spread` turn
a model's outputs into the numbers the reports and tables print. Paths of an
RNP model: `uniform_paths` (every gated layer at the same width) and
`candidate_paths` (fixed per-layer actions to try); `choose_path` (a
default path and margin, chosen on validation data). Comparisons:
`interpolate_accuracy`, `compare` (RNP against the full network and static
pruning) and `pareto` (the accuracy-FLOPs front).
"""

import itertools

import keras
import numpy as np

from keras_rnp import policy
from keras_rnp.rnp_model import RNPModel
from keras_rnp.wrap import wrap


def _check_labels(labels, outputs, name):
    """Raises unless `outputs` is `[N, classes]` and `labels` is `[N]`."""
    if outputs.ndim != 2 or labels.shape != outputs.shape[:1]:
        raise ValueError(
            f"Expected {name} of shape [N, classes] and labels of shape "
            f"[N]. Received: {name}.shape={outputs.shape}, "
            f"labels.shape={labels.shape}"
        )


def accuracy(logits, labels):
    """The share of images whose largest output is their label.

    Args:
        logits: `[N, classes]` outputs (logits or probabilities).
        labels: `[N]` integer labels.

    Returns:
        A Python float in [0, 1].
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    _check_labels(labels, logits, "logits")
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def per_image_losses(labels, logits, from_logits=True):
    """The cross-entropy of each image.

    Args:
        labels: `[N]` integer labels.
        logits: `[N, classes]` outputs of the model.
        from_logits: whether `logits` are logits (True) or probabilities.

    Returns:
        A `[N]` NumPy array, in the floating type of `logits`.
    """
    labels, logits = np.asarray(labels), np.asarray(logits)
    _check_labels(labels, logits, "logits")
    losses = keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=from_logits
    )
    return keras.ops.convert_to_numpy(losses)


def flops_ratio_and_spread(flops, full_flops):
    """How much of the full network per-image FLOPs use, and how unevenly.

    Args:
        flops: `[N]` FLOPs spent on each image.
        full_flops: FLOPs per image of the full (unpruned) network, > 0.

    Returns:
        `(ratio, spread)`: the mean FLOPs over `full_flops`, and the
        standard deviation of the per-image ratios (0 when every image
        costs the same, as under static pruning). Python floats.
    """
    flops = np.asarray(flops)
    if flops.ndim != 1 or not len(flops):
        raise ValueError(
            "Expected flops to be a non-empty 1-D array (one value per "
            f"image). Received: flops.shape={flops.shape}"
        )
    if not full_flops > 0:
        raise ValueError(
            f"Expected full_flops > 0. Received: full_flops={full_flops!r}"
        )
    return float(np.mean(flops) / full_flops), float(np.std(flops / full_flops))


def _check_rows(rows, keys, name):
    """Raises unless every row of `rows` is a dict holding `keys`."""
    for row in rows:
        if not isinstance(row, dict) or any(key not in row for key in keys):
            raise ValueError(
                f"Expected {name} to be dicts with the keys {list(keys)}. "
                f"Received: {row!r}"
            )


def interpolate_accuracy(rows, flops_ratio):
    """Accuracy at a FLOPs ratio, read off measured rows.

    Linear between the two rows around `flops_ratio` (an exact match gives
    that row's accuracy).

    Args:
        rows: dicts with `"flops_ratio"` and `"accuracy"`.
        flops_ratio: the FLOPs ratio (used / full) to read at.

    Returns:
        A Python float, or None when `flops_ratio` lies outside the rows'
        range (or there are no rows).
    """
    _check_rows(rows, ("flops_ratio", "accuracy"), "rows")
    points = sorted((row["flops_ratio"], row["accuracy"]) for row in rows)
    if not points or not points[0][0] <= flops_ratio <= points[-1][0]:
        return None
    ratios, accuracies = zip(*points, strict=True)
    return float(np.interp(flops_ratio, ratios, accuracies))


def compare(results):
    """RNP against the full network and against static pruning.

    Args:
        results: a dict with `"full"` (`{"accuracy": ...}`), `"rnp"` (a
            row per trained penalty) and `"sweep"` (a row per budget of one
            model), rows with `"penalty"`, `"budget"`, `"flops_ratio"` and
            `"accuracy"`; and `"static"`, rows with `"speedup"`,
            `"flops_ratio"` and `"accuracy"`.

    Returns:
        A dict. `"within_1_point"`: the largest FLOPs reduction among the
        RNP rows (`"rnp"` and `"sweep"`) that lose at most one point
        against the full network, as `{"penalty", "budget", "speedup",
        "accuracy"}`, or None. `"static"`: for each static row, its
        accuracy, the sweep's accuracy at the same FLOPs ratio
        (`interpolate_accuracy`; None where the sweep does not reach it)
        and the difference (RNP minus static, or None).
    """
    missing = [
        key
        for key in ("full", "rnp", "sweep", "static")
        if not isinstance(results, dict) or key not in results
    ]
    if missing:
        raise ValueError(
            "Expected results with the keys full, rnp, sweep and static. "
            f"Received: results missing {missing}"
        )
    rnp_keys = ("penalty", "budget", "flops_ratio", "accuracy")
    _check_rows(results["rnp"], rnp_keys, "results['rnp']")
    _check_rows(results["sweep"], rnp_keys, "results['sweep']")
    _check_rows(
        results["static"],
        ("speedup", "flops_ratio", "accuracy"),
        "results['static']",
    )
    full = results["full"]["accuracy"]
    close = [
        row
        for row in results["rnp"] + results["sweep"]
        if row["accuracy"] >= full - 0.01
    ]
    best = max(close, key=lambda row: 1 / row["flops_ratio"], default=None)
    within = None
    if best is not None:
        within = {
            "penalty": best["penalty"],
            "budget": best["budget"],
            "speedup": 1 / best["flops_ratio"],
            "accuracy": best["accuracy"],
        }
    static = []
    for row in results["static"]:
        rnp = interpolate_accuracy(results["sweep"], row["flops_ratio"])
        static.append(
            {
                "speedup": row["speedup"],
                "static_accuracy": row["accuracy"],
                "rnp_accuracy": rnp,
                "difference": None if rnp is None else rnp - row["accuracy"],
            }
        )
    return {"within_1_point": within, "static": static}


def pareto(rows):
    """The rows that no other row beats on both accuracy and FLOPs.

    Args:
        rows: dicts with `"flops"` and `"accuracy"`.

    Returns:
        The front, cheapest first: each row more accurate than every
        cheaper one (of rows at equal FLOPs, the most accurate).
    """
    _check_rows(rows, ("flops", "accuracy"), "rows")
    front, best = [], -np.inf
    for row in sorted(rows, key=lambda r: (r["flops"], -r["accuracy"])):
        if row["accuracy"] > best:
            front.append(row)
            best = row["accuracy"]
    return front


def candidate_paths(rnp, low, high, max_paths):
    """Fixed per-layer action tuples of an RNP model, with their FLOPs.

    Every tuple of `1..groups` per gated layer, or, when there are more
    than `max_paths` of them, those whose FLOPs ratio (`rnp.full_flops`
    over the path's FLOPs) lies in `[low, high]`. A fixed path needs no
    decision network: its FLOPs leave the decision network's out.

    Args:
        rnp: a `keras_rnp.RNPModel`.
        low: the smallest FLOPs reduction (full / used) kept.
        high: the largest, >= `low`.
        max_paths: measure every path up to this many, an int >= 0.

    Returns:
        `(paths, flops)`: a `[P, layers]` int32 array of actions and the
        `[P]` FLOPs per image of each path.
    """
    if not isinstance(rnp, RNPModel):
        raise TypeError(
            "Expected rnp to be a keras_rnp.RNPModel (see keras_rnp.wrap). "
            f"Received: {type(rnp).__name__}"
        )
    if not low <= high:
        raise ValueError(
            f"Expected low <= high. Received: low={low}, high={high}"
        )
    if max_paths < 0:
        raise ValueError(
            f"Expected max_paths >= 0. Received: max_paths={max_paths}"
        )
    actions = range(1, rnp.groups + 1)
    paths = np.array(
        list(itertools.product(actions, repeat=rnp.num_gated_layers)),
        np.int32,
    )
    flops = rnp.flops_from_actions(paths).numpy() - rnp.decision_flops
    if len(paths) > max_paths:
        reduction = rnp.full_flops / flops
        keep = (reduction >= low) & (reduction <= high)
        paths, flops = paths[keep], flops[keep]
    return paths, flops


def uniform_paths(model, images, labels, groups, gate_first=False):
    """Accuracy and FLOPs of each uniform width of a wrapped network.

    Wraps `model` (see `keras_rnp.wrap`; an `RNPModel` is taken as it is,
    with its per-width statistics, and `groups` and `gate_first` are then
    its own) and forces every gated layer to the same action, for each
    action `1..groups`. No training, and no
    decision network involved: the paths RNP chooses among.

    Args:
        model: a plain Keras CNN.
        images: `[N, height, width, channels]` images.
        labels: `[N]` integer labels.
        groups: channel groups per gated convolution.
        gate_first: also gate the first convolution.

    Returns:
        A list of dicts, one per action: `"action"`, `"accuracy"` and
        `"flops"` (mean FLOPs per image).
    """
    if isinstance(model, RNPModel):  # Its own statistics, if per width.
        rnp = model
    else:
        rnp = wrap(model, groups=groups, gate_first=gate_first)
    rows = []
    for action in range(1, rnp.groups + 1):
        out = rnp.run(images, actions=action)
        rows.append(
            {
                "action": action,
                "accuracy": accuracy(out["logits"], labels),
                "flops": float(np.mean(out["flops"])),
            }
        )
    return rows


def choose_path(
    rnp,
    images,
    labels,
    speedup,
    margins=(0.0, 0.05, 0.1, 0.2, 0.5, 1.0),
    max_paths=1024,
    batch_size=256,
):
    """Chooses a default path and margin for an RNP model on validation
    data (see `RNPModel`'s `default_path`).

    1. The path: the most accurate fixed path (one action per gated layer)
       whose FLOPs, the decision network's included, are at most
       `rnp.full_flops / speedup`. Every path is measured when there are at
       most `max_paths`; otherwise a greedy descent from the full path
       lowers, one group at a time, the layer whose lowering keeps the
       most accuracy, until the path fits.
    2. The margin: the decisions under that path and each margin (budget
       0), and the fixed path itself (`policy.FIXED_PATH_MARGIN`, always
       a candidate: it fits); the most accurate of those whose mean FLOPs
       also fit (ties: the smaller margin).

    Leaves `rnp` as it was; apply the choice with
    `rnp.set_default_path(choice["path"], choice["margin"])`. Measure the
    result on other images than those it was chosen on.

    Args:
        rnp: a `keras_rnp.RNPModel`.
        images: `[N, H, W, C]` validation images.
        labels: `[N]` integer labels.
        speedup: the FLOPs reduction to reach, a number >= 1 (full FLOPs
            over the mean FLOPs per image).
        margins: the margins to try, numbers in `[0, 1e30]`; the fixed
            path's (`policy.FIXED_PATH_MARGIN`) is always tried too.
        max_paths: measure every path when there are at most this many.
        batch_size: images per call.

    Returns:
        A dict: `"path"` (a tuple of ints), `"margin"`, `"accuracy"` and
        `"speedup"` (of the decisions under both), `"fixed_path"` (the
        path's own accuracy and speed-up, a dict) and the rows measured:
        `"paths"` (`path`, `accuracy`, `speedup`) and `"margins"`
        (`margin`, `accuracy`, `speedup`, `fits`).

    Raises:
        ValueError: for bad arguments, or a speed-up that no path reaches.
    """
    if not isinstance(rnp, RNPModel):
        raise TypeError(
            "Expected rnp to be a keras_rnp.RNPModel (see keras_rnp.wrap). "
            f"Received: {type(rnp).__name__}"
        )
    images, labels = np.asarray(images), np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1:] == (1,):  # keras.datasets'
        labels = labels[:, 0]
    if len(images) == 0 or labels.shape != images.shape[:1]:
        raise ValueError(
            "Expected a non-empty batch of images [N, H, W, C] and labels "
            f"[N]. Received: images.shape={images.shape}, "
            f"labels.shape={labels.shape}"
        )
    try:
        margins = sorted({float(m) for m in margins})
    except (TypeError, ValueError):
        margins = []
    if not margins or not all(
        0 <= m <= policy.FIXED_PATH_MARGIN for m in margins
    ):
        raise ValueError(
            "Expected margins to be one or more numbers in [0, "
            f"{policy.FIXED_PATH_MARGIN:g}]. Received: margins={margins!r}"
        )
    margins = sorted({*margins, policy.FIXED_PATH_MARGIN})
    for name, value in (("max_paths", max_paths), ("batch_size", batch_size)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, np.integer))
            or value < 1
        ):
            raise ValueError(
                f"Expected {name} to be an int >= 1. Received: {name}={value!r}"
            )
    if not (
        isinstance(speedup, (int, float, np.number))
        and np.isfinite(speedup)
        and speedup >= 1
    ):
        raise ValueError(
            f"Expected speedup to be a number >= 1. Received: {speedup!r}"
        )
    layers, groups = rnp.num_gated_layers, rnp.groups
    bound = rnp.full_flops / speedup
    cheapest = float(rnp.flops_from_actions(np.ones((1, layers))).numpy()[0])
    if cheapest > bound:
        raise ValueError(
            f"No path reaches a speed-up of {speedup}: the cheapest (one "
            f"group everywhere, with the decision network) reaches "
            f"{rnp.full_flops / cheapest:.3f}x. Received: speedup={speedup}"
        )

    def measure(actions=None):
        logits, flops = [], []
        for start in range(0, len(images), batch_size):
            part = images[start : start + batch_size]
            if actions is not None:
                forced = np.broadcast_to(actions, (len(part), layers))
                out = rnp.run(part, actions=forced)
            else:
                out = rnp.run(part)
            logits.append(out["logits"].numpy())
            flops.append(out["flops"].numpy().astype(np.float64))
        return (
            accuracy(np.concatenate(logits), labels),
            float(np.mean(np.concatenate(flops))),
        )

    measured = {}

    def measure_path(path):
        """`(accuracy, -flops)`: of equally accurate paths, the cheaper."""
        if path not in measured:
            acc, flops = measure(np.asarray(path, np.int32))
            measured[path] = (acc, -flops)
        return measured[path]

    def within(flops):
        # One test for paths and margins, up to float32 rounding.
        return flops <= bound * (1 + 1e-6)

    def fits(path):
        return within(rnp.flops_from_actions(np.asarray([path])).numpy()[0])

    if groups**layers <= max_paths:
        candidates = [
            path
            for path in itertools.product(range(1, groups + 1), repeat=layers)
            if fits(path)
        ]
        # The most accurate; of equals, the cheapest.
        path = max(candidates, key=measure_path)
    else:
        path = (groups,) * layers
        while not fits(path):
            lowered = [
                path[:t] + (path[t] - 1,) + path[t + 1 :]
                for t in range(layers)
                if path[t] > 1
            ]
            path = max(lowered, key=measure_path)
    fixed_accuracy, fixed_flops = measure_path(path)

    before = rnp.default_path, rnp.path_margin
    rows = []
    try:
        for margin in margins:
            rnp.set_default_path(path, margin)
            acc, flops = measure()
            rows.append(
                {
                    "margin": margin,
                    "accuracy": acc,
                    "speedup": rnp.full_flops / flops,
                    "fits": bool(within(flops)),
                }
            )
    finally:
        rnp.set_default_path(*before)
    # The fixed path's margin always fits, but for Q-values beyond float32.
    fitting = [row for row in rows if row["fits"]] or rows[-1:]
    best = max(fitting, key=lambda r: (r["accuracy"], -r["margin"]))
    return {
        "path": path,
        "margin": best["margin"],
        "accuracy": best["accuracy"],
        "speedup": best["speedup"],
        "fixed_path": {
            "accuracy": fixed_accuracy,
            "speedup": rnp.full_flops / -fixed_flops,
        },
        "paths": [
            {"path": p, "accuracy": a, "speedup": rnp.full_flops / -f}
            for p, (a, f) in measured.items()
        ],
        "margins": rows,
    }
