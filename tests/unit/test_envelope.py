"""DSSE envelope: PAE, decoding, signature checking (no policy)."""

import base64
import hashlib
import itertools
import json
import re
import string
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from femd.ed25519 import PublicKey
from femd.envelope import (
    MAX_ENVELOPE_BYTES,
    PAYLOAD_TYPE,
    add_signature,
    b64decode,
    check_signatures,
    decode_envelope,
    encode_envelope,
    pae,
    sign,
)
from femd.errors import EnvelopeError
from femd.keys import keyid, load_public_key

INTEROP = Path(__file__).parent.parent / "data" / "interop"


def _pae(payload_type: str, body: bytes) -> bytes:
    """Independent PAE, written from the DSSE spec: LEN is the BYTE length."""
    t = payload_type.encode("utf-8")
    return b" ".join(
        [b"DSSEv1", str(len(t)).encode(), t, str(len(body)).encode(), body]
    )


def _env(payload: bytes, sigs, payload_type: str = PAYLOAD_TYPE) -> bytes:
    return json.dumps(
        {
            "payloadType": payload_type,
            "payload": base64.b64encode(payload).decode(),
            "signatures": [
                {"keyid": k, "sig": base64.b64encode(s).decode()} for k, s in sigs
            ],
        }
    ).encode()


# ---------------------------------------------------------------------------
# PAE


def test_pae_matches_the_dsse_spec_example():
    # DSSE protocol.md's worked example.
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_len_counts_bytes_not_characters():
    # "ü" is 1 character, 2 bytes; "€" 1 character, 3 bytes (sigstore's _pae bug).
    assert pae("ü", b"") == b"DSSEv1 2 \xc3\xbc 0 "
    body = "€uro".encode()
    assert pae("application/vnd.€", body) == _pae("application/vnd.€", body)
    assert pae("application/vnd.€", body).startswith(b"DSSEv1 19 ")
    assert b" 6 \xe2\x82\xacuro" in pae("t", body)


def test_pae_is_not_ambiguous_where_plain_concatenation_would_be():
    # Moving a space between type and body changes the encoding.
    assert pae("a b", b"c") != pae("a", b"b c")
    assert pae("a b", b"c") == b"DSSEv1 3 a b 1 c"
    assert pae("a", b"b c") == b"DSSEv1 1 a 3 b c"


# ---------------------------------------------------------------------------
# interop golden files (independent builder)


def _seed_key(name: str) -> Ed25519PrivateKey:
    seed = hashlib.sha256(f"femd interop test key {name}".encode()).digest()
    return Ed25519PrivateKey.from_private_bytes(seed)


def _interop_files() -> dict[str, bytes]:
    payload = (INTEROP / "task.json").read_bytes()
    t = PAYLOAD_TYPE.encode()
    files: dict[str, bytes] = {}
    sigs = []
    for name in ("orchestrator", "pi-smith"):
        k = _seed_key(name)
        pub = k.public_key()
        files[f"{name}.pub"] = pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        raw = pub.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        message = b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)
        sigs.append((hashlib.sha256(raw).hexdigest(), k.sign(message)))
    std = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {"keyid": kid, "sig": base64.b64encode(s).decode()} for kid, s in sigs
        ],
    }
    files["envelope-std.json"] = (json.dumps(std, indent=2) + "\n").encode()
    url = {
        "payload": base64.urlsafe_b64encode(payload).decode().rstrip("="),
        "payloadType": PAYLOAD_TYPE,
        "signatures": [
            {"sig": base64.urlsafe_b64encode(s).decode().rstrip("="), "keyid": kid}
            for kid, s in sigs
        ],
    }
    files["envelope-urlsafe-unpadded.json"] = json.dumps(
        url, separators=(",", ":")
    ).encode()
    return files


def test_interop_golden_files_are_what_the_independent_builder_writes():
    for name, data in _interop_files().items():
        assert (INTEROP / name).read_bytes() == data, name


