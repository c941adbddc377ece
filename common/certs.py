"""TLS certificates and node-authentication keys for a deployed study, all made with ``cryptography``.

``medkd certs DIR`` writes, for the coordinator:

- ``ca.crt`` / ``ca.key``: a private certificate authority (EC P-384, 10 years). ``ca.crt`` is public and
  goes to every hospital; ``ca.key`` never leaves the coordinator (keep it offline once certificates are made);
- ``server.crt`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for 127.0.0.1,
  localhost and every ``--host`` given (DNS names or IP addresses);
- with ``--hospital NAME``: ``hospitals/NAME.key`` / ``hospitals/NAME.pub``, an EC P-384 key pair in OpenSSH
  format for Flower's SuperNode authentication (normally a hospital makes its own with ``medkd client init``
  and sends only the ``.pub``).

Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.atomic import atomic_write_bytes
from common.errors import MedkdError

__all__ = ["CertError", "CertPaths", "make_ca", "make_server_cert", "make_auth_keypair", "write_certs",
           "check_certificate", "check_auth_keypair", "DEFAULT_HOSTS"]

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
CURVE = ec.SECP384R1()


class CertError(MedkdError, ValueError):
    """A certificate or key is missing, unreadable, expired or does not match its pair."""


@dataclass(frozen=True)
class CertPaths:
    """Where ``medkd certs`` puts its files inside ``folder``."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    def hospital_key(self, name: str) -> Path:
        return self.folder / "hospitals" / f"{name}.key"

    def hospital_pub(self, name: str) -> Path:
        return self.folder / "hospitals" / f"{name}.pub"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    os.chmod(path, 0o600)


def make_ca(*, common_name: str = "medkd study CA", days: int = 3650) -> tuple[x509.Certificate,
                                                                               ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate and its EC P-384 key."""
    key = ec.generate_private_key(CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return cert, key


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_server_cert(*, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str],
                     days: int = 825) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The SuperLink's certificate for ``hosts`` (subject alternative names), signed by the CA."""
    key = ec.generate_private_key(CURVE)
    names = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return cert, key


def make_auth_keypair(comment: str) -> tuple[bytes, bytes]:
    """An EC P-384 key pair for SuperNode authentication: (private OpenSSH bytes, public OpenSSH line)."""
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    os.chmod(path, 0o644)


def write_auth_keypair(private_path: Path, public_path: Path, *, comment: str) -> None:
    """Write a fresh key pair (private 0600); refuses to overwrite an existing private key."""
    if private_path.exists():
        raise CertError(f"{private_path} exists; move it away first to make a new key (rotation)")
    private, public = make_auth_keypair(comment)
    _write_private(private_path, private)
    _write_public(public_path, public)


def write_certs(folder: Path, *, hosts: list[str], hospitals: list[str]) -> CertPaths:
    """Make the CA (kept if present), a fresh server certificate, and key pairs for ``hospitals``."""
    paths = CertPaths(Path(folder))
    paths.folder.mkdir(parents=True, exist_ok=True)
    if paths.ca_cert.exists() and paths.ca_key.exists():
        ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        loaded = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise CertError(f"{paths.ca_key} is not an EC private key")
        ca_key = loaded
    else:
        ca_cert, ca_key = make_ca()
        _write_private(paths.ca_key, _pem_key(ca_key))
        _write_public(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    cert, key = make_server_cert(ca_cert=ca_cert, ca_key=ca_key, hosts=hosts)
    _write_private(paths.server_key, _pem_key(key))
    _write_public(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    for name in hospitals:
        (paths.folder / "hospitals").mkdir(exist_ok=True)
        write_auth_keypair(paths.hospital_key(name), paths.hospital_pub(name), comment=name)
    return paths


def check_certificate(path: Path, *, ca: x509.Certificate | None = None) -> x509.Certificate:
    """Load a PEM certificate and check its dates (and its signature by ``ca``, if given).

    Raises
    ------
    CertError
        If the file is missing, not a certificate, expired, not yet valid, or not signed by ``ca``.
    """
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError as e:
        raise CertError(f"cannot read certificate {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise CertError(f"{path} is not a PEM certificate: {e}") from e
    now = _now()
    if cert.not_valid_after_utc < now:
        raise CertError(f"certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if cert.not_valid_before_utc > now:
        raise CertError(f"certificate {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
    if ca is not None:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, Exception) as e:  # InvalidSignature has no common base with ValueError
            raise CertError(f"certificate {path} is not signed by the study CA: {e}") from e
    return cert


def check_auth_keypair(private_path: Path, public_path: Path) -> str:
    """Check that the OpenSSH private key loads, is EC P-384, and matches the public key; returns the public line.

    Raises
    ------
    CertError
        If either file is missing or unreadable, the curve is not P-384, or the two do not match.
    """
    try:
        key = serialization.load_ssh_private_key(Path(private_path).read_bytes(), password=None)
        public_line = Path(public_path).read_text(encoding="ascii").strip()
        public = serialization.load_ssh_public_key(public_line.encode())
    except OSError as e:
        raise CertError(f"cannot read authentication key {e.filename}: {e.strerror or e}") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CertError(f"authentication key {private_path} or {public_path} is invalid: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise CertError(f"{private_path} is not an EC P-384 key (Flower's SuperNode authentication needs one)")
    mine = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    theirs = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if mine != theirs:
        raise CertError(f"{public_path} is not the public half of {private_path}")
    return public_line
