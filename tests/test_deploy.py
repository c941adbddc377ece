"""Deployment pieces without daemons: hospital folders, readiness checks, daemon command lines, round in flight."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import tomli
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from client.daemon import init_hospital, load_node_settings, supernode_command
from client.readiness import FAIL, OK, WARN, check_hospital
from common.certs import write_certs
from common.errors import ConfigError, MedkdError
from common.policy import load_policy, policy_from_experiment
from server.daemon import ServerSettings, add_hospital_key, superlink_command, write_connection
from server.inflight import mark_inflight, torn_round
from server.submit import run_config_text
from simulations.cli import main


@pytest.fixture
def hospital(tmp_path: Path, tiny_config) -> Path:
    certs = write_certs(tmp_path / "coordinator" / "certs", hosts=[], hospitals=[])
    policy = policy_from_experiment(tiny_config(), 1, name="H1")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_hospital(tmp_path / "H1", policy=policy, superlink=f"127.0.0.1:{port}", ca_cert=certs.ca_cert,
                  clientapp_port=9199)
    return tmp_path / "H1"


def test_init_writes_the_layout_and_never_overwrites(hospital: Path, tiny_config) -> None:
    assert load_policy(hospital / "policy.yaml").hospital == "H1"
    assert (hospital / "keys" / "auth.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert (hospital / "certs" / "ca.crt").exists() and (hospital / "flwr-home").is_dir()
    assert load_node_settings(hospital).clientapp_port == 9199
    with pytest.raises(MedkdError, match="already a hospital"):
        init_hospital(hospital, policy=policy_from_experiment(tiny_config(), 1, name="H1"),
                      superlink="127.0.0.1:1", ca_cert=hospital / "certs" / "ca.crt")


def test_init_needs_a_ca_unless_insecure(tmp_path: Path, tiny_config) -> None:
    policy = policy_from_experiment(tiny_config(), 0, name="H0")
    with pytest.raises(MedkdError, match="--ca-cert"):
        init_hospital(tmp_path / "H0", policy=policy, superlink="127.0.0.1:9093", ca_cert=None)
    init_hospital(tmp_path / "H0", policy=policy, superlink="127.0.0.1:9093", ca_cert=None, insecure=True)
    argv, _ = supernode_command(tmp_path / "H0")
    assert "--insecure" in argv and "--root-certificates" not in argv


def test_supernode_command_tls_auth_policy_and_offline(hospital: Path) -> None:
    argv, env = supernode_command(hospital)
    flags = dict(zip(argv[1::2], argv[2::2]))
    assert "--insecure" not in argv
    assert flags["--root-certificates"] == str(hospital.resolve() / "certs" / "ca.crt")
    assert flags["--auth-supernode-private-key"] == str(hospital.resolve() / "keys" / "auth.key")
    assert flags["--node-config"] == f'policy="{hospital.resolve() / "policy.yaml"}"'
    assert flags["--port"] == "9199" and flags["--host"] == "127.0.0.1"
    assert "--allow-runtime-dependency-installation" not in argv
    assert env["FLWR_HOME"] == str(hospital.resolve() / "flwr-home")
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and env["FLWR_TELEMETRY_ENABLED"] == "0"


def test_node_settings_errors_name_the_key(hospital: Path) -> None:
    (hospital / "node.yaml").write_text("superlink: nowhere\nclientapp_prot: 3\n")
    with pytest.raises(ConfigError, match="clientapp_prot: unknown key"):
        load_node_settings(hospital)
    (hospital / "node.yaml").write_text("superlink: nowhere\n")
    with pytest.raises(ConfigError, match="superlink: expected host:port, got 'nowhere'"):
        load_node_settings(hospital)


def test_check_reports_each_item_and_an_unreachable_coordinator(hospital: Path) -> None:
    report = check_hospital(hospital, connect_timeout_s=1.0)
    status = {c.name: c.status for c in report.checks}
    assert status == {"policy": OK, "node settings": OK, "data": OK, "teacher": WARN, "keys": OK,
                      "certificates": OK, "flower-supernode": OK, "approved code": WARN, "coordinator": FAIL}
    assert not report.ready and report.verdict().startswith("NOT READY: fix coordinator")
    assert main(["client", "check", str(hospital)]) == 1
    (hospital / "keys" / "auth.pub").write_text((hospital / "certs" / "ca.crt").read_text())
    assert {c.name: c.status for c in check_hospital(hospital, connect_timeout_s=0.5).checks}["keys"] == FAIL


def test_superlink_command_and_connection(tmp_path: Path) -> None:
    write_certs(tmp_path / "certs", hosts=[], hospitals=[])
    settings = ServerSettings(host="127.0.0.1", port=9555)
    argv = superlink_command(tmp_path, settings)
    flags = dict(zip(argv[1::2], argv[2::2]))
    assert "--enable-supernode-auth" in argv and "--disable-runtime-dependency-installation" in argv
    assert flags["--database"] == str(tmp_path.resolve() / "state.db")
    assert flags["--ssl-certfile"].endswith("server.crt") and flags["--ssl-ca-certfile"].endswith("ca.crt")
    assert "--insecure" not in argv
    write_connection(tmp_path, settings)
    conf = tomli.loads((tmp_path / "flwr-home" / "config.toml").read_text())
    assert conf["superlink"]["default"] == "medkd"
    assert conf["superlink"]["medkd"] == {"address": "127.0.0.1:9555",
                                          "root-certificates": str(tmp_path.resolve() / "certs" / "ca.crt")}
    (tmp_path / "certs" / "server.crt").unlink()
    with pytest.raises(MedkdError, match="server.crt"):
        superlink_command(tmp_path, settings)


def test_hospital_keys_must_be_p384_and_named(tmp_path: Path, hospital: Path) -> None:
    add_hospital_key(tmp_path / "coord", name="H1", public_key=hospital / "keys" / "auth.pub")
    assert (tmp_path / "coord" / "hospital-keys" / "H1.pub").read_bytes() == (hospital / "keys" / "auth.pub").read_bytes()
    ed = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                         serialization.PublicFormat.OpenSSH)
    (tmp_path / "ed.pub").write_bytes(ed)
    with pytest.raises(MedkdError, match="not EC P-384"):
        add_hospital_key(tmp_path / "coord", name="H2", public_key=tmp_path / "ed.pub")
    with pytest.raises(MedkdError, match="hospital name"):
        add_hospital_key(tmp_path / "coord", name="../H3", public_key=hospital / "keys" / "auth.pub")
    other = write_certs(tmp_path / "other", hosts=[], hospitals=["X"])
    with pytest.raises(MedkdError, match="already has another key"):
        add_hospital_key(tmp_path / "coord", name="H1", public_key=other.hospital_pub("X"))


def test_run_config_is_valid_toml_with_quotes_and_spaces(tmp_path: Path) -> None:
    text = run_config_text(config=Path('/a b/"c".yaml'), overrides=["rounds=3", "data.data_dir=/x y"], out=tmp_path)
    parsed = tomli.loads(text.replace('" ', '"\n'))
    assert parsed == {"config": '/a b/"c".yaml', "set": "rounds=3 data.data_dir=/x y", "out": str(tmp_path)}


def test_a_round_in_flight_is_skipped_once_and_only_past_the_checkpoint(tmp_path: Path) -> None:
    assert torn_round(tmp_path, completed=1) is None
    mark_inflight(tmp_path, rnd=2, cursor_after=40)
    torn = torn_round(tmp_path, completed=1)
    assert torn is not None and (torn.round, torn.cursor_after) == (2, 40)
    assert torn_round(tmp_path, completed=2) is None  # round 2 was checkpointed: nothing torn
    (tmp_path / "inflight.json").write_text("{not json")
    assert torn_round(tmp_path, completed=1) is None


def test_approved_code_pin(tmp_path: Path, hospital: Path) -> None:
    from client.approval import AppNotApproved, app_hash, approve_app, approved_hashes, check_bundle

    repo = Path(__file__).resolve().parents[1]
    digest = approve_app(hospital, app_dir=repo)
    assert digest == app_hash(repo) and len(digest) == 64  # reproducible: the same bytes every build
    assert approve_app(hospital, app_dir=repo) == digest
    assert approved_hashes(hospital / "approved-apps.txt") == {digest}
    argv, env = supernode_command(hospital)
    launcher = Path(env["PATH"].split(":")[0]) / "flwr-clientapp"
    assert launcher.read_text().startswith("#!") and "run_flwr_clientapp" in launcher.read_text()
    assert env["MEDKD_APPROVED_APPS"] == str(hospital.resolve() / "approved-apps.txt")
    check_bundle(b"bundle", approved={__import__("hashlib").sha256(b"bundle").hexdigest()})
    with pytest.raises(AppNotApproved, match="is not approved by this hospital"):
        check_bundle(b"other bundle", approved={digest}, log_file=hospital / "hospital.log")
    assert "refused app bundle" in (hospital / "hospital.log").read_text()
    (hospital / "approved-apps.txt").write_text("not-a-hash\n")
    with pytest.raises(MedkdError, match="not a SHA-256"):
        supernode_command(hospital)


def test_new_key_retires_the_old_pair(hospital: Path) -> None:
    from client.daemon import rotate_key
    from common.certs import check_auth_keypair

    old = (hospital / "keys" / "auth.pub").read_text()
    pub = rotate_key(hospital)
    assert pub.read_text() != old and pub.read_text().endswith(" H1\n")
    check_auth_keypair(hospital / "keys" / "auth.key", pub)
    [retired] = (hospital / "keys").glob("retired-*")
    assert (retired / "auth.pub").read_text() == old and (retired / "auth.key").exists()