def test_interop_golden_payload_len_differs_in_bytes_and_characters():
    payload = (INTEROP / "task.json").read_bytes()
    assert len(payload) != len(payload.decode())


@pytest.mark.parametrize(
    "name", ["envelope-std.json", "envelope-urlsafe-unpadded.json"], ids=["std", "url"]
)
def test_interop_envelope_verifies_with_femd(name):
    data = (INTEROP / name).read_bytes()
    trusted = {}
    for signer in ("orchestrator", "pi-smith"):
        key = load_public_key((INTEROP / f"{signer}.pub").read_bytes(), signer)
        trusted[keyid(key)] = key
    env, payload = decode_envelope(data)
    assert payload == (INTEROP / "task.json").read_bytes()
    check = check_signatures(env, payload, trusted)
    assert check.valid == frozenset(trusted)
    assert not check.invalid
    assert not check.unknown


def test_femd_signs_the_same_bytes_as_the_independent_builder():
    payload = (INTEROP / "task.json").read_bytes()
    keys = [_seed_key("orchestrator"), _seed_key("pi-smith")]
    ours = json.loads(encode_envelope(sign(payload, keys)))
    golden = json.loads((INTEROP / "envelope-std.json").read_bytes())
    assert ours == golden  # Ed25519 is deterministic


# ---------------------------------------------------------------------------
# keyid


def test_keyid_is_sha256_of_the_raw_public_key(keypair):
    kp = keypair()
    raw = kp.public.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert kp.keyid == keyid(kp.public) == hashlib.sha256(raw).hexdigest()
    assert len(kp.keyid) == 64
    assert kp.keyid == kp.keyid.lower()


# ---------------------------------------------------------------------------
# signatures


def _trusted(*kps):
    return {kp.keyid: PublicKey(kp.public.public_bytes_raw()) for kp in kps}


def test_signed_envelope_roundtrips_and_verifies(keypair):
    a, b = keypair(), keypair()
    env, payload = decode_envelope(encode_envelope(sign(b"hello", [a.private])))
    assert payload == b"hello"
    check = check_signatures(env, payload, _trusted(a, b))
    assert check.valid == {a.keyid}
    assert not check.invalid
    assert not check.unknown


def test_tampered_payload_is_invalid(keypair):
    a = keypair()
    good = json.loads(encode_envelope(sign(b'{"x": 1}', [a.private])))
    good["payload"] = base64.b64encode(b'{"x": 2}').decode()
    env, payload = decode_envelope(json.dumps(good).encode())
    check = check_signatures(env, payload, _trusted(a))
    assert check.invalid == {a.keyid}
    assert not check.valid


@pytest.mark.parametrize(
    "payload_type",
    [
        "application/vnd.femd.cancel+json",
        "application/vnd.femd.task+json ",
        "application/vnd.in-toto+json",
        "",
    ],
    ids=["other-femd-type", "trailing-space", "in-toto", "empty"],
)
def test_tampered_payload_type_is_refused(keypair, payload_type):
    a = keypair()
    data = _env(
        b"{}", [(a.keyid, a.private.sign(_pae(payload_type, b"{}")))], payload_type
    )
    with pytest.raises(EnvelopeError, match="payloadType"):
        decode_envelope(data)


@pytest.mark.parametrize(
    "message",
    [
        _pae("application/vnd.femd.other+json", b"{}"),
        b"{}",
        _pae(PAYLOAD_TYPE, base64.b64encode(b"{}")),
        b"DSSEv1 30 application/vnd.femd.task+json 2 {}x",
        b"DSSEv1 31 application/vnd.femd.task+json 2 {}",
        _pae(PAYLOAD_TYPE, b"{} "),
    ],
    ids=[
        "other-type",
        "raw-payload-no-pae",
        "pae-over-base64-text",
        "trailing-byte",
        "lying-type-len",
        "body-with-space",
    ],
)
def test_signature_over_anything_but_the_exact_pae_is_invalid(keypair, message):
    a = keypair()
    env, payload = decode_envelope(_env(b"{}", [(a.keyid, a.private.sign(message))]))
    check = check_signatures(env, payload, _trusted(a))
    assert check.invalid == {a.keyid}
    assert not check.valid


