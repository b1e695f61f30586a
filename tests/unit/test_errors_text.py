"""Error text: one line, UTF-8 safe, cut without losing its cause."""

from __future__ import annotations

import sqlite3

import msgspec

from femd.errors import cut, printable

CAUSE = "bwrap: Creating new namespace failed: Resource temporarily unavailable"


def test_keep_end_keeps_the_cause() -> None:
    text = "launcher process is not available on this host: " + CAUSE
    short = cut(text, 80, keep_end=True)
    assert len(short) == 80
    assert short.endswith("Resource temporarily unavailable")
    assert short.startswith("launcher process")
    assert cut(text, 80).endswith("...")


def test_non_utf8_becomes_visible_escapes_any_store_accepts() -> None:
    name = b"out/\xffname".decode("utf-8", "surrogateescape")
    for text in (printable(name), cut(name), printable("lone \ud800")):
        text.encode("utf-8")
        msgspec.json.encode({"m": text})
        sqlite3.connect(":memory:").execute("SELECT ?", (text,))
    assert printable(name) == "out/\\xffname"
    assert printable("lone \ud800") == "lone \\ud800"
    assert printable("plain é") == "plain é"
