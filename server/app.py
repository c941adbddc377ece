"""The ServerApp: the round loop on Flower's ``Grid``.

One FedKD round (see docs/architecture.md):

1. take the next ``distill.proxy_batch`` proxy indices (a seeded permutation, cycled);
2. send one ``query.logits`` message per hospital and collect replies with a timeout;
3. validate each reply (server/collect.py) and reject bad ones with a logged reason;
4. if a quorum of valid replies remains, aggregate them (server/aggregate.py), respecting each
   hospital's abstentions, drop samples nobody answered or whose aggregate is too ambiguous
   (``distill.max_entropy``), put the rest in the soft-label bank and distil the bank into the
   student (server/distill.py);
5. evaluate on the *validation* split and snapshot the student (server/selection.py), write
   metrics.json and the checkpoint atomically. After the last round (or ``early_stop_rounds``)
   the best round by validation AUC is selected and the test split is read once.

``method: fedavg`` runs the FedAvg baseline instead (server/fedavg.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from common.config import AggregatorName, ExperimentConfig, Method, OutputKind
from common.errors import MedkdError
from common.device import place_model, resolve_device
from common.models import build_model
from common.payload import QUERY_MESSAGE_TYPE, Query, make_query_content
from common.runconfig import config_from_run_config, out_dir_from_run_config
from common.split import class_warnings, make_split, tensors
from common.training import seed_everything
from server.aggregate import aggregate_outputs, answered, normalised_entropy, probs_from_logits
from server.bank import teacher_changes, update_bank, with_held
from server.checkpoint import ServerState, load_checkpoint, save_checkpoint
from server.collect import collect_replies
from server.distill import distill_student, make_weight_average
from server.evaluate import privacy_line, write_metrics
from server.identity import name_order, node_identities
from server.inflight import mark_inflight, torn_round
from server.metering import MeteredGrid, by_name
from server.receipts import ReceiptSigner, issue_receipts
from server.selection import RoundSelection, score
from server.window import send_windowed

logger = logging.getLogger(__name__)


def wait_for_nodes(grid: Grid, *, wanted: int, quorum: int, timeout_s: float) -> list[int]:
    """Wait until ``wanted`` nodes are connected (or ``timeout_s``); need at least ``quorum``.

    Raises
    ------
    MedkdError
        If fewer than ``quorum`` hospitals connected in time.
    """
    deadline = time.monotonic() + timeout_s
    nodes: list[int] = []
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            break
        time.sleep(0.5)
    if len(nodes) < quorum:
        raise MedkdError(f"only {len(nodes)} of {wanted} hospitals connected within {timeout_s:.0f} s; "
                         f"the quorum is {quorum} (federation.min_replies); under `flwr run`, simulate one "
                         f"SuperNode per hospital with --federation-config \"num-supernodes={wanted}\"")
    if len(nodes) < wanted:
        logger.warning("only %d of %d hospitals connected; going on with them", len(nodes), wanted)
    logger.info("%d hospitals connected", len(nodes))
    return nodes


def next_proxy_batch(*, n_proxy: int, batch: int, cursor: int, seed: int) -> tuple[np.ndarray, int]:
    """Next ``batch`` positions of a seeded permutation of the proxy set (cycled); returns (indices, cursor)."""
    order = np.random.default_rng(seed).permutation(n_proxy)
    batch = min(batch, n_proxy)
    take = [order[(cursor + k) % n_proxy] for k in range(batch)]
    return np.sort(np.asarray(take, dtype=np.int64)), (cursor + batch) % n_proxy


def aggregate_replies(accepted: list[Any], cfg: ExperimentConfig,
                      n_classes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Aggregate accepted replies on the same N samples into ((N, C) soft labels, (H, N) answer mask or None).

    Replies in logits are softened at ``distill.temperature``; abstentions, density ratios and released label
    counts go to :func:`server.aggregate.aggregate_outputs` with the hospitals' announced sizes as weights.
    """
    outputs = torch.stack([torch.from_numpy(r.outputs) for r in accepted])  # (H, N, C)
    if cfg.query.output == OutputKind.LOGITS:
        outputs = probs_from_logits(outputs, temperature=cfg.distill.temperature)
    n = outputs.shape[1]
    mask = None
    if any(r.mask is not None for r in accepted):
        mask = torch.stack([torch.from_numpy(r.mask) if r.mask is not None else torch.ones(n, dtype=torch.bool)
                            for r in accepted])
    density = None
    if any(r.density is not None for r in accepted):
        density = torch.stack([torch.from_numpy(r.density) if r.density is not None else torch.ones(n)
                               for r in accepted])
    counts = None
    if cfg.aggregator == AggregatorName.LABEL_AWARE:
        counts = torch.stack([torch.as_tensor(r.label_counts, dtype=torch.float64) if r.label_counts is not None
                              else torch.full((n_classes,), r.num_private / n_classes, dtype=torch.float64)
                              for r in accepted])
    weights = torch.tensor([float(r.num_private) for r in accepted])
    fused = aggregate_outputs(outputs, method=cfg.aggregator, weights=weights, mask=mask, density=density,
                              class_counts=counts, era_temperature=cfg.distill.era_temperature)
    return fused, mask


