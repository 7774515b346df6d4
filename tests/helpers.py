"""Small models and NumPy references shared by the tests."""

import json
import os
import subprocess
import sys
import time

import keras
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def np_conv2d(x, kernel, bias=None, strides=1, padding="valid"):
    """NumPy reference of a channels-last 2D convolution (dilation 1)."""
    kh, kw = kernel.shape[:2]
    if padding == "same":
        h, w = x.shape[1:3]
        out_h, out_w = -(-h // strides), -(-w // strides)
        pad_h = max((out_h - 1) * strides + kh - h, 0)
        pad_w = max((out_w - 1) * strides + kw - w, 0)
        x = np.pad(
            x,
            (
                (0, 0),
                (pad_h // 2, pad_h - pad_h // 2),
                (pad_w // 2, pad_w - pad_w // 2),
                (0, 0),
            ),
        )
    out_h = (x.shape[1] - kh) // strides + 1
    out_w = (x.shape[2] - kw) // strides + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]))
    for i in range(out_h):
        for j in range(out_w):
            patch = x[
                :,
                i * strides : i * strides + kh,
                j * strides : j * strides + kw,
                :,
            ]
            out[:, i, j, :] = np.einsum("bhwc,hwco->bo", patch, kernel)
    if bias is not None:
        out += bias
    return out


def np_batch_norm(x, layer):
    gamma, beta, mean, var = (np.asarray(w) for w in layer.get_weights())
    return (x - mean) / np.sqrt(var + layer.epsilon) * gamma + beta


def np_max_pool(x, size=2):
    b, h, w, c = x.shape
    x = x[:, : h // size * size, : w // size * size]
    return x.reshape(b, h // size, size, w // size, size, c).max(axis=(2, 4))


def randomize_batch_norm(model, seed=0):
    """Gives every batch norm non-trivial statistics and a non-zero beta."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.get_weights()[0].shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c),
                    rng.uniform(0.2, 0.8, c),
                    rng.normal(0, 0.1, c),
                    rng.uniform(0.5, 1.5, c),
                ]
            )


def small_cnn(input_shape=(10, 10, 3), widths=(8, 16, 12), classes=5, seed=0):
    """conv-bn-relu, conv-bn-relu-pool, conv(stride 2, no bias)-bn-relu,
    global average pooling, dense."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Conv2D(widths[0], 3, padding="same"),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.Conv2D(widths[1], 3, padding="same"),
            layers.BatchNormalization(),
            layers.Activation("relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(
                widths[2], 3, strides=2, padding="same", use_bias=False
            ),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.GlobalAveragePooling2D(),
            layers.Dropout(0.3),
            layers.Dense(classes),
        ]
    )
    randomize_batch_norm(model, seed)
    return model


def np_small_cnn(model, x, actions, groups):
    """NumPy reference of `small_cnn` under per-image actions `[B, 2]`:
    each gated unit's output keeps the first `a * C / groups` channels."""
    conv0, bn0, _, conv1, bn1, _, _, conv2, bn2, _, _, _, dense = model.layers

    def mask(y, a):
        c = y.shape[-1]
        keep = np.arange(c)[None, :] < (a * c // groups)[:, None]
        return y * keep[:, None, None, :]

    y = np.maximum(
        np_batch_norm(np_conv2d(x, *conv0.get_weights(), padding="same"), bn0),
        0,
    )
    y = np.maximum(
        np_batch_norm(np_conv2d(y, *conv1.get_weights(), padding="same"), bn1),
        0,
    )
    y = mask(np_max_pool(y), actions[:, 0])
    y = np.maximum(
        np_batch_norm(
            np_conv2d(y, conv2.get_weights()[0], strides=2, padding="same"), bn2
        ),
        0,
    )
    y = mask(y, actions[:, 1]).mean(axis=(1, 2))
    kernel, bias = dense.get_weights()
    return y @ kernel + bias


def spread_decisions(rnp, seed=0):
    """Random decoder weights and biases, so that images take different
    paths (a fresh decision network mostly agrees across images)."""
    rng = np.random.default_rng(seed)
    for decoder in rnp.decision.decoders:
        kernel, bias = decoder.get_weights()
        decoder.set_weights(
            [rng.normal(0, 1.0, kernel.shape), rng.normal(0, 0.1, bias.shape)]
        )
    return rnp


def onnx_session(path):
    """An onnxruntime CPU session of an .onnx file, warnings silenced."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"]
    )


def executed_ops(session_path, feeds):
    """The op types onnxruntime runs for one call and how often (a
    `collections.Counter`), from its profile: the graph's nodes and every
    branch taken; a fused convolution counts as `FusedConv`."""
    import collections

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3
    options.profile_file_prefix = str(session_path) + "_profile"
    session = ort.InferenceSession(
        str(session_path), options, providers=["CPUExecutionProvider"]
    )
    session.run(None, feeds)
    profile = session.end_profiling()
    with open(profile) as f:
        events = json.load(f)
    os.remove(profile)
    return collections.Counter(
        e["args"].get("op_name", "")
        for e in events
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
    )


def convolutions(ops):
    """How many convolutions (fused or not) an `executed_ops` count
    holds."""
    return sum(count for op, count in ops.items() if "Conv" in op)


def onnx_outputs(session, feeds):
    """Runs an onnxruntime session; returns its outputs by name."""
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def run_json_script(name, timeout=600):
    """Runs `tests/<name>` in a fresh Python process; returns its JSON."""
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, name)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def run_checks(code, timeout=300, **names):
    """Runs `code` in a fresh Python process, after binding each keyword
    to its value's repr; the code must print "ok" last."""
    header = "".join(f"{name} = {value!r}\n" for name, value in names.items())
    result = subprocess.run(
        [sys.executable, "-c", header + code],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok"), result.stdout[-3000:]


def free_ports(count):
    """`count` TCP ports free on localhost now."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(index, ports):
    """TF_CONFIG of worker `index` of a localhost cluster on `ports`
    (comma-separated)."""
    return json.dumps(
        {
            "cluster": {
                "worker": [f"127.0.0.1:{port}" for port in ports.split(",")]
            },
            "task": {"type": "worker", "index": index},
        }
    )


def run_workers(command, count=2, env=None, timeout=300):
    """Starts `command(index, ports)` (an argument list) for each of
    `count` workers of a localhost cluster at once, with the environment
    variables `env(index, ports)` (a dict) added; waits for all of them.
    Returns their `subprocess.CompletedProcess` results (with the `pid`
    each ran as) in task order; a worker still running after `timeout`
    seconds is killed."""
    import tempfile

    ports = ",".join(map(str, free_ports(count)))
    environ = {**os.environ, "PYTHONPATH": os.path.dirname(HERE)}
    # Files, not pipes: a worker blocked on a full pipe would stall all.
    outputs = [
        (tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+"))
        for _ in range(count)
    ]
    processes = [
        subprocess.Popen(
            command(index, ports),
            stdout=outputs[index][0],
            stderr=outputs[index][1],
            text=True,
            cwd=HERE,
            env={**environ, **(env(index, ports) if env else {})},
        )
        for index in range(count)
    ]
    deadline = time.time() + timeout
    results = []
    for process, (out, err) in zip(processes, outputs, strict=True):
        try:
            process.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read())
            f.close()
        result = subprocess.CompletedProcess(
            process.args, process.returncode, *texts
        )
        result.pid = process.pid
        results.append(result)
    return results


def assert_same_training(a, b):
    """Two training runs' results (dicts of distributed_training.py) agree:
    counters exactly, loss mean, weights and every logged metric within
    float tolerance."""
    counters = [
        key
        for key in ("step_counter", "decision_step_counter", "iterations")
        if key in a or key in b
    ]
    assert counters  # Something counted the steps.
    for key in counters:
        assert a.get(key) == b.get(key), key
    if "loss_ema" in a:
        np.testing.assert_allclose(a["loss_ema"], b["loss_ema"], rtol=1e-5)
    assert len(a["weights"]) == len(b["weights"])
    for x, y in zip(a["weights"], b["weights"], strict=True):
        np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-5)
    assert set(a["history"]) == set(b["history"])
    for key, values in a["history"].items():
        np.testing.assert_allclose(
            b["history"][key], values, rtol=1e-4, err_msg=key
        )
