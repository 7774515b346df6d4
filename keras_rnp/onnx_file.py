"""Writes an ONNX model with its weights streamed into the file.

`onnx.save` serializes the whole `ModelProto` at once: every weight as a
`TensorProto`, then the file's bytes, two copies of the weights beside the
model's own (VGG-16: 0.5 GiB each). `write` serializes the model without
its weights, then appends each weight, read in slices of about 16 MiB
when its turn comes: the file's bytes are never all in memory.

This relies on the protobuf wire format: a length-delimited field is its
tag (field number << 3 | 2) and its length, both varints, then its bytes;
fields may come in any order, and a repeated field's elements append. So
the model's other fields, then its `graph` field (the graph's bytes
followed by one `initializer` field per weight, its length the sum) parse
as the model with the weights appended to the graph's initializers.
"""

import math

import numpy as np
import onnx

# Protobuf's limit on one message (one .onnx file without external data).
MAX_BYTES = 2**31 - 1
# About how many bytes of a weight are read at a time.
CHUNK_BYTES = 2**24
_LENGTH_DELIMITED = 2


def _varint(n):
    """`n` (>= 0) as a protobuf varint: 7 bits a byte, low bits first."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(message_type, name, size):
    """The tag and length of `message_type`'s length-delimited field
    `name` holding `size` bytes."""
    number = message_type.DESCRIPTOR.fields_by_name[name].number
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(size)


def _initializer_head(name, dtype, shape):
    """The bytes of the graph's field `initializer { name, data_type, dims,
    raw_data }` up to the data, and the data's size (the data come next:
    little-endian, row-major)."""
    size = dtype.itemsize * math.prod(shape)
    tensor = onnx.TensorProto(
        name=name,
        data_type=onnx.helper.np_dtype_to_tensor_dtype(dtype.newbyteorder("=")),
        dims=shape,
    ).SerializeToString()
    tensor += _field(onnx.TensorProto, "raw_data", size)
    head = _field(onnx.GraphProto, "initializer", len(tensor) + size)
    return head + tensor, size


def _chunks(value, dtype, shape):
    """`value`'s data as little-endian, row-major byte arrays, read in
    slices of its first axis of about `CHUNK_BYTES` (at least a row)."""
    little = dtype.newbyteorder("<")
    if not shape:
        yield np.asarray(value[...], little).reshape(-1).view(np.uint8)
        return
    row = dtype.itemsize * math.prod(shape[1:])
    step = max(1, CHUNK_BYTES // max(row, 1))
    for start in range(0, shape[0], step):
        chunk = np.asarray(value[start : start + step])
        chunk = chunk.astype(little, order="C", copy=False)
        yield chunk.reshape(-1).view(np.uint8)


def write(model_proto, weights, path):
    """Writes `model_proto` to `path` with `weights` appended to its
    graph's initializers, each read in slices as it is written.

    The file holds the model's fields, then one `graph` field: the graph
    without the weights, then the weights' `initializer` fields (one
    message field, so that decoders that replace a repeated message field
    instead of merging it, as some JavaScript ones do, read it whole).

    Args:
        model_proto: an `onnx.ModelProto`, without the weights.
        weights: `{name: value}`; a value is a NumPy array or an object
            with `shape`, `dtype` (NumPy's) and slices of its first axis
            (`value[a:b]`, `value[...]` for a scalar) that NumPy can read.
        path: the file to write (write it through `atomic_path`: a failure
            midway leaves a partial file).

    Raises:
        ValueError: the file would pass protobuf's 2 GiB limit (before
            anything is written), or a value gave other than `shape`'s
            number of bytes.
    """
    rest = onnx.ModelProto()
    rest.CopyFrom(model_proto)
    rest.ClearField("graph")
    rest = rest.SerializeToString()
    graph = model_proto.graph.SerializeToString()
    heads = {}
    for name, value in weights.items():
        dtype = np.dtype(value.dtype)
        shape = tuple(int(d) for d in value.shape)
        heads[name] = (dtype, shape, *_initializer_head(name, dtype, shape))
    graph_size = len(graph) + sum(
        len(head) + size for _, _, head, size in heads.values()
    )
    graph_field = _field(onnx.ModelProto, "graph", graph_size)
    total = len(rest) + len(graph_field) + graph_size
    if total > MAX_BYTES:
        raise ValueError(
            "An ONNX file holds at most 2 GiB (protobuf's limit on one "
            f"message). Received: a model of {total / 2**30:.2f} GiB."
        )
    with open(path, "wb") as f:
        f.write(rest)
        f.write(graph_field)
        f.write(graph)
        for name, (dtype, shape, head, size) in heads.items():
            f.write(head)
            written = 0
            for chunk in _chunks(weights[name], dtype, shape):
                written += f.write(chunk)
            if written != size:
                raise ValueError(
                    f"Expected {size} bytes of weight {name!r} (shape "
                    f"{shape}, {dtype}). Received: {written}."
                )