def fuse_replies(accepted: list[Any], cfg: ExperimentConfig, indices: np.ndarray,
                 n_classes: int) -> tuple[np.ndarray, torch.Tensor, dict[str, int]]:
    """Aggregate accepted replies into (kept indices, soft labels (M, C), counts of dropped samples).

    Abstentions are respected; samples nobody answered, or whose aggregate's
    normalised entropy exceeds ``distill.max_entropy``, are dropped.
    """
    fused, mask = aggregate_replies(accepted, cfg, n_classes)
    n = fused.shape[0]
    keep = answered(mask, n)
    nobody = int((~keep).sum())
    ambiguous = keep & (normalised_entropy(fused.double()) > cfg.distill.max_entropy)
    keep &= ~ambiguous
    keep_np = keep.numpy()
    return indices[keep_np], fused[keep], {"nobody_answered": nobody, "ambiguous": int(ambiguous.sum()),
                                           "dropped_indices": indices[~keep_np]}


def run_fedkd(grid: Grid, cfg: ExperimentConfig, out_dir: Path) -> dict[str, Any]:
    """FedKD: query teachers on the proxy set, aggregate, distil into the student. Returns the final block."""
    out_dir.mkdir(parents=True, exist_ok=True)
    split = make_split(cfg)
    spec = split.model_spec()
    proxy_images, proxy_labels = tensors(split.proxy, spatial_dims=split.data.spatial_dims)
    selection = RoundSelection(out_dir, cfg, split)
    gen = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    student = place_model(build_model(cfg.student.model, spec), device)
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.distill.lr, weight_decay=cfg.distill.weight_decay)
    state = load_checkpoint(out_dir, cfg=cfg, student=student, optimizer=optimizer) or ServerState()
    if state.history and (state.round >= cfg.rounds or state.history[-1].get("early_stop")):
        logger.info("all rounds already done in %s", out_dir)
        return _finish(out_dir, cfg, state, student, selection)
    average = make_weight_average(student, cfg.distill)
    if state.round > 0:
        gen.manual_seed(cfg.seed * 100003 + state.round)
        if average is not None:  # the last snapshot holds the average's weights
            selection.restore(state.round, average)

    metered = MeteredGrid(grid)
    quorum = cfg.quorum()
    nodes = wait_for_nodes(grid, wanted=cfg.federation.hospitals, quorum=quorum,
                           timeout_s=cfg.federation.wait_for_nodes_s)
    n_classes = split.data.n_classes
    warned: set[str] = set()
    signer, receipts = ReceiptSigner(out_dir), {}  # node -> receipt for its last reply, sent with the next query
    first = state.round + 1
    torn = torn_round(out_dir, completed=state.round)  # never re-ask a round hospitals may have answered
    if torn is not None:
        first, state.cursor = torn.round + 1, torn.cursor_after
    for rnd in range(first, cfg.rounds + 1):
        start = time.perf_counter()
        indices, cursor = next_proxy_batch(n_proxy=proxy_images.shape[0], batch=cfg.distill.proxy_batch,
                                           cursor=state.cursor, seed=cfg.seed)
        held = np.zeros(len(indices), dtype=bool) if cfg.query.requery_held else np.isin(indices, state.held.numpy())
        asked = indices[~held]
        nodes = sorted(grid.get_node_ids()) or nodes
        names = node_identities(grid)  # identity by node, never by what a reply writes
        if asked.size:
            mark_inflight(out_dir, rnd=rnd, cursor_after=cursor)
        result, traffic = _query_round(metered, cfg, split.proxy_hash, asked, rnd=rnd, nodes=nodes, names=names,
                                       n_classes=n_classes, receipts=receipts)
        query_seconds = time.perf_counter() - start  # until the last reply (or the timeout): the hospitals' part
        if asked.size:  # receipts for this round's replies, sent with each hospital's next query
            receipts = issue_receipts(signer, result.accepted, reply_sha256=traffic.reply_sha256, names=names,
                                      round=rnd)
        loss, dropped = None, {"nobody_answered": 0, "ambiguous": 0}
        enough = len(result.accepted) >= quorum
        if asked.size and not enough:
            logger.warning("round %d: %d valid replies, below the quorum of %d; the new samples are not used",
                           rnd, len(result.accepted), quorum)
        kept_new, probs_new, gone = asked[:0], torch.empty(0, n_classes), asked[:0]
        if teacher_changes(state, result.accepted, rnd=rnd, held=int(state.held.numel()),
                           requery=not cfg.query.requery_held):
            state.held = state.held[:0]  # ask every held sample again as it comes up (unchanged teachers: free)
        if asked.size and enough:
            _warn_label_counts(result.accepted, cfg, warned)
            kept_new, probs_new, dropped = fuse_replies(result.accepted, cfg, asked, n_classes)
            gone = dropped.pop("dropped_indices")
            state.held = torch.cat([state.held, torch.as_tensor(asked, dtype=torch.int64)])
        if held.any() or (asked.size and enough):
            kept, probs = with_held(state, indices[held], kept_new, probs_new)
            update_bank(state, kept, probs, dropped=gone)
            if state.bank_indices.numel() >= 2:
                bank_pos = state.bank_indices
                loss = distill_student(student=student, optimizer=optimizer, images=proxy_images[bank_pos],
                                       target_probs=state.bank_probs, cfg=cfg.distill, gen=gen,
                                       labels=proxy_labels[bank_pos] if cfg.data.proxy_labelled else None,
                                       amp=cfg.amp, average=average, rnd=rnd, rounds=cfg.rounds)
        validation = selection.record(rnd, student if average is None else average.module)
        seconds = time.perf_counter() - start
        state.round, state.cursor, state.seconds = rnd, cursor, state.seconds + seconds
        state.history.append({
            "round": rnd, "val_auc": validation.auc, "val_acc": validation.acc, "val_score": score(validation),
            "test_auc": None, "test_acc": None,
            "bytes_up": by_name(traffic.bytes_up, names), "bytes_down": by_name(traffic.bytes_down, names),
            "reply_sha256": by_name(traffic.reply_sha256, names),
            "replies_ok": len(result.accepted), "replies_rejected": len(result.rejected),
            "rejected": result.rejected, "seconds": seconds, "query_seconds": query_seconds, "distill_loss": loss,
            "proxy_samples_labelled": int(state.bank_indices.numel()),
            "abstentions": _abstentions(result.accepted), "samples_dropped": dropped,
            "samples_queried": int(asked.size), "samples_held": int(held.sum()),
            "privacy": _privacy(result.accepted),
        })
        stop = selection.should_stop(state.history)
        if stop:
            state.history[-1]["early_stop"] = True
        save_checkpoint(out_dir, cfg=cfg, student=student, optimizer=optimizer, state=state)
        write_metrics(out_dir, cfg=cfg, rounds=state.history, final=None, extra=_teacher_table(result.accepted))
        logger.info("round %d/%d: val AUC %.4f acc %.4f | %d/%d replies ok | up %s B/hospital | %.1f s | %s",
                    rnd, cfg.rounds, validation.auc, validation.acc, len(result.accepted),
                    len(nodes) if asked.size else 0, _mean_bytes(traffic.bytes_up), seconds,
                    privacy_line(state.history[-1]["privacy"]) if asked.size else
                    "privacy: no query this round (nothing left any hospital)")
        if stop:
            logger.info("round %d: no validation improvement for %d rounds; stopping early", rnd,
                        cfg.early_stop_rounds)
            break
    return _finish(out_dir, cfg, state, student, selection)


