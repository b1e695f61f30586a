"""Ed25519 keys: generate, load, write, and name them.

Owns the key file formats (PKCS#8 PEM private keys written 0600,
SubjectPublicKeyInfo PEM public keys) and ``keyid()``. Knows nothing of
envelopes or policies. An agent loads only public keys, as ``femd.ed25519``
keys (verified by the libcrypto ``ssl`` loaded): the usual PEM of an Ed25519
key is read here, anything else by cryptography's PEM loader, which an agent
then never imports (~6 MB and ~10 ms of start-up). Private keys (signing:
the CLI, the orchestrator's client) are cryptography's.
"""

from __future__ import annotations

import binascii
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

from femd.ed25519 import PublicKey
from femd.errors import InputError, cut

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "generate",
    "keyid",
    "load_private_key",
    "load_public_key",
    "public_pem",
    "write_keypair",
]


def keyid(key: PublicKey | Ed25519PublicKey) -> str:
    """Return the lowercase hex SHA-256 of the key's raw 32 bytes (DESIGN "keyid")."""
    return hashlib.sha256(key.public_bytes_raw()).hexdigest()


def generate() -> Ed25519PrivateKey:
    """Return a new Ed25519 private key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def public_pem(key: Ed25519PublicKey) -> bytes:
    """Return *key* as SubjectPublicKeyInfo PEM."""
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_keypair(name: str, directory: Path) -> tuple[Path, Path, str]:
    """Write ``NAME.key`` (PKCS#8 PEM, 0600) and ``NAME.pub`` into *directory*.

    Returns:
        The private key path, the public key path and the keyid.

    Raises:
        InputError: the name is unusable or a file already exists or cannot be written.
    """
    if not name or "/" in name or name.startswith(".") or "\x00" in name:
        raise InputError(f"keygen: invalid key name (got {cut(name)!r})")
    private = directory / f"{name}.key"
    public = directory / f"{name}.pub"
    from cryptography.hazmat.primitives import serialization

    key = generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for path in (private, public):
            if path.exists():
                raise InputError(f"keygen: {path}: already exists, not overwritten")
        # SECURITY: created 0600 atomically (O_EXCL), never world-readable in between.
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        public.write_bytes(public_pem(key.public_key()))
    except OSError as e:
        raise InputError(
            f"keygen: cannot write keys: {e.strerror} ({e.filename})"
        ) from e
    return private, public, keyid(key.public_key())


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"{what} {path}: {e.strerror}") from e


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from a PEM (PKCS#8) file.

    Raises:
        InputError: unreadable, not PEM, encrypted, or not Ed25519.
    """
    data = _read(path, "private key")
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise InputError(
            f"private key {path}: not an unencrypted PEM private key"
        ) from e
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"private key {path}: not an Ed25519 key")
    return key


def load_public_key(data: bytes, where: str) -> PublicKey:
    """Parse an Ed25519 public key from SubjectPublicKeyInfo PEM bytes.

    Raises:
        InputError: not PEM, not Ed25519, or this host cannot verify Ed25519
            (``femd.ed25519``); the message starts with *where*.
    """
    raw = _usual_ed25519_pem(data)
    if raw is None:
        raw = _other_pem(data, where)
    try:
        return PublicKey(raw)
    except ValueError as e:
        raise InputError(f"{where}: {e}") from e


def _other_pem(data: bytes, where: str) -> bytes:
    """The raw bytes of an Ed25519 key in any PEM form cryptography reads."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise InputError(f"{where}: not a PEM public key") from e
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(f"{where}: not an Ed25519 public key")
    return key.public_bytes_raw()


# DER of an Ed25519 SubjectPublicKeyInfo (RFC 8410) before its 32 key bytes:
# SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING (0 unused bits) }.
_ED25519_SPKI: Final = bytes.fromhex("302a300506032b6570032100")
_BEGIN: Final = b"-----BEGIN PUBLIC KEY-----"
_END: Final = b"-----END PUBLIC KEY-----"


def _usual_ed25519_pem(data: bytes) -> bytes | None:
    """The 32 key bytes of the PEM ``public_pem()`` writes, else None.

    Only that exact form (one block, its one base64 line, LF line ends, an
    optional final newline) is read here; for every other input cryptography
    decides, so what is accepted or refused, and why, does not change.
    """
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    if len(lines) != 3 or lines[0] != _BEGIN or lines[2] != _END:
        return None
    try:
        der = binascii.a2b_base64(lines[1], strict_mode=True)
    except binascii.Error:
        return None
    if len(der) != 44 or not der.startswith(_ED25519_SPKI):
        return None
    if binascii.b2a_base64(der, newline=False) != lines[1]:
        return None  # not the canonical encoding of what it gave
    return der[len(_ED25519_SPKI) :]
