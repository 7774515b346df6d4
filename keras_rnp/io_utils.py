"""Atomic writes: a file or directory appears whole, or not at all."""

import contextlib
import json
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_path(path, is_dir=False):
    """Yields a temporary path beside `path`; moves it there on success."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".keras_rnp-", dir=parent)
    target = os.path.join(staging, os.path.basename(path))
    try:
        yield target
        if not os.path.exists(target):
            raise RuntimeError(f"Nothing was written to {target}.")
        if is_dir and os.path.exists(path):
            old = os.path.join(staging, "old")
            os.replace(path, old)
        os.replace(target, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path, data):
    """Writes `data` as indented JSON to `path`, atomically."""
    with atomic_path(path) as staging:
        with open(staging, "w") as f:
            json.dump(data, f, indent=1)