def test_signature_by_another_key_is_invalid(keypair):
    a, b = keypair(), keypair()
    # b signs, and says so; only a is trusted: b is unknown.
    env, payload = decode_envelope(encode_envelope(sign(b"x", [b.private])))
    assert check_signatures(env, payload, _trusted(a)).unknown == {b.keyid}


def test_keyid_that_lies_does_not_count(keypair):
    a, mallory = keypair(), keypair()
    # mallory signs but claims a's keyid
    sig = mallory.private.sign(pae(PAYLOAD_TYPE, b"x"))
    env, payload = decode_envelope(_env(b"x", [(a.keyid, sig)]))
    check = check_signatures(env, payload, _trusted(a, mallory))
    assert check.invalid == {a.keyid}
    assert not check.valid


def test_same_key_twice_counts_once(keypair):
    a = keypair()
    sig = a.private.sign(pae(PAYLOAD_TYPE, b"x"))
    env, payload = decode_envelope(_env(b"x", [(a.keyid, sig), (a.keyid, sig)]))
    check = check_signatures(env, payload, _trusted(a))
    assert check.valid == {a.keyid}


def test_good_signature_wins_over_a_bad_one_with_the_same_keyid(keypair):
    a = keypair()
    good = a.private.sign(pae(PAYLOAD_TYPE, b"x"))
    env, payload = decode_envelope(_env(b"x", [(a.keyid, b"\0" * 64), (a.keyid, good)]))
    check = check_signatures(env, payload, _trusted(a))
    assert check.valid == {a.keyid}
    assert not check.invalid


def test_unknown_and_missing_keyids_are_reported(keypair):
    a, stranger = keypair(), keypair()
    sig = stranger.private.sign(pae(PAYLOAD_TYPE, b"x"))
    env, payload = decode_envelope(_env(b"x", [(stranger.keyid, sig), ("", sig)]))
    check = check_signatures(env, payload, _trusted(a))
    assert check.unknown == {stranger.keyid, ""}


def test_empty_signatures_decode_and_verify_nothing(keypair):
    env, payload = decode_envelope(_env(b"x", []))
    assert check_signatures(env, payload, _trusted(keypair())) == check_signatures(
        env, payload, {}
    )
    assert not check_signatures(env, payload, {}).valid


@pytest.mark.parametrize(
    "sig",
    ["@@@@", "AAAA", "A", base64.b64encode(b"\0" * 64).decode() + "===", "é" * 8],
    ids=["not-b64", "too-short", "bad-length", "extra-padding", "non-ascii"],
)
def test_garbage_signature_is_invalid_not_an_error(keypair, sig):
    a = keypair()
    data = json.dumps(
        {
            "payloadType": PAYLOAD_TYPE,
            "payload": "eA==",
            "signatures": [{"keyid": a.keyid, "sig": sig}],
        }
    ).encode()
    env, payload = decode_envelope(data)
    assert check_signatures(env, payload, _trusted(a)).invalid == {a.keyid}


def test_add_signature_cosigns_and_keeps_a_key_once(keypair):
    a, b = keypair(), keypair()
    env = sign(b"x", [a.private])
    env = add_signature(env, b"x", [a.private, b.private])
    assert [s.keyid for s in env.signatures] == [a.keyid, b.keyid]
    decoded, payload = decode_envelope(encode_envelope(env))
    assert check_signatures(decoded, payload, _trusted(a, b)).valid == {
        a.keyid,
        b.keyid,
    }


# ---------------------------------------------------------------------------
# base64


@pytest.mark.parametrize(
    ("text", "raw"),
    [
        ("+/8=", b"\xfb\xff"),
        ("-_8=", b"\xfb\xff"),
        ("-_8", b"\xfb\xff"),
        ("+/8", b"\xfb\xff"),
        ("YQ", b"a"),
        ("YQ=", b"a"),
        ("", b""),
    ],
    ids=[
        "std",
        "urlsafe",
        "urlsafe-unpadded",
        "std-unpadded",
        "unpadded",
        "short-pad",
        "empty",
    ],
)
def test_base64_both_alphabets_padding_optional(text, raw):
    assert b64decode(text, "payload") == raw


