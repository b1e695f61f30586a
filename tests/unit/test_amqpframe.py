"""Undecodable AMQP headers are dropped with a reason; the rest decodes."""

from __future__ import annotations

import struct
import sys

import pika.frame
import pika.spec
import pytest

from femd.amqpframe import GuardedProperties, install


def _encoded(**fields: object) -> bytes:
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(30000)
    try:
        return b"".join(pika.spec.BasicProperties(**fields).encode())
    finally:
        sys.setrecursionlimit(limit)


def _deep(depth: int) -> dict[str, object]:
    top: dict[str, object] = {}
    table = top
    for _ in range(depth):
        table["a"] = {}
        table = table["a"]  # type: ignore[assignment]
    return top


def test_deep_headers_are_dropped_and_the_rest_kept() -> None:
    data = _encoded(
        content_type="application/json",
        content_encoding="utf-8",
        headers=_deep(2000),
        delivery_mode=2,
        message_id="m-1",
    )
    with pytest.raises(RecursionError):
        pika.spec.BasicProperties().decode(data)
    props = GuardedProperties().decode(data)
    assert props.problem is not None
    assert props.problem.startswith("AMQP headers cannot be decoded (RecursionError")
    assert props.headers is None
    assert (props.content_type, props.content_encoding) == ("application/json", "utf-8")
    assert (props.delivery_mode, props.message_id) == (2, "m-1")


def test_unknown_field_type_is_dropped() -> None:
    data = bytearray(_encoded(headers={"k": "v"}, delivery_mode=2))
    data[data.index(b"k") + 1] = ord("Z")  # no such AMQP field type
    props = GuardedProperties().decode(bytes(data))
    assert props.problem is not None
    assert "InvalidFieldTypeException" in props.problem
    assert props.delivery_mode == 2


def test_good_headers_decode_as_sent() -> None:
    props = GuardedProperties().decode(_encoded(headers={"x": 1}, delivery_mode=2))
    assert props.problem is None
    assert props.headers == {"x": 1}


def test_truncated_properties_still_raise() -> None:
    data = _encoded(headers={"x": 1})[:-2]
    with pytest.raises((struct.error, IndexError, Exception)):
        GuardedProperties().decode(data)


def test_install_reaches_the_frame_decoder() -> None:
    install()
    payload = struct.pack(">HHQ", 60, 0, 5) + _encoded(headers=_deep(2000))
    raw = struct.pack(">BHL", 2, 1, len(payload)) + payload + b"\xce"
    consumed, frame = pika.frame.decode_frame(raw)
    assert consumed == len(raw)
    assert isinstance(frame, pika.frame.Header)
    assert frame.properties.problem is not None
