"""``medkd certs``, ``medkd client ...`` and ``medkd server ...``: a real deployment on Flower's daemons.

``medkd certs DIR [--host NAME ...] [--hospital NAME ...]``      CA, server certificate, hospital key pairs
``medkd client init DIR --name H0 --superlink HOST:PORT --ca-cert ca.crt [policy options]``
``medkd client approve DIR --app SOURCE``                          pin the app bundle built from reviewed SOURCE
``medkd client new-key DIR``                                      rotate the authentication key pair
``medkd client check DIR``                                        readiness report; exit 0 when ready
``medkd client train-teacher DIR [--retrain]``
``medkd client start DIR``                                        runs flower-supernode in the foreground
``medkd server start DIR [--host H] [--port P] [--insecure]``     flower-superlink in the foreground
``medkd server register DIR --name H0 KEY.pub`` / ``medkd server unregister DIR --name H0``
``medkd server run DIR --config FILE [--set k=v ...] --out OUT``  submit the study, stream its progress

See docs/deployment.md. Exit codes: 0 success (check: ready), 1 error (check: not ready), 2 invalid arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from simulations.exits import guarded

logger = logging.getLogger("medkd")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medkd", description="Deploy a medkd study on Flower's daemons.")
    sub = parser.add_subparsers(dest="command", required=True)
    certs = sub.add_parser("certs", help="make the study CA, the coordinator's TLS certificate, hospital keys")
    certs.add_argument("folder", type=Path, help="where to write (e.g. COORDINATOR_DIR/certs)")
    certs.add_argument("--host", action="append", default=[], help="name or IP hospitals use to reach the "
                       "coordinator (repeatable); 127.0.0.1 and localhost are always included")
    certs.add_argument("--hospital", action="append", default=[], help="also make an authentication key pair "
                       "for this hospital (repeatable; normally each hospital makes its own with `client init`)")

    client = sub.add_parser("client", help="hospital side").add_subparsers(dest="action", required=True)
    init = client.add_parser("init", help="make a hospital folder: policy, key pair, node settings")
    init.add_argument("folder", type=Path)
    init.add_argument("--name", required=True, help="this hospital's name (as the coordinator registers it)")
    init.add_argument("--superlink", required=True, help="the coordinator's address host:port")
    init.add_argument("--ca-cert", type=Path, default=None, help="the study's ca.crt, from the coordinator")
    init.add_argument("--insecure", action="store_true", help="no TLS (tests only; loudly warned)")
    init.add_argument("--clientapp-port", type=int, default=9094, help="local port of the SuperNode's ClientApp "
                      "API (127.0.0.1 only; another one per hospital on the same machine)")
    init.add_argument("--trusted-entities", type=Path, default=None, help="YAML of app publisher keys: run only "
                      "app bundles they signed")
    init.add_argument("--config", type=Path, default=None, help="experiment YAML the policy is derived from "
                      "(its data, teacher and policy rules; default: medkd's defaults)")
    init.add_argument("--index", type=int, default=0, help="with a simulated-sites config: this hospital's share")
    init.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                      help="override config keys before the policy is derived")
    approve = client.add_parser("approve", help="pin an app release: only bundles whose hash is approved run here")
    approve.add_argument("folder", type=Path)
    approve.add_argument("--app", type=Path, required=True, help="the reviewed medkd source folder (a release)")
    for name, text in (("new-key", "rotate this hospital's authentication key pair"),
                       ("check", "readiness report"), ("train-teacher", "train this hospital's teacher"),
                       ("start", "run the hospital's daemon (flower-supernode)")):
        p = client.add_parser(name, help=text)
        p.add_argument("folder", type=Path)
        if name == "train-teacher":
            p.add_argument("--retrain", action="store_true", help="train again even if a matching teacher exists")

    server = sub.add_parser("server", help="coordinator side").add_subparsers(dest="action", required=True)
    start = server.add_parser("start", help="run flower-superlink (TLS, node authentication, state in DIR)")
    start.add_argument("folder", type=Path)
    start.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    start.add_argument("--port", type=int, default=9093, help="the one port hospitals and `server run` use")
    start.add_argument("--insecure", action="store_true", help="no TLS (tests only; loudly warned)")
    reg = server.add_parser("register", help="let a hospital join: register its public key under its name")
    reg.add_argument("folder", type=Path)
    reg.add_argument("public_key", type=Path)
    reg.add_argument("--name", required=True)
    unreg = server.add_parser("unregister", help="remove a hospital's key (it can no longer join)")
    unreg.add_argument("folder", type=Path)
    unreg.add_argument("--name", required=True)
    run = server.add_parser("run", help="submit a study to the running SuperLink and stream its progress")
    run.add_argument("folder", type=Path)
    run.add_argument("--config", type=Path, required=True, help="experiment YAML")
    run.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    run.add_argument("--out", type=Path, required=True, help="results folder; an existing one is resumed")
    return parser


def _setup_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s medkd: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)


def cmd_certs(args: argparse.Namespace) -> int:
    from common.certs import write_certs

    paths = write_certs(args.folder, hosts=args.host, hospitals=args.hospital)
    print(f"study CA:           {paths.ca_cert}  (public: give it to every hospital)")
    print(f"CA private key:     {paths.ca_key}  (SECRET: keep it offline once certificates are made)")
    print(f"server certificate: {paths.server_cert}  (valid for 127.0.0.1, localhost"
          + "".join(f", {h}" for h in args.host) + ")")
    print(f"server key:         {paths.server_key}  (SECRET: stays on the coordinator)")
    for name in args.hospital:
        print(f"hospital {name}: {paths.hospital_key(name)} (SECRET, give to {name} only), "
              f"{paths.hospital_pub(name)} (register it)")
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from client import daemon

    if args.action == "init":
        from common.config import load_config, parse_overrides
        from common.policy import policy_from_experiment

        cfg = load_config(args.config, overrides=parse_overrides(args.overrides))
        policy = policy_from_experiment(cfg, args.index, name=args.name)
        if args.insecure:
            print(daemon.INSECURE_WARNING, file=sys.stderr)
        rows = daemon.init_hospital(args.folder, policy=policy, superlink=args.superlink, ca_cert=args.ca_cert,
                                    insecure=args.insecure, clientapp_port=args.clientapp_port,
                                    trusted_entities=args.trusted_entities)
        print(f"hospital {args.name} set up in {args.folder.resolve()}:")
        for path, text in rows:
            print(f"  {path.name:<16} {text}")
        print(f"next: edit policy.yaml (data location, limits), send keys/auth.pub to the coordinator, then "
              f"`medkd client check {args.folder}`")
        return 0
    if args.action == "approve":
        from client.approval import approve_app

        digest = approve_app(args.folder, app_dir=args.app)
        print(f"approved app bundle sha256 {digest} (built from {args.app.resolve()}); restart the daemon to apply")
        return 0
    if args.action == "new-key":
        pub = daemon.rotate_key(args.folder)
        print(f"new key pair made; old one moved under {pub.parent}/retired-*. Send {pub} to the coordinator, who "
              "runs `medkd server unregister COORD --name NAME` and `medkd server register COORD --name NAME "
              "KEY.pub`; then restart this daemon")
        return 0
    if args.action == "check":
        from client.readiness import check_hospital

        report = check_hospital(args.folder)
        for c in report.checks:
            print(f"[{c.status:>4}] {c.name:<17} {c.detail}")
        print(report.verdict())
        return 0 if report.ready else 1
    if args.action == "train-teacher":
        print(json.dumps(daemon.train_hospital_teacher(args.folder, retrain=args.retrain), indent=1))
        return 0
    return daemon.start_supernode(args.folder)


def cmd_server(args: argparse.Namespace) -> int:
    from server import daemon

    if args.action == "start":
        if args.insecure:
            print(daemon.INSECURE_WARNING, file=sys.stderr)
        return daemon.start_superlink(args.folder, daemon.ServerSettings(host=args.host, port=args.port,
                                                                         insecure=args.insecure))
    if args.action == "register":
        target = daemon.add_hospital_key(args.folder, name=args.name, public_key=args.public_key)
        if daemon.superlink_running(args.folder):
            daemon.register_keys(args.folder)
            print(f"hospital {args.name} registered; it may join now")
        else:
            print(f"hospital {args.name}'s key saved in {target}; it is registered when the server starts")
        return 0
    if args.action == "unregister":
        daemon.unregister_hospital(args.folder, name=args.name)
        print(f"hospital {args.name} unregistered; its key can no longer join")
        return 0
    from server.submit import submit_study

    code = submit_study(args.folder, config=args.config, overrides=args.overrides, out=args.out)
    if code == 0:
        from simulations.cli import _print_result

        _print_result(args.out.resolve())
    return code


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    _setup_logging()
    commands = {"certs": cmd_certs, "client": cmd_client}
    return guarded(lambda: commands.get(args.command, cmd_server)(args))
