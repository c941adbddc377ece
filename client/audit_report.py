"""``medkd audit report``: what left each hospital, per round and in total, and what it cost in privacy.

Built only from what the hospital keeps: the verified audit log
(:mod:`client.audit_verify`), the archived payloads (the exact bytes sent,
decoded here to show the values), the receipts, and the privacy ledger,
replayed into a fresh ``dp-accounting`` accountant (:func:`client.ledger.replay`)
to recompute ε and compare it with what was recorded.

:func:`report_html` writes one self-contained HTML file: tables, the values
of every release (folded), and plots of ε and bytes over rounds embedded as
base64 PNG (matplotlib, Agg backend).
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from client.audit_log import decode_indices
from client.audit_verify import HospitalAudit, verify_tree
from client.ledger import LEDGER_FILE, LedgerError, read_entries, replay
from common.accounting import Accountant, epsilon

NO_GUARANTEE = "no formal DP guarantee"
MAX_VALUE_ROWS = 200  # rows of values shown per release in the HTML


def _values(folder: Path, record: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of a release, decoded from its archived wire bytes (empty when not archived or not content)."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    name = record.get("archive")
    if not name or record.get("release", {}).get("status") != "sent":
        return {}
    try:
        content = recorddict_from_proto(ProtoRecordDict.FromString((folder / str(name)).read_bytes()))
        return {f"{rec}.{key}": array.numpy() for rec, arrays in content.array_records.items()
                for key, array in arrays.items()}
    except Exception:  # a missing or swapped archive: verify names it; the report shows no values
        return {}


def _ledger(folder: Path) -> dict[str, Any]:
    """The ledger replayed into a fresh accountant: ε recomputed vs recorded (or "none")."""
    path = folder / LEDGER_FILE
    if not path.is_file():
        return {"present": False, "entries": [], "statement": f"no privacy ledger: {NO_GUARANTEE}"}
    try:
        entries = read_entries(path)
    except LedgerError as e:
        return {"present": True, "entries": [], "error": str(e), "statement": f"ledger unreadable: {e}"}
    if not entries:
        return {"present": True, "entries": [], "statement": "empty ledger: nothing charged"}
    delta = entries[-1].delta
    recomputed = replay(path, delta)
    recomputed_rdp = epsilon([e.event for e in entries], delta, Accountant.RDP)
    recorded = entries[-1].epsilon_after
    return {
        "present": True, "delta": delta, "epsilon_recorded": recorded, "epsilon_recomputed": recomputed,
        "epsilon_recomputed_rdp": recomputed_rdp if math.isfinite(recomputed_rdp) else None,
        "matches": abs(recomputed - recorded) <= 1e-9 * max(1.0, recorded),
        "mechanisms": sorted({e.mechanism for e in entries}),
        "entries": [{"sequence": e.sequence, "round": e.round, "mechanism": e.mechanism, "event": e.event.to_dict(),
                     "description": e.description, "epsilon_after": e.epsilon_after} for e in entries],
        "statement": f"ε = {recomputed:.4f} at δ = {delta:g} (PLD, recomputed from {len(entries)} events)",
    }


def hospital_report(audit: HospitalAudit, *, with_values: bool = False) -> dict[str, Any]:
    """One hospital's releases, totals, ledger and verification outcome as plain JSON-able data."""
    folder = audit.folder
    confirmed = {r.get("confirms") for r in audit.records if r.get("event") == "sent"}
    rows = []
    for record in audit.records:
        if record.get("event") != "release":
            continue
        release = record.get("release", {})
        indices = (decode_indices(record["proxy_indices"]).tolist() if record.get("proxy_indices") else [])
        row = {
            "seq": record["seq"], "time": record.get("time"), "run_id": release.get("run_id"),
            "round": release.get("round"), "kind": release.get("kind"), "status": release.get("status"),
            "bytes": release.get("bytes"), "sha256": release.get("sha256"), "n_indices": release.get("n_indices"),
            "proxy_indices": indices, "arrays": record.get("payload", {}).get("arrays", {}),
            "mechanism": release.get("mechanism") or "none", "privacy": release.get("privacy"),
            "epsilon_release": release.get("epsilon_release"), "epsilon_cumulative": release.get("epsilon_cumulative"),
            "delta": release.get("delta"), "confirmed_sent": record["seq"] in confirmed,
            "archive": record.get("archive"),
        }
        values = _values(folder, record)
        row["values_summary"] = {name: {"shape": list(v.shape), "min": float(v.min()) if v.size else None,
                                        "max": float(v.max()) if v.size else None,
                                        "mean": float(v.astype(np.float64).mean()) if v.size else None}
                                 for name, v in values.items()}
        if with_values:
            row["values"] = {name: v.tolist() for name, v in values.items()}
        rows.append(row)
    sent = [r for r in rows if r["status"] == "sent"]
    unique = {i for r in sent for i in r["proxy_indices"]}
    return {
        "hospital": next((r.get("hospital") for r in audit.records), folder.name), "folder": str(folder),
        "verified": audit.ok, "findings": [str(f) for f in audit.findings], "notices": [str(n) for n in audit.notices],
        "receipts": audit.receipts, "releases": rows,
        "totals": {"releases": len(rows), "sent": len(sent), "errors": len(rows) - len(sent),
                   "bytes": int(sum(r["bytes"] or 0 for r in rows)),
                   "proxy_samples": int(sum(r["n_indices"] or 0 for r in sent)), "unique_proxy_samples": len(unique),
                   "mechanisms": sorted({r["mechanism"] for r in rows})},
        "ledger": _ledger(folder),
    }


