"""onnx_file.write: weights streamed into the file parse as initializers."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper
from onnx import numpy_helper

from keras_rnp import onnx_file


def small_model():
    """`y = a + w` with one initializer of its own, `c`."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[numpy_helper.from_array(np.ones(3, np.int64), "c")],
    )
    return helper.make_model(graph)


def test_streamed_weights_parse_as_the_model_with_its_initializers(
    tmp_path, monkeypatch
):
    rng = np.random.default_rng(0)
    weights = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        # 4,000 bytes: a length of two varint bytes.
        "half": rng.random((40, 50)).astype(np.float16),
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 4), np.float32),
        "mask": np.array([True, False]),
        # Big-endian and not contiguous: written little-endian, in order.
        "swapped": np.arange(12, dtype=">i4").reshape(3, 4).T,
    }
    path = tmp_path / "m.onnx"

    class Rows:
        """An array read only in slices of its first axis, as a variable's
        value is; records the slices."""

        def __init__(self, value):
            self.value, self.shape, self.dtype = value, value.shape, value.dtype
            self.reads = []

        def __getitem__(self, key):
            self.reads.append(key)
            return self.value[key]

    sources = {name: Rows(value) for name, value in weights.items()}
    model = small_model()
    monkeypatch.setattr(onnx_file, "CHUNK_BYTES", 1000)
    onnx_file.write(model, sources, path)
    # Each read once, in slices of about 1000 bytes: w's rows are 12 bytes
    # (83 a slice), half's 100 bytes (10 a slice).
    assert sources["w"].reads == [slice(0, 83)]
    assert sources["half"].reads == [slice(i, i + 10) for i in (0, 10, 20, 30)]
    assert sources["scalar"].reads == [Ellipsis]
    assert sources["empty"].reads == []

    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    for name, value in weights.items():
        native = np.array(value, dtype=value.dtype.newbyteorder("="))
        expected.graph.initializer.append(numpy_helper.from_array(native, name))
    loaded = onnx.load(path)
    assert loaded == expected
    assert [t.name for t in loaded.graph.initializer] == ["c", *weights]
    for tensor in loaded.graph.initializer[1:]:
        value = numpy_helper.to_array(tensor)
        np.testing.assert_array_equal(value, weights[tensor.name])
        assert value.shape == weights[tensor.name].shape

    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"a": np.ones((2, 3), np.float32)})
    np.testing.assert_array_equal(y, weights["w"] + 1)


def test_varints_match_protobufs():
    for n in (0, 1, 127, 128, 300, 2**31 - 1, 2**40 + 5):
        # A field of varint type: its tag (one byte here), the varint.
        encoded = TensorProto(dims=[n]).SerializeToString()
        assert encoded[1:] == onnx_file._varint(n)


def test_refuses_a_file_past_two_gib_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_file, "MAX_BYTES", 1000)
    weights = {"w": np.zeros(300, np.float32)}
    with pytest.raises(ValueError, match="at most 2 GiB.*a model of 0.00 GiB"):
        onnx_file.write(small_model(), weights, tmp_path / "m.onnx")
    assert not os.path.exists(tmp_path / "m.onnx")


def test_refuses_a_value_shorter_than_its_shape(tmp_path):
    class Short:
        """Says 4 rows, gives 3."""

        shape, dtype = (4, 2), np.dtype(np.float32)

        def __getitem__(self, key):
            return np.zeros((3, 2), np.float32)

    with pytest.raises(ValueError, match="Expected 32 bytes of weight 'w'.*24"):
        onnx_file.write(small_model(), {"w": Short()}, tmp_path / "m.onnx")


def test_the_graph_is_one_field_of_the_file(tmp_path):
    # Decoders that replace a repeated message field instead of merging it
    # (some JavaScript ones) read one graph field whole.
    path = tmp_path / "m.onnx"
    onnx_file.write(small_model(), {"w": np.ones(3, np.float32)}, path)
    data = path.read_bytes()
    tag = onnx_file._varint(7 << 3 | 2)
    graphs = 0
    position = 0
    while position < len(data):  # the ModelProto's top-level fields
        key, position = _read_varint(data, position)
        if key & 7 == 0:
            _, position = _read_varint(data, position)
            continue
        assert key & 7 == 2
        size, position = _read_varint(data, position)
        graphs += onnx_file._varint(key) == tag
        position += size
    assert position == len(data)
    assert graphs == 1


def _read_varint(data, position):
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position
