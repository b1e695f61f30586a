"""Public keys: the usual Ed25519 PEM read directly, every other PEM as before.

``load_public_key`` reads the exact form ``public_pem`` writes without
cryptography's PEM loader; anything else goes to that loader. For every input
here, both must agree: the same key, or a refusal with the same words.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from femd.errors import InputError
from femd.keys import _usual_ed25519_pem, generate, keyid, load_public_key, public_pem


def _library(data: bytes) -> str:
    """What cryptography's loader alone makes of *data*: a keyid or a refusal."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        return "refused: not a PEM public key"
    try:
        return keyid(key)  # type: ignore[arg-type]
    except AttributeError:
        return "refused: not an Ed25519 public key"


def _ours(data: bytes) -> str:
    try:
        return keyid(load_public_key(data, "k"))
    except InputError as e:
        return "refused: " + str(e).removeprefix("k: ")


PEM = public_pem(generate().public_key())
EC_PEM = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
)


@pytest.mark.parametrize(
    "data",
    [
        PEM,
        PEM.rstrip(b"\n"),
        PEM.replace(b"\n", b"\r\n"),
        b"a comment\n" + PEM,
        PEM + b"trailing\n",
        PEM + PEM,
        PEM.replace(b"PUBLIC KEY", b"PRIVATE KEY"),
        PEM.replace(b"MCowBQYDK2VwAyEA", b"MCowBQYDK2VxAyEA"),  # Ed448's OID
        PEM[:40] + PEM[41:],  # a base64 character short
        EC_PEM,
        b"",
        b"not pem at all",
    ],
    ids=[
        "usual",
        "no-final-newline",
        "crlf",
        "leading-text",
        "trailing-text",
        "two-blocks",
        "private-label",
        "other-oid",
        "short",
        "ec-key",
        "empty",
        "junk",
    ],
)
def test_same_answer_as_the_library(data: bytes) -> None:
    assert _ours(data) == _library(data)


def test_only_the_usual_form_skips_the_library() -> None:
    assert _usual_ed25519_pem(PEM) is not None
    assert _usual_ed25519_pem(PEM.rstrip(b"\n")) is not None
    for other in (PEM.replace(b"\n", b"\r\n"), b"x\n" + PEM, PEM + PEM, EC_PEM):
        assert _usual_ed25519_pem(other) is None


def test_non_canonical_base64_goes_to_the_library() -> None:
    """Spare bits set in the last base64 character: same bytes, other text."""
    body = PEM.split(b"\n")[1]
    assert body.endswith(b"=")
    last = body[-2:-1]
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = alphabet[alphabet.index(last) ^ 1 : alphabet.index(last) ^ 1 + 1]
    forged = PEM.replace(body, body[:-2] + twin + b"=")
    assert _usual_ed25519_pem(forged) is None
    assert _ours(forged) == _library(forged)
