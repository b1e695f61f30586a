"""``femd keygen`` and ``femd sign``: keys and signed envelopes.

Owns how those two commands are spelled and what they print; keys are
``femd.keys``'s, envelopes ``femd.envelope``'s, manifests ``femd.manifest``'s.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import msgspec

from femd.cli.console import Subcommands, read_input, write_output
from femd.errors import InputError, ManifestError

__all__ = ["add_commands"]

logger = logging.getLogger("femd")


def add_commands(sub: Subcommands) -> None:
    """Add ``keygen`` and ``sign`` to the ``femd`` parser."""
    s = sub.add_parser("keygen", help="write NAME.key and NAME.pub, print the keyid")
    s.add_argument("name")
    s.add_argument("--dir", default=".", help="where to write (default: .)")
    s.set_defaults(func=_cmd_keygen)

    s = sub.add_parser("sign", help="sign a manifest (JSON or YAML) into an envelope")
    s.add_argument("manifest", nargs="?", help="manifest file (- for stdin)")
    s.add_argument("--key", action="append", required=True, help="private key (repeat)")
    s.add_argument("--add", metavar="ENVELOPE", help="add signatures to this envelope")
    s.add_argument("-o", "--output", help="write the envelope here (default stdout)")
    s.set_defaults(func=_cmd_sign)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from femd.keys import write_keypair

    private, public, kid = write_keypair(args.name, Path(args.dir))
    print(kid)
    logger.info("wrote %s and %s", private, public)
    return 0


def _load_manifest_doc(path: str) -> bytes:
    """Read a JSON or YAML manifest, validate it, return canonical JSON bytes."""
    from femd.manifest import Manifest, decode_manifest, encode_manifest
    from femd.plain import one_line
    from femd.yamlfile import YamlError, load_yaml

    raw = read_input(path, "manifest")
    if raw.lstrip()[:1] == b"{":
        manifest = decode_manifest(raw)
    else:
        try:
            data, _ = load_yaml(raw)
            # No builtin_types: YAML timestamps and quoted RFC 3339 strings both work.
            manifest = msgspec.convert(data, Manifest, strict=True)
        except YamlError as e:
            at = f" line {e.line}" if e.line else ""
            raise ManifestError(f"manifest {path}:{at} {e.message}") from e
        except msgspec.ValidationError as e:
            text = one_line(data, Manifest, str(e))
            raise ManifestError(f"manifest {path}: {text}") from e
    return encode_manifest(manifest)


def _cmd_sign(args: argparse.Namespace) -> int:
    from femd import envelope
    from femd.keys import load_private_key
    from femd.manifest import decode_manifest

    keys = [load_private_key(Path(k)) for k in args.key]
    if args.add:
        if args.manifest:
            raise InputError("sign: give either MANIFEST or --add ENVELOPE, not both")
        env, payload = envelope.decode_envelope(read_input(args.add, "envelope"))
        decode_manifest(payload)  # never co-sign something that is not a manifest
        signed = envelope.add_signature(env, payload, keys)
    else:
        if not args.manifest:
            raise InputError("sign: a MANIFEST file is required (or --add ENVELOPE)")
        payload = _load_manifest_doc(args.manifest)
        signed = envelope.sign(payload, keys)
    write_output(args.output, envelope.encode_envelope(signed) + b"\n")
    return 0
