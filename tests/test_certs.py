"""medkd certs: a CA, a server certificate with the right names, P-384 OpenSSH keys; real TLS over a socket."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.certs import CertError, check_auth_keypair, check_certificate, write_auth_keypair, write_certs


def test_certs_names_modes_and_chain(tmp_path: Path) -> None:
    paths = write_certs(tmp_path, hosts=["coordinator.example.org", "10.1.2.3"], hospitals=["H0"])
    ca = check_certificate(paths.ca_cert)
    server = check_certificate(paths.server_cert, ca=ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "coordinator.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                         ipaddress.ip_address("10.1.2.3")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for secret in (paths.ca_key, paths.server_key, paths.hospital_key("H0")):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.ca_cert.stat().st_mode) == 0o644
    line = check_auth_keypair(paths.hospital_key("H0"), paths.hospital_pub("H0"))
    assert line.startswith("ecdsa-sha2-nistp384 ") and line.endswith(" H0")
    key = serialization.load_ssh_private_key(paths.hospital_key("H0").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"


def test_rerun_keeps_the_ca_and_new_server_cert_still_chains(tmp_path: Path) -> None:
    first = write_certs(tmp_path, hosts=[], hospitals=[])
    ca_bytes = first.ca_cert.read_bytes()
    second = write_certs(tmp_path, hosts=["new.example.org"], hospitals=[])
    assert second.ca_cert.read_bytes() == ca_bytes  # hospitals keep trusting the same CA
    check_certificate(second.server_cert, ca=check_certificate(second.ca_cert))


def test_foreign_ca_and_mismatched_keys_are_refused(tmp_path: Path) -> None:
    a = write_certs(tmp_path / "a", hosts=[], hospitals=["H0", "H1"])
    b = write_certs(tmp_path / "b", hosts=[], hospitals=[])
    with pytest.raises(CertError, match="not signed by the study CA"):
        check_certificate(a.server_cert, ca=check_certificate(b.ca_cert))
    with pytest.raises(CertError, match="is not the public half"):
        check_auth_keypair(a.hospital_key("H0"), a.hospital_pub("H1"))
    with pytest.raises(CertError, match="exists"):
        write_auth_keypair(a.hospital_key("H0"), a.hospital_pub("H0"), comment="H0")
    with pytest.raises(CertError, match="cannot read certificate"):
        check_certificate(tmp_path / "missing.crt")


def test_tls_handshake_verifies_with_the_study_ca_only(tmp_path: Path) -> None:
    paths = write_certs(tmp_path, hosts=[], hospitals=[])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths.server_cert, paths.server_key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(2)
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    good = ssl.create_default_context(cafile=str(paths.ca_cert))
    with socket.create_connection(("127.0.0.1", port)) as raw, good.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        assert s.version() in ("TLSv1.2", "TLSv1.3")
    other = write_certs(tmp_path / "other", hosts=[], hospitals=[])
    bad = ssl.create_default_context(cafile=str(other.ca_cert))
    with socket.create_connection(("127.0.0.1", port)) as raw, pytest.raises(ssl.SSLCertVerificationError):
        bad.wrap_socket(raw, server_hostname="127.0.0.1")
    thread.join(timeout=5)
    listener.close()