@pytest.mark.parametrize(
    "text",
    [
        "+_8=",
        "YQ===",
        "AAAA====",
        "QUJD========",
        "Y",
        "YQ==YQ==",
        "Y Q==",
        "YQ==\n",
        "ü",
        "YQ=A",
        "%%%%",
    ],
    ids=[
        "mixed-alphabets",
        "too-much-padding",
        "padding-after-a-full-quantum",
        "two-quanta-of-padding",
        "bad-length",
        "padding-inside",
        "space",
        "newline",
        "non-ascii",
        "data-after-padding",
        "symbols",
    ],
)
def test_base64_garbage_is_refused(text):
    with pytest.raises(EnvelopeError, match="payload: not base64"):
        b64decode(text, "payload")


def _b64decode_before_the_fast_path(text: str) -> bytes | None:
    """``b64decode`` as it was before its one-call fast path (None: refused)."""
    raw = text.encode("ascii", "replace")
    if re.fullmatch(rb"[A-Za-z0-9+/]*={0,2}", raw):
        alt = None
    elif re.fullmatch(rb"[A-Za-z0-9_-]*={0,2}", raw):
        alt = b"-_"
    else:
        return None
    stripped = raw.rstrip(b"=")
    if len(stripped) % 4 == 1 or len(raw) - len(stripped) > (-len(stripped)) % 4:
        return None
    return base64.b64decode(stripped + b"=" * (-len(stripped) % 4), altchars=alt)


def _decoded_or_none(text: str) -> bytes | None:
    try:
        return b64decode(text, "payload")
    except EnvelopeError:
        return None


@pytest.mark.parametrize(
    ("alphabet", "longest"),
    [
        # Every class of symbol: zero bits, non-zero trailing bits, one of
        # each alphabet's own symbols, padding (all 8-char strings of all 65
        # symbols would be 3e14).
        ("AB/-=", 8),
        ("Qw+_=", 8),
        (string.ascii_letters + string.digits + "+/-_=", 2),
    ],
    ids=["zero-bits", "trailing-bits", "all-symbols"],
)
def test_base64_accepts_exactly_what_it_accepted_before(alphabet, longest):
    # The fast path must never widen what the strict checks accept (a second
    # encoding of the same payload is envelope malleability).
    for n in range(longest + 1):
        for chars in itertools.product(alphabet, repeat=n):
            text = "".join(chars)
            assert _decoded_or_none(text) == _b64decode_before_the_fast_path(text), text


def test_urlsafe_unpadded_envelope_verifies(keypair):
    a = keypair()
    payload = b"\xfb\xff\xfe" * 10
    sig = a.private.sign(pae(PAYLOAD_TYPE, payload))
    data = json.dumps(
        {
            "payloadType": PAYLOAD_TYPE,
            "payload": base64.urlsafe_b64encode(payload).decode().rstrip("="),
            "signatures": [
                {
                    "keyid": a.keyid,
                    "sig": base64.urlsafe_b64encode(sig).decode().rstrip("="),
                }
            ],
        }
    ).encode()
    env, decoded = decode_envelope(data)
    assert decoded == payload
    assert check_signatures(env, decoded, _trusted(a)).valid == {a.keyid}


# ---------------------------------------------------------------------------
# parser attacks on the envelope