def _query_round(metered: MeteredGrid, cfg: ExperimentConfig, proxy_hash: str, asked: np.ndarray, *, rnd: int,
                 nodes: list[int], names: dict[int, str], n_classes: int,
                 receipts: dict[int, dict[str, Any]]) -> tuple[Any, Any]:
    """Ask every hospital for outputs on ``asked`` (nothing is sent when it is empty); (collected, traffic).

    A hospital's query carries the coordinator's receipt for its previous reply, if any (server/receipts.py).
    """
    if asked.size == 0:
        logger.info("round %d/%d: every proxy sample of this round is already held; no query (distilling the "
                    "bank)", rnd, cfg.rounds)
        return collect_replies([], expected={}, round=rnd, n_samples=0, n_classes=n_classes,
                               query=cfg.query), metered.take()
    query = Query(round=rnd, proxy_hash=proxy_hash, indices=asked, temperature=cfg.distill.temperature,
                  output=cfg.query.output, dtype=cfg.query.dtype,
                  label_counts=cfg.aggregator == AggregatorName.LABEL_AWARE)
    logger.info("round %d/%d: querying %d hospitals for %d proxy samples%s", rnd, cfg.rounds, len(nodes),
                len(asked), " (hospitals train their teachers on first use)" if rnd == 1 else "")
    content = make_query_content(query)  # one payload shared by all messages, as Flower's strategies do
    expected = {n: names.get(n, f"node {n}") for n in nodes}
    messages = [Message(content=make_query_content(replace(query, receipt=receipts[node])) if node in receipts
                        else content, dst_node_id=node, message_type=QUERY_MESSAGE_TYPE, group_id=str(rnd))
                for node in sorted(nodes, key=lambda n: name_order(expected[n]))]  # H0, H1, ...
    replies = send_windowed(metered, messages, window=cfg.federation.max_in_flight,
                            timeout_s=cfg.federation.reply_timeout_s)
    traffic = metered.take()
    result = collect_replies(replies, expected=expected, round=rnd,
                             n_samples=len(asked), n_classes=n_classes, query=cfg.query)
    return result, traffic


