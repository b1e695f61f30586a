"""Undecodable AMQP headers are dropped with a reason; the rest decodes."""

from __future__ import annotations

import struct
import sys

import pika.exceptions
import pika.frame
import pika.spec
import pytest

from femd.amqpframe import BoundedAssembler, GuardedProperties, install


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


# -- bodies over the link's limit ---------------------------------------------


def _message(body_size: int) -> tuple[pika.frame.Method, pika.frame.Header]:
    method = pika.frame.Method(1, pika.spec.Basic.Deliver(delivery_tag=7))
    return method, pika.frame.Header(1, body_size, GuardedProperties())


def test_a_body_within_the_limit_is_assembled_whole() -> None:
    assembler = BoundedAssembler(10)
    method, header = _message(10)
    assert assembler.process(method) is None
    assert assembler.process(header) is None
    assert assembler.process(pika.frame.Body(1, b"01234")) is None
    _, got_header, body = assembler.process(pika.frame.Body(1, b"56789"))
    assert body == b"0123456789"
    assert got_header.properties.too_large is None


def test_a_body_over_the_limit_is_dropped_as_it_arrives() -> None:
    assembler = BoundedAssembler(10)
    method, header = _message(3 * 4096)
    assembler.process(method)
    assembler.process(header)
    for _ in range(2):
        assert assembler.process(pika.frame.Body(1, b"x" * 4096)) is None
        assert assembler._body_fragments == []  # nothing of it is held
    got_method, got_header, body = assembler.process(pika.frame.Body(1, b"x" * 4096))
    assert (got_method, body) == (method, b"")
    assert got_header.properties.too_large == 3 * 4096
    # The next message is assembled as usual.
    method, header = _message(2)
    assembler.process(method)
    assembler.process(header)
    assert assembler.process(pika.frame.Body(1, b"ok"))[2] == b"ok"


def test_a_body_longer_than_its_header_said_is_still_an_error() -> None:
    assembler = BoundedAssembler(10)
    method, header = _message(20)
    assembler.process(method)
    assembler.process(header)
    with pytest.raises(pika.exceptions.BodyTooLongError):
        assembler.process(pika.frame.Body(1, b"x" * 21))
