"""Read an ONNX file's opsets, metadata, inputs and outputs without the ``onnx`` package."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from typing import Any

# Importing ``onnx`` takes most of a second and ONNX Runtime loads the whole graph; the
# fields ``geoseg info`` shows sit at the top level of the ModelProto message. This module
# walks the protobuf wire format (https://protobuf.dev/programming-guides/encoding/) over a
# memory map and skips every other field by its length, so the weights are never read.
# Field numbers are those of onnx/onnx.proto3.

#: ``TensorProto.DataType`` codes → numpy dtype names.
ELEMENT_TYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    8: "object",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    16: "bfloat16",
}

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
# ModelProto fields
_IR_VERSION, _GRAPH, _OPSET_IMPORT, _METADATA = 1, 7, 8, 14
# GraphProto fields
_GRAPH_INPUT, _GRAPH_OUTPUT = 11, 12


class ProtobufError(ValueError):
    """The bytes are not a well-formed protobuf message (not an ONNX file)."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ProtobufError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def message_fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """Yield ``(field number, value)`` of one message's varint and length-delimited fields.

    Length-delimited values are memoryviews into ``buf`` (no copy); fixed-size fields are
    skipped.

    Raises:
        ProtobufError: A malformed or truncated message.
    """
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtobufError("field number 0")
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
            yield number, value
        elif wire == _LENGTH:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ProtobufError("truncated field")
            yield number, buf[pos : pos + length]
            pos += length
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
    if pos != end:
        raise ProtobufError("truncated message")


def _text(value: int | memoryview) -> str:
    return bytes(value).decode("utf-8") if isinstance(value, memoryview) else str(value)


def _submessages(buf: memoryview, number: int) -> Iterator[memoryview]:
    """The length-delimited values of field ``number`` in ``buf``."""
    for n, value in message_fields(buf):
        if n == number and isinstance(value, memoryview):
            yield value


def _dimension(buf: memoryview) -> int | str:
    """A TensorShapeProto.Dimension: its value, or its symbolic name."""
    entry: int | str = ""
    for n, value in message_fields(buf):
        if n == 1:
            entry = int(value) if isinstance(value, int) else _text(value)
        elif n == 2:
            entry = _text(value)
    return entry


def _value_info(buf: memoryview) -> dict[str, Any]:
    """Name, element type and shape (ints or symbolic names) of a ValueInfoProto."""
    info: dict[str, Any] = {"name": "", "dtype": None, "shape": []}
    for n, value in message_fields(buf):
        if n == 1:
            info["name"] = _text(value)
        elif n == 2:  # TypeProto → tensor_type (1) → elem_type (1), shape (2) → dim (1)
            for tensor in _submessages(value, 1):
                for m, part in message_fields(tensor):
                    if m == 1 and isinstance(part, int):
                        info["dtype"] = ELEMENT_TYPES.get(part, str(part))
                    elif m == 2 and isinstance(part, memoryview):
                        info["shape"] += [_dimension(d) for d in _submessages(part, 1)]
    return info


def read_onnx_header(path: str | os.PathLike) -> dict[str, Any]:
    """IR version, opsets, metadata, inputs and outputs of an ONNX file; weights unread.

    Returns:
        ``{"ir_version", "opset", "metadata", "inputs", "outputs"}``; ``opset`` is that of
        the default (``ai.onnx``) domain.

    Raises:
        ProtobufError: The file is not an ONNX model.
        OSError: The file cannot be read.
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ProtobufError("empty file")
        # unmapped when garbage collected: views into it may outlive an error
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return _read_model(memoryview(mapped))


def _read_model(buf: memoryview) -> dict[str, Any]:
    header: dict[str, Any] = {"ir_version": None, "opset": None, "metadata": {}}
    header["inputs"], header["outputs"] = [], []
    for number, value in message_fields(buf):
        if number == _IR_VERSION:
            header["ir_version"] = value
        elif number == _OPSET_IMPORT and isinstance(value, memoryview):
            entry = dict(message_fields(value))  # domain (1), version (2)
            if _text(entry.get(1, memoryview(b""))) in ("", "ai.onnx"):
                header["opset"] = entry.get(2)
        elif number == _METADATA and isinstance(value, memoryview):
            entry = dict(message_fields(value))  # key (1), value (2)
            key = _text(entry.get(1, memoryview(b"")))
            header["metadata"][key] = _text(entry.get(2, memoryview(b"")))
        elif number == _GRAPH and isinstance(value, memoryview):
            for n, item in message_fields(value):
                if n in (_GRAPH_INPUT, _GRAPH_OUTPUT) and isinstance(item, memoryview):
                    key = "inputs" if n == _GRAPH_INPUT else "outputs"
                    header[key].append(_value_info(item))
    if header["ir_version"] is None or not header["inputs"]:
        raise ProtobufError("no ONNX graph")
    return header
