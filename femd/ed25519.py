"""Ed25519 verification by the OpenSSL that Python's ``ssl`` runs on.

Owns ``PublicKey``: a raw 32-byte Ed25519 public key (RFC 8032) that verifies
a signature over a message, and nothing else. An agent only ever verifies
(DESIGN "signed envelope"); the libcrypto its TLS link runs on is already in
the process, linked by ``_ssl``, and its EVP interface verifies Ed25519. Four
calls into it, bound here with ctypes through ``_ssl``'s own handle (so the
very library ``ssl`` uses), spare an agent cryptography's Rust extension
(~6 MB resident, ~10 ms of start-up). Signing (the CLI, the orchestrator's
client) stays with cryptography. Verification follows the host's OpenSSL
configuration (``openssl.cnf``, providers), as the TLS link does.

Fails closed: a libcrypto that cannot be loaded, or that cannot make an
Ed25519 key (e.g. a configuration without it), is an error when a key is made
(the policy then does not load), never a signature that quietly fails or
passes. So is a key of small order, for which signatures verify without a
private key (OpenSSL, like cryptography, accepts it; ``small_order()``), and
bytes off the curve, with which no signature verifies (a signer who could
never sign: said when the policy loads, not found out at the first task). A
signature verifies only when OpenSSL says 1. A key cannot be copied or
pickled (the copy would hold a pointer it does not own), nor changed, and
stays usable until the interpreter is gone.
"""

from __future__ import annotations

import _ssl
import ctypes
import functools
import weakref
from ctypes import c_char_p, c_int, c_size_t, c_void_p
from typing import Final, NoReturn

__all__ = [
    "KEY_BYTES",
    "SIGNATURE_BYTES",
    "Point",
    "PublicKey",
    "add",
    "decode_point",
    "small_order",
]

KEY_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64
_NID_ED25519: Final = 1087  # OpenSSL's obj_mac.h, stable since 1.1.1
_FALLBACK: Final = "libcrypto.so.3"

