"""The DSSE envelope: decode, PAE, sign, and check signatures.

Owns the envelope wire format and the signature arithmetic. Holds no policy:
``check_signatures`` says which keys signed; which of them count, and for what,
is ``decision``'s business. Never decodes the payload.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Final, Literal

import msgspec
from msgspec import Meta

from femd.errors import EnvelopeError, cut
from femd.keys import keyid as keyid_of
from femd.model import (
    MAX_ENVELOPE_BYTES,
    DuplicateKeyError,
    Strict,
    refuse_duplicate_keys,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from femd.ed25519 import PublicKey

__all__ = [
    "MAX_ENVELOPE_BYTES",
    "PAYLOAD_TYPE",
    "Envelope",
    "SignatureCheck",
    "add_signature",
    "check_signatures",
    "decode_envelope",
    "encode_envelope",
    "pae",
    "sign",
    "too_large",
]

PAYLOAD_TYPE: Final = "application/vnd.femd.task+json"
MAX_SIGNATURES: Final = 64

_B64 = Annotated[str, Meta(max_length=2 * MAX_ENVELOPE_BYTES)]


class Signature(Strict, frozen=True):
    """One DSSE signature: who claims to sign (unauthenticated hint) and the bytes."""

    sig: _B64
    keyid: Annotated[str, Meta(max_length=256)] = ""


class Envelope(Strict, frozen=True):
    """A DSSE envelope as received; ``payload`` is still base64 text."""

    payloadType: Literal["application/vnd.femd.task+json"]
    payload: _B64
    signatures: Annotated[tuple[Signature, ...], Meta(max_length=MAX_SIGNATURES)]


class SignatureCheck(msgspec.Struct, frozen=True):
    """Which signatures verified (like TUF's VerificationResult).

    ``valid`` holds keyids of known keys whose signature verified (each once);
    ``invalid`` keyids of known keys whose signature did not; ``unknown`` keyids
    no trusted key has.
    """

    valid: frozenset[str] = frozenset()
    invalid: frozenset[str] = frozenset()
    unknown: frozenset[str] = frozenset()


_decoder: Final = msgspec.json.Decoder(Envelope)
_encoder: Final = msgspec.json.Encoder()
_STD = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_URL = re.compile(rb"[A-Za-z0-9_-]*={0,2}")


def b64decode(text: str, what: str) -> bytes:
    """Decode standard or URL-safe base64 (padding optional), strictly.

    Raises:
        EnvelopeError: not base64 in one of the two alphabets.
    """
    raw = text.encode("ascii", "replace")
    if len(raw) % 4 == 0:
        # The usual form (standard alphabet, padded) in one strict C call, kept
        # only if it is the canonical encoding of what it gave: strict_mode
        # takes "AAAA====" (padding after a full quantum), which must stay
        # refused (envelope malleability). Anything else gets the checks
        # below, which decide as before and say why.
        with contextlib.suppress(binascii.Error):
            out = binascii.a2b_base64(raw, strict_mode=True)
            if binascii.b2a_base64(out, newline=False) == raw:
                return out
    if _STD.fullmatch(raw):
        alt = None
    elif _URL.fullmatch(raw):
        alt = b"-_"
    else:
        raise EnvelopeError(f"envelope: {what}: not base64")
    stripped = raw.rstrip(b"=")
    if len(stripped) % 4 == 1 or len(raw) - len(stripped) > (-len(stripped)) % 4:
        raise EnvelopeError(f"envelope: {what}: not base64 (bad length or padding)")
    try:
        return base64.b64decode(stripped + b"=" * (-len(stripped) % 4), altchars=alt)
    except (binascii.Error, ValueError) as e:  # pragma: no cover (the regex and
        # length checks above already refuse what b64decode would)
        raise EnvelopeError(f"envelope: {what}: not base64") from e


def pae(payload_type: str, payload: bytes) -> bytes:
    """Return DSSE v1 Pre-Authentication Encoding; LEN counts bytes, not characters."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def too_large(size: int, max_bytes: int) -> EnvelopeError:
    """The error for an envelope of *size* bytes, over *max_bytes*."""
    return EnvelopeError(f"envelope: too large (got {size} bytes, limit {max_bytes})")


def decode_envelope(
    data: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES
) -> tuple[Envelope, bytes]:
    """Decode an envelope strictly and return it with its decoded payload bytes.

    Raises:
        EnvelopeError: too large, not JSON, duplicate keys, unknown fields,
            wrong payloadType, or bad base64.
    """
    if len(data) > max_bytes:
        raise too_large(len(data), max_bytes)
    try:
        refuse_duplicate_keys(data)
        env = _decoder.decode(data)
    except DuplicateKeyError as e:
        raise EnvelopeError(f"envelope: {e}") from e
    except (msgspec.DecodeError, ValueError) as e:
        raise EnvelopeError(f"envelope: {cut(e, 160)}") from e
    payload = b64decode(env.payload, "payload")
    return env, payload


def check_signatures(
    env: Envelope, payload: bytes, trusted: Mapping[str, PublicKey]
) -> SignatureCheck:
    """Verify every signature of *env* over PAE(payloadType, payload).

    A signature counts for the key its keyid names only if it verifies with that
    key; a keyid that lies (names a key that did not sign) therefore lands in
    ``invalid``. Repeats of a key count once.
    """
    message = pae(env.payloadType, payload)
    valid: set[str] = set()
    invalid: set[str] = set()
    unknown: set[str] = set()
    for s in env.signatures:
        key = trusted.get(s.keyid)
        if key is None:
            unknown.add(s.keyid)
            continue
        try:
            sig = b64decode(s.sig, "signature")
        except EnvelopeError:
            invalid.add(s.keyid)
            continue
        # SECURITY: verify over the raw payload bytes, before any decoding.
        (valid if key.verify(sig, message) else invalid).add(s.keyid)
    # DESIGN "signed envelope": a key with one good signature is valid even if
    # another signature carrying its keyid is bad.
    return SignatureCheck(
        frozenset(valid), frozenset(invalid - valid), frozenset(unknown)
    )


def _signature(key: Ed25519PrivateKey, payload_type: str, payload: bytes) -> Signature:
    sig = key.sign(pae(payload_type, payload))
    return Signature(
        sig=base64.b64encode(sig).decode(), keyid=keyid_of(key.public_key())
    )


def sign(payload: bytes, keys: Sequence[Ed25519PrivateKey]) -> Envelope:
    """Return a new envelope over *payload* signed by each of *keys*."""
    return Envelope(
        payloadType=PAYLOAD_TYPE,
        payload=base64.b64encode(payload).decode(),
        signatures=tuple(_signature(k, PAYLOAD_TYPE, payload) for k in keys),
    )


def add_signature(
    env: Envelope, payload: bytes, keys: Sequence[Ed25519PrivateKey]
) -> Envelope:
    """Return *env* plus signatures by *keys* (a key already present is kept once)."""
    present = {s.keyid for s in env.signatures}
    new = [
        _signature(k, env.payloadType, payload)
        for k in keys
        if keyid_of(k.public_key()) not in present
    ]
    return msgspec.structs.replace(env, signatures=env.signatures + tuple(new))


def encode_envelope(env: Envelope) -> bytes:
    """Return the envelope as compact JSON bytes."""
    return _encoder.encode(env)