def _privacy(accepted: list[Any]) -> dict[str, dict[str, Any]]:
    """Per hospital, its privacy statement and (under a DP mechanism) ε spent so far and δ."""
    return {r.hospital: {"mechanism": r.privacy, "epsilon": r.epsilon, "delta": r.delta} for r in accepted}


def _finish(out_dir: Path, cfg: ExperimentConfig, state: ServerState, student: torch.nn.Module,
            selection: RoundSelection) -> dict[str, Any]:
    """Select the best round on validation, read the test split once, write the final metrics."""
    final = selection.finish(student, state.history, method=cfg.method.value, seconds=state.seconds)
    write_metrics(out_dir, cfg=cfg, rounds=state.history, final=final, extra=_previous_extra(out_dir))
    return final


def _previous_extra(out_dir: Path) -> dict[str, Any]:
    """The teacher table of the metrics written so far (kept in the final metrics)."""
    import json

    try:
        return {"teachers": json.loads((out_dir / "metrics.json").read_text())["teachers"]}
    except (OSError, ValueError, KeyError):
        return {}


def _abstentions(accepted: list[Any]) -> dict[str, int]:
    """Per hospital, how many queried samples it abstained on (only hospitals that sent a mask)."""
    return {r.hospital: int((~r.mask).sum()) for r in accepted if r.mask is not None}


def _warn_label_counts(accepted: list[Any], cfg: ExperimentConfig, warned: set[str]) -> None:
    """Warn once per hospital, by name, about single-class or thin classes in the label counts it released."""
    for r in accepted:
        if r.label_counts is None or r.hospital in warned:
            continue
        warned.add(r.hospital)
        for text in class_warnings(r.hospital, r.label_counts.tolist(), below=cfg.federation.warn_class_below):
            logger.warning("%s (from the label counts it released)", text)


def _mean_bytes(counts: dict[int, int]) -> str:
    return f"{np.mean(list(counts.values())):.0f}" if counts else "0"


def _teacher_table(accepted: list[Any]) -> dict[str, Any]:
    return {"teachers": [{"hospital": r.hospital, "model": r.model, "num_private": r.num_private,
                          "local_val_auc": r.val_auc, "privacy": r.privacy} for r in accepted]}


def run_server(grid: Grid, cfg: ExperimentConfig, out_dir: Path) -> dict[str, Any]:
    """Dispatch on ``cfg.method`` (fedkd or fedavg: the two that need a federation)."""
    if cfg.method == Method.FEDKD:
        return run_fedkd(grid, cfg, out_dir)
    if cfg.method == Method.FEDAVG:
        from server.fedavg import run_fedavg

        return run_fedavg(grid, cfg, out_dir)
    raise MedkdError(f"method {cfg.method.value} runs without a federation; use `medkd simulate --method "
                     f"{cfg.method.value}`")


def _log_to_console() -> None:
    """Under ``flwr run`` nobody configures logging; print medkd's INFO lines like Flower's own."""
    for name in ("server", "client", "common"):
        log = logging.getLogger(name)
        if not log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s medkd: %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)


def make_server_app(cfg: ExperimentConfig | None = None, out_dir: Path | None = None) -> ServerApp:
    """A ServerApp bound to ``cfg``/``out_dir`` (or reading both from the run config when None)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is None:  # started by `flwr run`: this is the entry point, so show medkd's progress
            _log_to_console()
        run_cfg = cfg if cfg is not None else config_from_run_config(context.run_config)
        run_out = out_dir if out_dir is not None else out_dir_from_run_config(context.run_config, context.run_id)
        run_server(grid, run_cfg, run_out)

    return server_app


app = make_server_app()
