"""Canonical JSON, SHA-256 and Ed25519 signatures for medkd's audit records and receipts.

Both ends use it: a hospital signs its outbound audit log
(:mod:`client.audit_log`), the coordinator signs receipts
(:mod:`server.receipts`). Keys are Ed25519 (RFC 8032) from ``cryptography``;
a private key lives in a PEM file (mode 0600) in its owner's folder, and a
public key travels as 64 hex digits of its raw 32 bytes.

The hash of a record is SHA-256 over its canonical JSON: keys sorted, no
spaces, UTF-8, NaN and infinity refused, so that any reader re-serialising
the parsed record gets the same bytes back.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import MedkdError

__all__ = ["SigningError", "canonical", "digest", "load_or_create_key", "load_private_key", "public_hex",
           "public_from_hex", "key_id", "sign", "verify_signature", "receipt_hash", "receipt_valid", "RECEIPT_DOMAIN"]


class SigningError(MedkdError, ValueError):
    """A key file or a public key is unreadable; the message names the file or the field."""


def canonical(obj: object) -> bytes:
    """The canonical JSON bytes of ``obj`` (sorted keys, compact, UTF-8, finite numbers only)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def digest(obj: object) -> str:
    """SHA-256 (hex) of ``obj``'s canonical JSON."""
    return hashlib.sha256(canonical(obj)).hexdigest()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in the PEM file ``path``."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise SigningError(f"{path}: cannot read the Ed25519 private key ({e})") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path}: holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The key in ``path``, created (mode 0600, exclusively) if the file does not exist yet.

    Two processes racing to create it both end with the one key that won
    (``O_EXCL``); the loser reads the winner's file.
    """
    path = Path(path)
    if path.exists():
        return load_private_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_private_key(path)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw public key as 64 hex digits."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def public_from_hex(text: object, *, field: str = "public_key") -> Ed25519PublicKey:
    """The Ed25519 public key written as 64 hex digits in ``text``."""
    try:
        raw = bytes.fromhex(str(text))
        if len(raw) != 32:
            raise ValueError(f"{len(raw)} bytes, expected 32")
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as e:
        raise SigningError(f"{field}: not an Ed25519 public key ({e})") from e


def key_id(public: str) -> str:
    """A short name of a public key (hex): the first 16 hex digits of SHA-256 over its raw bytes."""
    return hashlib.sha256(bytes.fromhex(public)).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, message_hash: str, *, domain: str) -> str:
    """Ed25519 signature (hex) over ``domain`` and the hex hash ``message_hash``."""
    return key.sign(f"{domain}\n{message_hash}".encode()).hex()


def verify_signature(public: str, signature: object, message_hash: str, *, domain: str) -> bool:
    """Whether ``signature`` (hex) is ``public``'s signature over ``domain`` and ``message_hash``."""
    try:
        public_from_hex(public).verify(bytes.fromhex(str(signature)), f"{domain}\n{message_hash}".encode())
    except (InvalidSignature, SigningError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------- receipts (server/receipts.py)

RECEIPT_DOMAIN = "medkd-receipt-v1"
SIGNED_FIELDS = ("hospital", "round", "audit_seq", "audit_head", "reply_sha256")


def receipt_hash(receipt: Mapping[str, Any]) -> str:
    """The hash a receipt's signature covers: canonical JSON of its signed fields and the format."""
    return digest({"v": 1, **{name: receipt[name] for name in SIGNED_FIELDS}})


def receipt_valid(receipt: Mapping[str, Any], *, coordinator_key: str | None = None) -> bool:
    """Whether ``receipt``'s signature checks out (under ``coordinator_key`` if given, else the key it names)."""
    key = coordinator_key or str(receipt.get("coordinator_key", ""))
    try:
        return verify_signature(key, receipt.get("signature"), receipt_hash(receipt), domain=RECEIPT_DOMAIN)
    except (KeyError, ValueError):
        return False