# The curve (RFC 8032 section 5.1), twisted Edwards: -x^2 + y^2 = 1 + d x^2 y^2.
_P: Final = 2**255 - 19
_D: Final = -121665 * pow(121666, -1, _P) % _P
_SQRT_M1: Final = pow(2, (_P - 1) // 4, _P)

Point = tuple[int, int]


def decode_point(raw: bytes) -> Point | None:
    """The point (x, y) of a 32-byte encoding, or None when it is off the curve.

    Read as OpenSSL reads it: RFC 8032 section 5.1.3 without two of its
    checks, y < p (y is taken mod p) and x = 0 with the sign bit set (x stays
    0), so a non-canonical encoding names the point OpenSSL verifies with.
    """
    n = int.from_bytes(raw, "little")
    y, sign = (n & ((1 << 255) - 1)) % _P, n >> 255
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if v * x * x % _P == -u % _P:
        x = x * _SQRT_M1 % _P
    if v * x * x % _P != u:
        return None
    if x & 1 != sign:
        x = -x % _P
    return x, y


def add(a: Point, b: Point) -> Point:
    """The sum of two points (the addition law is complete: no exceptions)."""
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    x = (x1 * y2 + y1 * x2) * pow(1 + t, -1, _P) % _P
    y = (y1 * y2 + x1 * x2) * pow(1 - t, -1, _P) % _P
    return x, y


def small_order(raw: bytes) -> bool:
    """True when *raw* is a point of order 1, 2, 4 or 8 (8 * P is the identity).

    SECURITY: for such a key a signature verifies without any private key
    (the identity point accepts R = the identity, S = 0 for every message).
    """
    point = decode_point(raw)
    return point is not None and _order_divides_8(point)


def _order_divides_8(point: Point) -> bool:
    for _ in range(3):
        point = add(point, point)
    return point == (0, 1)


def _open() -> ctypes.CDLL:
    """The libcrypto ``ssl`` runs on, else the system's by soname.

    ``dlsym`` on a library's handle also searches the libraries it links, so
    through ``_ssl``'s handle the EVP functions are those of its libcrypto. A
    Python whose ``_ssl`` is built in, or does not export OpenSSL's symbols,
    gets ``libcrypto.so.3``.
    """
    path = getattr(_ssl, "__file__", None)
    if path is not None:
        lib = ctypes.CDLL(path)
        if hasattr(lib, "EVP_DigestVerify"):
            return lib
    return ctypes.CDLL(_FALLBACK)


@functools.cache
def _lib() -> ctypes.CDLL:
    """The libcrypto, with the prototypes used here (a failure is not cached).

    Raises:
        ValueError: no libcrypto, or one without these functions.
    """
    try:
        lib = _open()
        lib.EVP_PKEY_new_raw_public_key.restype = c_void_p
        lib.EVP_PKEY_new_raw_public_key.argtypes = [c_int, c_void_p, c_char_p, c_size_t]
        lib.EVP_PKEY_free.restype = None
        lib.EVP_PKEY_free.argtypes = [c_void_p]
        lib.EVP_MD_CTX_new.restype = c_void_p
        lib.EVP_MD_CTX_new.argtypes = []
        lib.EVP_MD_CTX_free.restype = None
        lib.EVP_MD_CTX_free.argtypes = [c_void_p]
        lib.EVP_DigestVerifyInit.restype = c_int
        lib.EVP_DigestVerifyInit.argtypes = [c_void_p] * 5
        lib.EVP_DigestVerify.restype = c_int
        lib.EVP_DigestVerify.argtypes = [
            c_void_p,
            c_char_p,
            c_size_t,
            c_char_p,
            c_size_t,
        ]
        lib.ERR_clear_error.restype = None
        lib.ERR_clear_error.argtypes = []
    except (OSError, AttributeError) as e:
        raise ValueError(f"cannot load libcrypto for Ed25519 verification: {e}") from e
    return lib


class PublicKey:
    """An Ed25519 public key held by libcrypto; compares by its raw bytes."""

    __slots__ = ("__weakref__", "_pkey", "_raw")
    _raw: bytes
    _pkey: int

    def __init__(self, raw: bytes) -> None:
        """Make the key from its 32 raw bytes (copied: a later change is not seen).

        Raises:
            ValueError: not 32 bytes, not a point of the curve (no signature
                could verify), of small order (any could), or libcrypto cannot
                make an Ed25519 key.
        """
        if hasattr(self, "_pkey"):
            raise AttributeError("an Ed25519 PublicKey cannot be changed")
        raw = bytes(raw)
        if len(raw) != KEY_BYTES:
            n = len(raw)
            raise ValueError(f"an Ed25519 public key is {KEY_BYTES} bytes, not {n}")
        point = decode_point(raw)
        if point is None:
            raise ValueError("not a point of the Ed25519 curve: no signature verifies")
        if _order_divides_8(point):
            raise ValueError("a small-order Ed25519 point: anyone could sign for it")
        lib = _lib()
        pkey = lib.EVP_PKEY_new_raw_public_key(_NID_ED25519, None, raw, KEY_BYTES)
        if not pkey:
            lib.ERR_clear_error()
            raise ValueError("libcrypto cannot make an Ed25519 public key")
        object.__setattr__(self, "_raw", raw)
        object.__setattr__(self, "_pkey", pkey)
        # Freed with the key, not by atexit: a thread may verify until the end.
        weakref.finalize(self, lib.EVP_PKEY_free, pkey).atexit = False

    def __setattr__(self, name: str, value: object) -> NoReturn:
        """Refuse: the bytes and the key OpenSSL holds must stay one."""
        raise AttributeError("an Ed25519 PublicKey cannot be changed")

    def __delattr__(self, name: str) -> NoReturn:
        """Refuse, as ``__setattr__``."""
        raise AttributeError("an Ed25519 PublicKey cannot be changed")

    def __copy__(self) -> PublicKey:
        """The key itself (immutable; a copy would hold a pointer it does not own)."""
        return self

    def __deepcopy__(self, memo: object) -> PublicKey:
        """The key itself, as ``__copy__``."""
        return self

    def __reduce__(self) -> NoReturn:
        """Refuse to pickle: a key is made from its bytes, in the process using it."""
        raise TypeError("an Ed25519 PublicKey cannot be pickled; pickle its bytes")

    def public_bytes_raw(self) -> bytes:
        """The key's 32 raw bytes."""
        return self._raw

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True only when *signature* is this key's Ed25519 signature of *message*.

        Raises:
            MemoryError: libcrypto could not allocate a context.
        """
        if len(signature) != SIGNATURE_BYTES:
            return False
        lib = _lib()
        ctx = lib.EVP_MD_CTX_new()
        if not ctx:
            raise MemoryError("libcrypto: EVP_MD_CTX_new failed")
        try:
            # Ed25519 is one-shot: no digest (NULL), the whole message at once.
            ok: bool = (
                lib.EVP_DigestVerifyInit(ctx, None, None, None, self._pkey) == 1
                and lib.EVP_DigestVerify(
                    ctx, signature, SIGNATURE_BYTES, message, len(message)
                )
                == 1
            )
        finally:
            lib.EVP_MD_CTX_free(ctx)
        if not ok:
            lib.ERR_clear_error()  # leave no stale error for the ssl module
        return ok

    def __eq__(self, other: object) -> bool:
        """Equal to a key with the same bytes."""
        if not isinstance(other, PublicKey):
            return NotImplemented
        return self._raw == other._raw

    def __hash__(self) -> int:
        """The hash of the key's bytes."""
        return hash(self._raw)

    def __repr__(self) -> str:
        """The key's bytes in hex."""
        return f"PublicKey({self._raw.hex()})"
