"""``medkd audit``: verify, report on and empirically audit what left each hospital.

``medkd audit verify DIR [--coordinator-key KEY] [--json]``
    Check every hospital folder under DIR (a hospital folder, a folder of
    them, or a simulation's output folder): chain, signatures, signed head,
    archived payload hashes and receipts. Exit code 1 if anything was tampered
    with (each finding names the record), 0 otherwise (notices such as a
    release not confirmed sent are printed but are not tampering).
``medkd audit report DIR [--html FILE] [--json FILE] [--values]``
    What left, per round and in total; the ledger replayed into a fresh
    accountant; mechanism labels; plots (in the HTML, one self-contained file).
``medkd audit canary DIR [--m M] [--pool proxy|heldout] [--k-plus K] [--k-minus K] [--k-grid K+:K-,...]
[--audit-mode [--epochs E]] [--runs R] [--alpha A] [--work DIR]``
    Empirical ε lower bound with canaries (Steinke, Nasr & Jagielski 2023),
    printed as JSON; exit 3 if it exceeds the ledger's ε (see :mod:`client.canary`).
``medkd audit rotate-key HOSPITAL_DIR``
    Replace a hospital's audit key (the rotation record is signed by the old key).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from simulations.exits import guarded


def _k_grid(text: str) -> tuple[tuple[int, int], ...]:
    """``"25:25,50:0"`` -> ((25, 25), (50, 0))."""
    try:
        pairs = tuple((int(a), int(b)) for a, b in (item.split(":") for item in text.split(",") if item.strip()))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected K+:K- pairs separated by commas, e.g. 25:25,50:0; got {text!r}") from e
    return pairs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medkd audit", description="Audit what left each hospital.")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check chain, signatures, payloads and receipts; exit 1 on tampering")
    verify.add_argument("dir", type=Path, help="hospital folder, folder of hospital folders, or a run's output folder")
    verify.add_argument("--coordinator-key", default=None,
                        help="the coordinator's public key (64 hex digits, or a file holding them); default "
                             "DIR/coordinator_key.pub when DIR is a run's output folder")
    verify.add_argument("--json", action="store_true", help="print the findings as JSON")
    report = sub.add_parser("report", help="what left, per round and in total, and its privacy cost")
    report.add_argument("dir", type=Path)
    report.add_argument("--html", type=Path, default=None, help="write a self-contained HTML report here")
    report.add_argument("--json", dest="json_out", type=Path, default=None, help="write the report as JSON here")
    report.add_argument("--values", action="store_true", help="include every released value in the JSON")
    canary = sub.add_parser("canary", help="empirical ε lower bound from canaries (Steinke, Nasr & Jagielski 2023)")
    canary.add_argument("dir", type=Path, help="the hospital folder (holding policy.yaml) or the policy file")
    canary.add_argument("--m", type=int, default=200, help="canaries per run (images given wrong labels)")
    canary.add_argument("--pool", choices=["proxy", "heldout"], default="proxy",
                        help="canaries from the proxy set, or from the proxy set plus the official test and "
                        "validation images (appended to the scratch copy's proxy set)")
    canary.add_argument("--audit-mode", action="store_true",
                        help="audit-mode training: no early stopping (last weights), no augmentation; the bound "
                        "then audits that recipe, not the production one")
    canary.add_argument("--epochs", type=int, default=None, help="with --audit-mode: teacher epochs (default: the "
                        "policy's teacher.epochs)")
    canary.add_argument("--k-grid", type=_k_grid, default=(), help="further K+:K- pairs, comma-separated, reported "
                        "on the same scores; their best is bounded at alpha / (grid size)")
    canary.add_argument("--k-plus", type=int, default=None, help="guess 'in' for this many top scores (default m/10)")
    canary.add_argument("--k-minus", type=int, default=None, help="guess 'out' for this many bottom scores "
                        "(default m/10)")
    canary.add_argument("--runs", type=int, default=1, help="independent runs, pooled; > 1 also reports the "
                        "Clopper-Pearson bound")
    canary.add_argument("--alpha", type=float, default=0.05, help="1 - confidence of the bound")
    canary.add_argument("--delta", type=float, default=1e-5, help="δ when the hospital keeps no ledger")
    canary.add_argument("--seed", type=int, default=0, help="seed of the canary choice, labels and inclusion")
    canary.add_argument("--work", type=Path, default=None, help="scratch folder (default DIR/canary-audit)")
    canary.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    canary.add_argument("--no-reference", dest="reference", action="store_false",
                        help="score by the released probability alone (no reference copy trained without canaries)")
    rotate = sub.add_parser("rotate-key", help="replace a hospital's audit key (signed hand-over in the log)")
    rotate.add_argument("dir", type=Path, help="the hospital folder")
    return parser


def _coordinator_key(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    return path.read_text().strip() if path.is_file() else value.strip()


def cmd_verify(args: argparse.Namespace) -> int:
    from client.audit_verify import verify_tree

    audits = verify_tree(args.dir, coordinator_key=_coordinator_key(args.coordinator_key))
    if not audits:
        print(f"medkd audit: no hospital audit log under {args.dir}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{"folder": str(a.folder), "ok": a.ok, "records": len(a.records), "receipts": a.receipts,
                           "findings": [vars(f) for f in a.findings], "notices": [vars(n) for n in a.notices]}
                          for a in audits], indent=2))
    else:
        for a in audits:
            releases = sum(1 for r in a.records if r.get("event") == "release")
            state = "OK" if a.ok else f"{len(a.findings)} finding(s)"
            print(f"{a.folder}: {len(a.records)} records, {releases} releases, {a.receipts} receipts: {state}")
            for finding in a.findings:
                print(f"  TAMPERING {finding}")
            for notice in a.notices:
                print(f"  notice    {notice}")
    return 0 if all(a.ok for a in audits) else 1


def cmd_report(args: argparse.Namespace) -> int:
    from client.audit_report import build_report, report_html
    from common.atomic import atomic_write_text

    reports = build_report(args.dir, with_values=args.values)
    if not reports:
        print(f"medkd audit: no hospital audit log under {args.dir}", file=sys.stderr)
        return 1
    for rep in reports:
        t, ledger = rep["totals"], rep["ledger"]
        print(f"{rep['hospital']}: {'verified' if rep['verified'] else 'TAMPERING FOUND'}; {t['releases']} replies, "
              f"{t['bytes']:,} bytes, {t['proxy_samples']} proxy samples ({t['unique_proxy_samples']} distinct); "
              f"mechanisms {', '.join(t['mechanisms'])}; {ledger['statement']}"
              + (f"; recorded ε {ledger['epsilon_recorded']:.4f} "
                 f"{'matches' if ledger['matches'] else 'DIFFERS'}" if ledger.get("epsilon_recorded") is not None
                 else ""))
        for row in rep["releases"]:
            eps = "" if row["epsilon_cumulative"] is None else f" ε={row['epsilon_cumulative']:.4f}"
            print(f"  round {row['round']:>3} {row['kind']:<14} {row['status']:<5} {row['bytes']:>8} B "
                  f"{row['n_indices']:>5} samples {row['mechanism']}{eps}"
                  f"{'' if row['confirmed_sent'] else ' (not confirmed sent)'}")
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(reports, indent=2) + "\n")
        print(f"JSON report: {args.json_out}")
    if args.html:
        atomic_write_text(args.html, report_html(reports, args.dir))
        print(f"HTML report: {args.html}")
    return 0 if all(r["verified"] for r in reports) else 1


def cmd_rotate(args: argparse.Namespace) -> int:
    from client.audit_log import AuditLog
    from client.audit_verify import verify_folder

    audit = verify_folder(args.dir)
    if not audit.ok:
        print(f"medkd audit: {args.dir}: the log does not verify; not rotating ({audit.findings[0]})", file=sys.stderr)
        return 1
    hospital = next((str(r.get("hospital")) for r in audit.records), args.dir.name)
    new_id = AuditLog(args.dir, hospital=hospital).rotate_key()
    print(f"{args.dir}: audit key rotated; new key id {new_id}")
    return 0


def cmd_canary(args: argparse.Namespace) -> int:
    from client.canary import CanaryPool, CanaryViolation, run_canary_audit
    from common.atomic import atomic_write_text
    from common.policy import POLICY_FILE

    policy = args.dir if args.dir.is_file() else args.dir / POLICY_FILE
    k_plus = args.m // 10 if args.k_plus is None else args.k_plus
    k_minus = args.m // 10 if args.k_minus is None else args.k_minus
    status = 0
    try:
        result = run_canary_audit(policy, m=args.m, k_plus=k_plus, k_minus=k_minus, runs=args.runs, seed=args.seed,
                                  alpha=args.alpha, delta=args.delta, work_dir=args.work or policy.parent / "canary-audit",
                                  reference=args.reference, pool=CanaryPool(args.pool), audit_mode=args.audit_mode,
                                  epochs=args.epochs, k_grid=args.k_grid)
    except CanaryViolation as e:
        print(f"medkd audit canary: VIOLATION: {e}", file=sys.stderr)
        result, status = e.result, 3  # type: ignore[attr-defined]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return status


def main(argv: list[str], *, prog: str = "medkd audit") -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = _parser().parse_args(argv)
    commands = {"verify": cmd_verify, "report": cmd_report, "canary": cmd_canary}
    return guarded(lambda: commands.get(args.command, cmd_rotate)(args), config_exit=None)
