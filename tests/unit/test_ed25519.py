"""femd.ed25519: the agent's Ed25519 verifier, on the libcrypto ``ssl`` loaded.

Checked against what nobody here wrote: RFC 8032's test vectors (section 7.1)
and, differentially, cryptography's verifier over valid, tampered, malleated
and random signatures. The failure branches (no libcrypto, a NULL key or
context) are driven through a stand-in library: the real one never fails so.
"""

from __future__ import annotations

import array
import base64
import copy
import ctypes
import os
import pickle
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from femd import ed25519
from femd.ed25519 import Point, PublicKey, add, decode_point, small_order
from femd.errors import InputError
from femd.keys import _ED25519_SPKI, load_public_key, public_pem

# RFC 8032 section 7.1, TEST 1, 2 and 3: public key, message, signature.
RFC8032 = [
    (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555f"
        "b8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da08"
        "5ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18"
        "ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
]
# The order of the Ed25519 group (RFC 8032 section 5.1): S must be below it.
L = 2**252 + 27742317777372353535851937790883648493


@pytest.mark.parametrize(("pk", "msg", "sig"), RFC8032)
def test_rfc8032_vectors_verify_and_any_flipped_bit_fails(pk, msg, sig):
    key = PublicKey(bytes.fromhex(pk))
    message, signature = bytes.fromhex(msg), bytes.fromhex(sig)
    assert key.verify(signature, message)
    for i in range(len(signature) * 8):
        flipped = bytearray(signature)
        flipped[i // 8] ^= 1 << (i % 8)
        assert not key.verify(bytes(flipped), message), i
    assert not key.verify(signature, message + b"\0")


def _cryptography_verifies(raw: bytes, sig: bytes, msg: bytes) -> bool:
    """cryptography's verdict on *sig* over *msg* by the key *raw*."""
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(sig, msg)
    except InvalidSignature:
        return False
    return True


def test_agrees_with_cryptography_on_valid_tampered_and_random_signatures():
    for n in range(40):
        private = Ed25519PrivateKey.generate()
        raw = private.public_key().public_bytes_raw()
        key = PublicKey(raw)
        msg = os.urandom(n * 13)
        good = private.sign(msg)
        cases = [
            good,
            good[:63] + bytes([good[63] ^ 0x80]),
            good[:-1],
            good + b"\0",
            os.urandom(64),
            b"\0" * 64,
            b"",
        ]
        for sig in cases:
            assert key.verify(sig, msg) is _cryptography_verifies(raw, sig, msg)
        assert key.verify(good, msg) is True


def test_a_malleated_signature_s_plus_l_is_refused():
    """S + L verifies the same equation; RFC 8032 requires S < L (no malleability)."""
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes_raw()
    key = PublicKey(raw)
    sig = private.sign(b"task")
    s = int.from_bytes(sig[32:], "little") + L
    malleated = sig[:32] + s.to_bytes(32, "little")
    assert not _cryptography_verifies(raw, malleated, b"task")
    assert not key.verify(malleated, b"task")


IDENTITY = (1).to_bytes(32, "little")  # the neutral point (0, 1)
ON_CURVE = bytes.fromhex(RFC8032[0][0])
# Two order-8 points as libsodium's small-order blocklist spells them.
PUBLISHED_ORDER_8 = [
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
]


def _encode(point: Point) -> bytes:
    x, y = point
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _times(k: int, point: Point) -> Point:
    out: Point = (0, 1)
    while k:
        if k & 1:
            out = add(out, point)
        point, k = add(point, point), k >> 1
    return out


def _torsion() -> set[bytes]:
    """The 8 points of order dividing 8: [L]Q for points Q off the prime-order group."""
    found: set[bytes] = set()
    for seed in range(2000):
        q = decode_point(seed.to_bytes(32, "little"))
        if q is not None:
            found.add(_encode(_times(L, q)))
        if len(found) == 8:
            return found
    raise AssertionError(f"only {len(found)} torsion points found")


def test_a_small_order_key_lets_anyone_sign_and_is_refused():
    """The identity key accepts R = identity, S = 0 for any message (in
    cryptography too, which we did not write): femd refuses to make such a key."""
    forged = IDENTITY + bytes(32)
    for message in (b"", b"any task at all"):
        Ed25519PublicKey.from_public_bytes(IDENTITY).verify(forged, message)
    with pytest.raises(ValueError, match=r"small-order .* anyone could sign"):
        PublicKey(IDENTITY)
    pem = b"-----BEGIN PUBLIC KEY-----\n%s\n-----END PUBLIC KEY-----\n" % (
        base64.b64encode(_ED25519_SPKI + IDENTITY)
    )
    with pytest.raises(InputError, match=r"^key: a small-order Ed25519 point"):
        load_public_key(pem, "key")


def test_every_point_of_small_order_is_refused_in_every_spelling():
    torsion = _torsion()
    assert IDENTITY in torsion
    assert {bytes.fromhex(h) for h in PUBLISHED_ORDER_8} <= torsion
    p = 2**255 - 19
    spellings = set(torsion)
    for raw in torsion:
        n = int.from_bytes(raw, "little")
        y = n & ((1 << 255) - 1)
        spellings.add((n ^ 1 << 255).to_bytes(32, "little"))  # the other sign
        if y + p < 1 << 255:
            spellings.add((n + p).to_bytes(32, "little"))  # y not reduced
    assert len(spellings) > 8
    for raw in spellings:
        assert small_order(raw), raw.hex()
        with pytest.raises(ValueError, match="small-order"):
            PublicKey(raw)


def test_real_keys_load_and_bytes_off_the_curve_are_refused():
    for _ in range(20):
        raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        assert not small_order(raw)
        assert PublicKey(raw).public_bytes_raw() == raw
    off = next(
        raw
        for raw in (y.to_bytes(32, "little") for y in range(2, 100))
        if decode_point(raw) is None
    )
    assert not small_order(off)
    with pytest.raises(ValueError, match="not a point of the Ed25519 curve"):
        PublicKey(off)
    # OpenSSL takes those bytes as a key; nothing verifies with them.
    assert not _cryptography_verifies(off, IDENTITY + bytes(32), b"m")


def test_a_point_is_read_as_openssl_reads_it():
    """The sign bit picks x's parity; y is taken mod p; x = 0 keeps its sign bit."""
    p = 2**255 - 19
    raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    point = decode_point(raw)
    assert point is not None
    assert _encode(point) == raw
    n = int.from_bytes(raw, "little")
    flipped = decode_point((n ^ 1 << 255).to_bytes(32, "little"))
    assert flipped == ((-point[0]) % p, point[1])
    assert decode_point((p + 1).to_bytes(32, "little")) == (0, 1)
    assert decode_point((1 | 1 << 255).to_bytes(32, "little")) == (0, 1)
    # OpenSSL agrees: the identity with the sign bit set still takes the forgery.
    forged = IDENTITY + bytes(32)
    assert _cryptography_verifies((1 | 1 << 255).to_bytes(32, "little"), forged, b"m")


def test_a_key_must_be_32_bytes():
    for raw in (b"", b"\1" * 31, b"\1" * 33):
        with pytest.raises(ValueError, match="32 bytes"):
            PublicKey(raw)


def test_keys_compare_and_hash_by_their_bytes():
    raw = bytes.fromhex(RFC8032[0][0])
    a, b = PublicKey(raw), PublicKey(raw)
    other = PublicKey(bytes.fromhex(RFC8032[1][0]))
    assert a == b
    assert hash(a) == hash(b)
    assert a.public_bytes_raw() == raw
    assert a != other
    assert a != raw  # not a key: NotImplemented, then identity
    assert RFC8032[0][0] in repr(a)


def _ssl_libcrypto() -> ctypes.CDLL:
    import _ssl

    lib = ctypes.CDLL(_ssl.__file__)
    lib.ERR_peek_error.restype = ctypes.c_ulong
    lib.EVP_PKEY_new_raw_public_key.restype = ctypes.c_void_p
    lib.EVP_PKEY_new_raw_public_key.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
    ]  # fmt: skip
    return lib


def test_a_failed_verify_leaves_no_openssl_error_behind():
    """A failure clears this thread's OpenSSL error queue, for ssl after it."""
    lib = _ssl_libcrypto()
    key = PublicKey(bytes.fromhex(RFC8032[0][0]))
    for sig in (b"\xff" * 64, bytes.fromhex(RFC8032[1][2])):
        # An error on the queue first (a 31-byte key is refused with one).
        assert not lib.EVP_PKEY_new_raw_public_key(1087, None, b"\1" * 31, 31)
        assert lib.ERR_peek_error() != 0
        assert not key.verify(sig, b"")
        assert lib.ERR_peek_error() == 0


def test_the_functions_are_those_of_the_libcrypto_ssl_links():
    lib = ed25519._lib()
    at = ctypes.cast(lib.EVP_DigestVerify, ctypes.c_void_p).value
    assert at is not None
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= at < hi:
            mapped.append(fields[5] if len(fields) > 5 else "")
    assert len(mapped) == 1
    assert Path(mapped[0]).name.startswith("libcrypto.so")


def test_verifies_from_many_threads_at_once():
    private = Ed25519PrivateKey.generate()
    key = PublicKey(private.public_key().public_bytes_raw())
    msgs = [os.urandom(100) for _ in range(8)]
    sigs = [private.sign(m) for m in msgs]
    wrong: list[int] = []

    def work(i: int) -> None:
        for _ in range(50):
            if not key.verify(sigs[i], msgs[i]) or key.verify(sigs[i], msgs[i - 1]):
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


@pytest.fixture
def fresh_lib():
    ed25519._lib.cache_clear()
    yield
    ed25519._lib.cache_clear()


def test_no_libcrypto_fails_closed_with_one_line(fresh_lib, monkeypatch):
    def missing(path: str) -> None:
        raise OSError(f"{path}: cannot open shared object file")

    monkeypatch.setattr(ed25519.ctypes, "CDLL", missing)
    with pytest.raises(ValueError, match="cannot load libcrypto for Ed25519"):
        PublicKey(ON_CURVE)
    pem = public_pem(Ed25519PrivateKey.generate().public_key())
    with pytest.raises(InputError, match=r"^key: cannot load libcrypto"):
        load_public_key(pem, "key")


class _Loader:
    """``ctypes.CDLL`` as seen by ``_open()``: which paths it opened."""

    def __init__(self, exports: bool) -> None:
        self.opened: list[str] = []
        self.exports = exports

    def __call__(self, path: str) -> object:
        self.opened.append(path)
        lib = _stand_in()
        if not self.exports and path != ed25519._FALLBACK:
            del lib.EVP_DigestVerify
        return lib


@pytest.mark.parametrize(
    ("ssl_module", "exports", "opened"),
    [
        (types.SimpleNamespace(__file__="/x/_ssl.so"), True, ["/x/_ssl.so"]),
        (
            types.SimpleNamespace(__file__="/x/_ssl.so"),
            False,
            ["/x/_ssl.so", "libcrypto.so.3"],
        ),
        (types.SimpleNamespace(), True, ["libcrypto.so.3"]),
    ],
    ids=["through _ssl", "_ssl hides OpenSSL", "_ssl built in"],
)
def test_the_library_is_ssls_else_the_system_soname(
    fresh_lib, monkeypatch, ssl_module, exports, opened
):
    loader = _Loader(exports)
    monkeypatch.setattr(ed25519, "_ssl", ssl_module)
    monkeypatch.setattr(ed25519.ctypes, "CDLL", loader)
    ed25519._lib()
    assert loader.opened == opened


def _stand_in(**calls):
    lib = types.SimpleNamespace(
        EVP_PKEY_new_raw_public_key=lambda *a: 1,
        EVP_PKEY_free=lambda p: None,
        EVP_MD_CTX_new=lambda: 2,
        EVP_MD_CTX_free=lambda c: None,
        EVP_DigestVerifyInit=lambda *a: 1,
        EVP_DigestVerify=lambda *a: 1,
        ERR_clear_error=lambda: None,
    )
    for name, call in calls.items():
        setattr(lib, name, call)
    return lib


def test_a_libcrypto_that_cannot_make_the_key_is_an_error(monkeypatch):
    monkeypatch.setattr(ed25519, "_lib", lambda: _stand_in(
        EVP_PKEY_new_raw_public_key=lambda *a: None))  # fmt: skip
    with pytest.raises(ValueError, match="cannot make an Ed25519 public key"):
        PublicKey(ON_CURVE)


def test_only_a_one_from_openssl_is_a_valid_signature(monkeypatch):
    sig = b"\1" * 64
    monkeypatch.setattr(ed25519, "_lib", lambda: _stand_in())
    key = PublicKey(ON_CURVE)
    assert key.verify(sig, b"m")
    for init, verify in ((0, 1), (-1, 1), (1, 0), (1, -1), (1, 2)):
        lib = _stand_in(
            EVP_DigestVerifyInit=lambda *a, i=init: i,
            EVP_DigestVerify=lambda *a, v=verify: v,
        )
        monkeypatch.setattr(ed25519, "_lib", lambda lib=lib: lib)
        assert not key.verify(sig, b"m"), (init, verify)
    monkeypatch.setattr(ed25519, "_lib", lambda: _stand_in(EVP_MD_CTX_new=lambda: None))
    with pytest.raises(MemoryError):
        key.verify(sig, b"m")


def test_a_key_is_not_copied_pickled_or_changed():
    """A copy would hold OpenSSL's pointer without owning it (use after free)."""
    private = Ed25519PrivateKey.generate()
    key = PublicKey(private.public_key().public_bytes_raw())
    assert copy.copy(key) is key
    assert copy.deepcopy({"k": key})["k"] is key
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(key)
    for name in ("_raw", "_pkey", "other"):
        with pytest.raises(AttributeError, match="cannot be changed"):
            setattr(key, name, b"\0" * 32)
    assert key.verify(private.sign(b"m"), b"m")


def test_the_length_is_that_of_the_bytes_made():
    wide = memoryview(array.array("I", [0] * 32))  # len 32, 128 bytes
    with pytest.raises(ValueError, match="32 bytes, not 128"):
        PublicKey(wide)


def test_a_key_is_not_deleted_or_made_again():
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    key = PublicKey(ON_CURVE)
    for name in ("_raw", "_pkey"):
        with pytest.raises(AttributeError, match="cannot be changed"):
            delattr(key, name)
    with pytest.raises(AttributeError, match="cannot be changed"):
        key.__init__(other)
    assert key.public_bytes_raw() == ON_CURVE


def test_the_key_bytes_are_copied_when_made():
    private = Ed25519PrivateKey.generate()
    raw = bytearray(private.public_key().public_bytes_raw())
    key = PublicKey(raw)
    raw[:] = bytes(32)
    assert key.public_bytes_raw() == private.public_key().public_bytes_raw()
    assert key.verify(private.sign(b"m"), b"m")


def test_a_key_verifies_until_the_interpreter_is_gone():
    """Daemon threads verify during exit: no key is freed under them by atexit."""
    code = (
        "import atexit, threading, time\n"
        "from cryptography.hazmat.primitives.asymmetric.ed25519 import "
        "Ed25519PrivateKey\n"
        "bad = []\n"
        "atexit.register(lambda: (time.sleep(0.3), print(len(bad), flush=True)))\n"
        "from femd.ed25519 import PublicKey\n"
        "p = Ed25519PrivateKey.generate()\n"
        "k = PublicKey(p.public_key().public_bytes_raw())\n"
        "sig = p.sign(b'm')\n"
        "def work():\n"
        "    while True:\n"
        "        if not k.verify(sig, b'm'):\n"
        "            bad.append(1)\n"
        "for _ in range(2):\n"
        "    threading.Thread(target=work, daemon=True).start()\n"
        "time.sleep(0.2)\n"
    )
    for _ in range(3):
        out = subprocess.run(  # noqa: S603 (this interpreter, our own code)
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr[-300:]
        assert out.stdout.strip() == "0"


def test_an_agent_verifies_without_importing_cryptography(tmp_path):
    """The policy keys load and a signature verifies; cryptography never loads."""
    private = Ed25519PrivateKey.generate()
    pub = tmp_path / "k.pub"
    pub.write_bytes(public_pem(private.public_key()))
    sig = private.sign(b"x")
    code = (
        "import sys\n"
        "import femd.agent, femd.cli, femd.earlylink, femd.earlyprobe\n"
        "from femd.keys import load_public_key\n"
        f"key = load_public_key(open({str(pub)!r}, 'rb').read(), 'k')\n"
        f"assert key.verify({sig!r}, b'x')\n"
        "print(sorted(m for m in sys.modules if m.startswith('cryptography')))\n"
    )
    out = subprocess.run(  # noqa: S603 (this interpreter, our own code)
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