def build_report(directory: Path, *, with_values: bool = False) -> list[dict[str, Any]]:
    """A report for every hospital folder under ``directory`` (see :func:`client.audit_verify.hospital_folders`)."""
    return [hospital_report(audit, with_values=with_values) for audit in verify_tree(directory)]


# --------------------------------------------------------------------------- HTML


def _round_number(value: object) -> int | None:
    return int(value) if isinstance(value, str | int) and str(value).isdigit() else None


def _plots(reports: list[dict[str, Any]]) -> str:
    """A PNG (base64) with bytes sent per round and cumulative ε per round, one line per hospital."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bytes, ax_eps) = plt.subplots(1, 2, figsize=(10, 3.4), dpi=90)
    for rep in reports:
        per_round: dict[int, int] = {}
        eps: dict[int, float] = {}
        for row in rep["releases"]:
            rnd = _round_number(row["round"])
            if rnd is None:
                continue
            per_round[rnd] = per_round.get(rnd, 0) + int(row["bytes"] or 0)
            if row["epsilon_cumulative"] is not None:
                eps[rnd] = float(row["epsilon_cumulative"])
        for entry in rep["ledger"].get("entries", []):
            if entry["round"] is not None:
                eps[int(entry["round"])] = max(eps.get(int(entry["round"]), 0.0), float(entry["epsilon_after"]))
        if per_round:
            xs = sorted(per_round)
            ax_bytes.plot(xs, [per_round[x] for x in xs], marker="o", label=rep["hospital"])
        if eps:
            xs = sorted(eps)
            ax_eps.plot(xs, [eps[x] for x in xs], marker="o", label=rep["hospital"])
    ax_bytes.set(title="bytes sent per round", xlabel="round", ylabel="bytes")
    ax_eps.set(title="cumulative ε (PLD) per round", xlabel="round", ylabel="ε")
    if not ax_eps.lines:
        ax_eps.text(0.5, 0.5, f"no DP mechanism:\n{NO_GUARANTEE}", ha="center", va="center",
                    transform=ax_eps.transAxes, color="#a00")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_bytes, ax_eps):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        if ax.lines:
            xs = np.concatenate([np.asarray(line.get_xdata(), dtype=float) for line in ax.lines])
            if xs.min() == xs.max():  # one round: give the axis room around it
                ax.set_xlim(xs.min() - 1, xs.max() + 1)
            top = max(float(np.max(line.get_ydata())) for line in ax.lines)
            ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _e(value: object) -> str:
    return html.escape("-" if value is None else str(value))


def _eps(value: object) -> str:
    return "-" if value is None else f"{float(value):.4f}"  # type: ignore[arg-type]


def _indices_text(indices: list[int]) -> str:
    return ", ".join(map(str, indices[:40])) + (f", ... ({len(indices)} in all)" if len(indices) > 40 else "")


def _hospital_html(rep: dict[str, Any], directory: Path) -> str:
    status = ("<span class=ok>verified: chain, signatures, payloads and receipts intact</span>" if rep["verified"]
              else "<span class=bad>TAMPERING FOUND</span>")
    parts = [f"<h2>{_e(rep['hospital'])} <small>{status}</small></h2>"]
    for finding in rep["findings"]:
        parts.append(f"<div class=bad>✗ {_e(finding)}</div>")
    for notice in rep["notices"]:
        parts.append(f"<div class=warn>! {_e(notice)}</div>")
    t, ledger = rep["totals"], rep["ledger"]
    parts.append(f"<p>{t['releases']} replies ({t['sent']} with content, {t['errors']} errors), {t['bytes']:,} bytes, "
                 f"{t['proxy_samples']} proxy samples answered ({t['unique_proxy_samples']} distinct), "
                 f"{rep['receipts']} coordinator receipts. Mechanisms: {_e(', '.join(t['mechanisms']))}.</p>")
    if ledger.get("epsilon_recorded") is not None:
        verdict = "<span class=ok>matches</span>" if ledger["matches"] else "<span class=bad>DIFFERS</span>"
        parts.append(f"<p>Privacy ledger: recorded ε = {ledger['epsilon_recorded']:.4f}, recomputed in a fresh PLD "
                     f"accountant ε = {ledger['epsilon_recomputed']:.4f} ({verdict}); RDP cross-check "
                     f"{_eps(ledger['epsilon_recomputed_rdp'])}; δ = {ledger['delta']:g}.</p>")
        rows = "".join(f"<tr><td>{x['sequence']}</td><td>{_e(x['round'])}</td><td>{_e(x['mechanism'])}</td>"
                       f"<td class=idx>{_e(x['event'])}</td><td class=idx>{_e(x['description'])}</td>"
                       f"<td>{x['epsilon_after']:.4f}</td></tr>" for x in ledger["entries"])
        parts.append("<details><summary>ledger events</summary><table><tr><th>#</th><th>round</th><th>mechanism</th>"
                     f"<th>event (parameters)</th><th>description</th><th>ε after</th></tr>{rows}</table></details>")
    else:
        parts.append(f"<p class=warn>Privacy: {_e(ledger['statement'])}</p>")
    parts.append("<table><tr><th>record</th><th>round</th><th>kind</th><th>status</th><th>bytes</th>"
                 "<th>samples</th><th>mechanism</th><th>ε release</th><th>ε total</th><th>sent</th>"
                 "<th>proxy indices</th></tr>")
    for row in rep["releases"]:
        parts.append(f"<tr><td>{row['seq']}</td><td>{_e(row['round'])}</td><td>{_e(row['kind'])}</td>"
                     f"<td>{_e(row['status'])}</td><td>{_e(row['bytes'])}</td><td>{_e(row['n_indices'])}</td>"
                     f"<td>{_e(row['mechanism'])}</td><td>{_eps(row['epsilon_release'])}</td>"
                     f"<td>{_eps(row['epsilon_cumulative'])}</td><td>{'yes' if row['confirmed_sent'] else 'NO'}</td>"
                     f"<td class=idx>{_e(_indices_text(row['proxy_indices']))}</td></tr>")
    parts.append("</table>")
    for row in rep["releases"]:
        values = _values(Path(rep["folder"]), {"archive": row["archive"], "release": {"status": row["status"]}})
        if not values:
            continue
        parts.append(f"<details><summary>values of record {row['seq']} (round {_e(row['round'])})</summary>")
        for name, array in values.items():
            shown = np.atleast_2d(array.astype(np.float64))[:MAX_VALUE_ROWS]
            indices = row["proxy_indices"] or list(range(shown.shape[0]))
            body = "".join(f"<tr><td>{indices[i] if i < len(indices) else i}</td>"
                           + "".join(f"<td>{v:.4f}</td>" for v in r) + "</tr>" for i, r in enumerate(shown))
            parts.append(f"<p>{_e(name)} {list(array.shape)} {_e(array.dtype)}</p><table class=vals>{body}</table>")
        parts.append("</details>")
    return "\n".join(parts)


def _summary_html(reports: list[dict[str, Any]]) -> str:
    rows = []
    for rep in reports:
        t, ledger = rep["totals"], rep["ledger"]
        eps = (f"{ledger['epsilon_recomputed']:.4f} (δ={ledger['delta']:g})" if ledger.get("epsilon_recomputed")
               is not None else NO_GUARANTEE)
        state = "<span class=ok>yes</span>" if rep["verified"] else "<span class=bad>NO</span>"
        rows.append(f"<tr><td>{_e(rep['hospital'])}</td><td>{state}</td><td>{t['releases']}</td>"
                    f"<td>{t['bytes']:,}</td><td>{t['proxy_samples']}</td><td>{t['unique_proxy_samples']}</td>"
                    f"<td>{rep['receipts']}</td><td>{_e(', '.join(t['mechanisms']))}</td><td>{_e(eps)}</td></tr>")
    return ("<h2>In total</h2><table><tr><th>hospital</th><th>log verified</th><th>replies</th><th>bytes</th>"
            "<th>proxy samples</th><th>distinct</th><th>receipts</th><th>mechanisms</th><th>ε spent (recomputed)</th>"
            "</tr>" + "".join(rows) + "</table>")


def report_html(reports: list[dict[str, Any]], directory: Path) -> str:
    """The whole report as one self-contained HTML page (plots inline as base64 PNG)."""
    plot = _plots(reports)
    bad = [r["hospital"] for r in reports if not r["verified"]]
    headline = (f"<p class=bad>Tampering found at {', '.join(map(str, bad))}: see below.</p>" if bad else
                f"<p class=ok>All {len(reports)} hospital logs verified.</p>")
    body = _summary_html(reports) + "\n" + "\n".join(_hospital_html(rep, directory) for rep in reports)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>medkd audit report: {_e(directory.name)}</title>
<style>
body{{font-family:sans-serif;margin:1.5em;color:#222;max-width:1200px}}
table{{border-collapse:collapse;margin:.5em 0;font-size:13px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}} th{{background:#eef}}
td.idx{{text-align:left;font-family:monospace;font-size:11px;max-width:420px}}
.ok{{color:#070}} .bad{{color:#b00;font-weight:bold}} .warn{{color:#a60}}
table.vals td{{font-family:monospace;font-size:11px}}
</style></head><body>
<h1>medkd audit report</h1>
<p>{_e(directory)}: what left each hospital, verified against its signed hash-chained log.</p>
{headline}
<img alt="bytes and epsilon per round" src="data:image/png;base64,{plot}">
{body}
</body></html>
"""