GOOD_SIG = {"keyid": "k", "sig": "AAAA"}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "envelope: "),
        (b"not json", "envelope: "),
        (b"[]", "Expected `object`"),
        (
            b'{"payloadType": "application/vnd.femd.task+json", "payload": "eA=="}',
            "missing required field `signatures`",
        ),
        (
            b'{"payloadType": "application/vnd.femd.task+json", "payload": "eA==",'
            b' "signatures": [], "extra": 1}',
            "unknown field `extra`",
        ),
        (
            b'{"payloadType": "application/vnd.femd.task+json", "payload": "eA==",'
            b' "signatures": [{"keyid": "k", "sig": "AAAA", "cert": "x"}]}',
            "unknown field `cert`",
        ),
        (
            b'{"payloadType": "application/vnd.femd.task+json", "payload": 5,'
            b' "signatures": []}',
            "Expected `str`, got `int`",
        ),
        (
            b'{"payloadType": "application/vnd.femd.task+json", "payload": "eA==",'
            b' "signatures": {}}',
            "Expected `array`, got `object`",
        ),
        (
            b'{"payloadType": "application/vnd.femd.task+json", "payload": "eA==",'
            b' "payload": "eQ==", "signatures": []}',
            "duplicate key 'payload'",
        ),
        (
            b'{"payloadType": "application/vnd.femd.task+json", "payload": "eA==",'
            b' "signatures": [{"keyid": "a", "keyid": "b", "sig": "AAAA"}]}',
            "duplicate key 'keyid'",
        ),
        (
            b'{"payloadType": "application/vnd.femd.task+json", "payload": "eA==",'
            b' "signatures": [], "\\u0070ayload": "eQ=="}',
            "duplicate key 'payload'",
        ),
        (
            b'{"payloadType": "application/vnd.femd.task+json", "payload": "e\xffA==",'
            b' "signatures": []}',
            "envelope: ",
        ),
        (
            b'{"payloadType": "application/vnd.femd.task+json", "payload": "@@@@",'
            b' "signatures": []}',
            "payload: not base64",
        ),
        (b"[" * 100_000, "nests too deeply"),
        (b'{"a":' * 100_000, "nests too deeply"),
        (b'{"payload": ' + b"1" * 5000 + b"}", "envelope: "),
    ],
    ids=[
        "empty",
        "not-json",
        "array",
        "missing-signatures",
        "unknown-field",
        "unknown-signature-field",
        "payload-int",
        "signatures-object",
        "duplicate-payload",
        "duplicate-keyid",
        "duplicate-escaped-key",
        "bad-utf8",
        "payload-not-base64",
        "deep-array",
        "deep-object",
        "huge-integer",
    ],
)
def test_bad_envelopes_are_refused(data, match):
    with pytest.raises(EnvelopeError, match=match):
        decode_envelope(data)


def test_too_many_signatures_are_refused():
    data = json.dumps(
        {"payloadType": PAYLOAD_TYPE, "payload": "eA==", "signatures": [GOOD_SIG] * 65}
    ).encode()
    with pytest.raises(EnvelopeError, match="length <= 64"):
        decode_envelope(data)


def test_envelope_size_limit_is_on_the_bytes_received():
    head = b'{"payloadType": "application/vnd.femd.task+json", "signatures": [], '
    filler = b'"payload": "' + b"A" * MAX_ENVELOPE_BYTES
    over = head + filler + b'"}'
    assert len(over) > MAX_ENVELOPE_BYTES
    with pytest.raises(
        EnvelopeError, match=r"too large \(got \d+ bytes, limit 1048576\)"
    ):
        decode_envelope(over)
    at_limit = (
        head + b'"payload": "' + b"A" * (MAX_ENVELOPE_BYTES - len(head) - 14) + b'"}'
    )
    assert len(at_limit) == MAX_ENVELOPE_BYTES
    _, payload = decode_envelope(at_limit)
    assert len(payload) > 700_000


def test_envelope_size_limit_can_be_lowered():
    data = _env(b"x" * 2000, [])
    decode_envelope(data, max_bytes=len(data))
    with pytest.raises(EnvelopeError, match="too large"):
        decode_envelope(data, max_bytes=len(data) - 1)


def test_envelope_error_is_one_line():
    with pytest.raises(EnvelopeError) as e:
        decode_envelope(b'{\n\n  "payloadType": 1\n}')
    assert "\n" not in str(e.value)
