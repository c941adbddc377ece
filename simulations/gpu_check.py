"""GPU check: how fast medkd's device paths run, as one JSON document with the card named next to every figure.

``python -m simulations.gpu_check [--quick] [--out FILE] [--device auto|cpu|cuda[:i]]``

Figures (images per second unless stated):

- ``serving``: proxy images through a hospital's whole outbound path
  (query parse, policy check, teacher, reply packing, gate: hash, log,
  copy) against the raw teacher forward pass on the same batch, their
  ratio and the path's fixed cost in ms per query; a third row adds the
  default ``density_ratio`` selector, whose classifier is a second forward
  pass on the raw side too;
- ``serving_parts``: the host-side parts of that path in ms per query
  (parse, policy, pack, gate), without any network;
- ``distill``: student distillation throughput (smallcnn, KD loss, one epoch);
- ``forward``: raw inference of DenseNet121 and ResNet-18 at 28, 64 and 224 px,
  fp32 and bf16 (``channels_last``, ``inference_mode``);
- ``teacher_epoch``: one training epoch on the CPU against the GPU, and the speed-up.

The data are generated (:func:`simulations.synthetic.random_dataset`): only speed is measured here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("medkd.gpu_check")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], *, device: torch.device, min_seconds: float, warmup: int = 2,
          max_iters: int = 50) -> float:
    """Mean seconds per call of ``fn`` after ``warmup`` calls, over at least ``min_seconds`` (or ``max_iters``)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start, iters = time.perf_counter(), 0
    while True:
        fn()
        iters += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or iters >= max_iters:
            return elapsed / iters


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def forward_figures(device: torch.device, *, quick: bool, card: str) -> list[dict[str, Any]]:
    """Raw inference throughput of DenseNet121 and ResNet-18 at 28/64/224 px, fp32 and bf16."""
    from common.device import autocast, place_batch, place_model
    from common.models import ModelSpec, build_model

    rows = []
    sizes = (28, 64) if quick else (28, 64, 224)
    for name in ("densenet121", "resnet18"):
        for size in sizes:
            model = place_model(build_model(name, ModelSpec(spatial_dims=2, in_channels=3, n_classes=5,
                                                            spatial_size=size)), device).eval()
            batch = (16 if quick else 256) if size == 224 else (32 if quick else 2048)
            x = place_batch(torch.rand(batch, 3, size, size), device)
            for precision in ("fp32", "bf16"):
                def step() -> None:
                    with torch.inference_mode(), autocast(device, amp=precision == "bf16"):
                        model(x)

                seconds = timed(step, device=device, min_seconds=0.3 if quick else 1.0)
                rows.append({"card": card, "model": name, "px": size, "precision": precision, "batch": batch,
                             "images_per_s": round(batch / seconds, 1)})
                logger.info("forward %s %d px %s: %.0f images/s", name, size, precision, batch / seconds)
    return rows


def _request(content: Any, *, message_type: str) -> Any:
    from flwr.app import Message, Metadata

    metadata = Metadata(run_id=1, message_id=f"gpu-check-{time.monotonic_ns()}", src_node_id=1, dst_node_id=2,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0,
                        message_type=message_type)
    return Message(content=content, metadata=metadata)


def serving_figures(device: torch.device, workdir: Path, *, model: str, n: int, card: str,
                    quick: bool, selector: str = "none") -> dict[str, Any]:
    """A hospital's whole outbound path on ``n`` proxy images against the raw forward pass(es) it must run.

    With ``selector`` none (the issue's figure) the raw side is the teacher's forward pass alone. With
    ``density_ratio`` the hospital also runs its selector's classifier on the same images, by design, so the raw
    side is both forward passes; ``max_softmax`` reuses the teacher's logits and adds no forward pass.
    """
    from flwr.app import Context, RecordDict

    from client.app import make_client_app
    from client.teacher import load_or_train_teacher
    from client.selector import load_or_train_selector
    from common.config import OutputKind, PolicyLimits, SelectorConfig, TeacherConfig, WireDtype
    from common.device import autocast
    from common.names import SelectorKind
    from common.payload import QUERY_MESSAGE_TYPE, Query, make_query_content
    from common.policy import HospitalPolicy, PolicyData, hospital_experiment, write_policy
    from common.split import make_split
    from simulations.synthetic import random_dataset

    folder = workdir / f"serve-{model}-{selector}"
    data = random_dataset(workdir / f"serve-{n}.npz", n_train=int(n / 0.8) + 4000, size=28, channels=3)
    policy = HospitalPolicy(hospital="H0", device=str(device), amp=True,
                            data=PolicyData(dataset=str(data), proxy_fraction=0.8, download=False),
                            teacher=TeacherConfig(model=model, epochs=1, patience=1, batch_size=256, ensemble=1),
                            limits=PolicyLimits(max_indices_per_query=n, max_indices_per_run=10**9),
                            selector=SelectorConfig(kind=SelectorKind(selector), epochs=2 if quick else 20))
    write_policy(folder / "policy.yaml", policy)
    cfg = hospital_experiment(policy)
    split = make_split(cfg)
    app = make_client_app(workdir)
    context = Context(run_id=1, node_id=2, node_config={"policy": str(folder / "policy.yaml")}, state=RecordDict(),
                      run_config={})
    query = Query(round=1, proxy_hash=split.proxy_hash, indices=np.arange(n), temperature=2.0,
                  output=OutputKind.PROBS, dtype=WireDtype.FLOAT16)
    content = make_query_content(query)
    start = time.perf_counter()
    first = app(_request(content, message_type=QUERY_MESSAGE_TYPE), context)  # trains the teacher (1 epoch)
    train_s = time.perf_counter() - start
    if first.has_error():
        raise RuntimeError(f"serving check failed: {first.error.reason}")

    def serve() -> None:
        reply = app(_request(content, message_type=QUERY_MESSAGE_TYPE), context)
        if reply.has_error():
            raise RuntimeError(reply.error.reason)

    path_s = timed(serve, device=device, min_seconds=0.5 if quick else 2.0, warmup=1, max_iters=20)
    teacher, _ = load_or_train_teacher(cfg=cfg, split=split, hospital=0, hospital_dir=folder)
    chosen = load_or_train_selector(cfg=cfg, split=split, hospital=0, hospital_dir=folder, teacher=teacher)
    networks = [teacher] + ([chosen.model] if chosen is not None and chosen.model is not None else [])
    x = split.proxy_on(device).take(query.indices)
    step = 4096 if device.type == "cuda" else 256

    def forward() -> None:
        with torch.inference_mode(), autocast(device, amp=True):
            for i in range(0, n, step):
                for net in networks:
                    net(x[i:i + step])

    raw_s = timed(forward, device=device, min_seconds=0.5 if quick else 2.0, warmup=1)
    return {"card": card, "teacher": model, "selector": selector, "raw_forward_passes": len(networks), "px": 28,
            "batch": n, "first_query_s_incl_training": round(train_s, 2),
            "path_images_per_s": round(n / path_s, 1), "raw_forward_images_per_s": round(n / raw_s, 1),
            "ratio_path_over_raw": round(raw_s / path_s, 3),
            "path_overhead_ms_per_query": round(1000 * (path_s - raw_s), 1)}


def serving_part_figures(workdir: Path, *, n: int, card: str) -> dict[str, Any]:
    """Host-side parts of one ``n``-index answer, in ms (median of 5): what the serving path adds to the teacher.

    parse (contract checks), policy (limits, released count), pack (reply
    records) and gate (audit and outbound logs with fsync, serialisation,
    SHA-256, the copy decoded from the wire bytes), on a packed reply of
    random probabilities: no network runs here, so the figures are the
    fixed cost a GPU's forward pass must hide.
    """
    from flwr.app import Message

    from client.app import hospital_gate
    from client.hospital import check_query, load_hospital, released_indices
    from common.config import OutputKind, PolicyLimits, WireDtype
    from common.payload import QUERY_MESSAGE_TYPE, Query, make_query_content, make_reply_content, parse_query
    from common.policy import HospitalPolicy, PolicyData, write_policy
    from common.split import make_split
    from simulations.synthetic import random_dataset

    data = random_dataset(workdir / f"parts-{n}.npz", n_train=int(n / 0.8) + 400, size=28, channels=3)
    policy_path = workdir / "parts" / "policy.yaml"
    write_policy(policy_path, HospitalPolicy(hospital="H0", device="cpu", data=PolicyData(
        dataset=str(data), proxy_fraction=0.8, download=False), limits=PolicyLimits(
        max_indices_per_query=n, max_indices_per_run=10**9)))
    hospital = load_hospital(policy_path)
    split = make_split(hospital.cfg)
    content = make_query_content(Query(round=1, proxy_hash=split.proxy_hash, indices=np.arange(n), temperature=2.0,
                                       output=OutputKind.PROBS, dtype=WireDtype.FLOAT16))
    probs = torch.softmax(torch.randn(n, split.data.n_classes, generator=torch.Generator().manual_seed(0)), 1).numpy()
    parts: dict[str, list[float]] = {"parse": [], "policy": [], "pack": [], "gate": []}

    def answer(msg: Message) -> Message:
        t0 = time.perf_counter()
        query = parse_query(msg.content, proxy_size=split.proxy.labels.shape[0], proxy_hash=split.proxy_hash)
        t1 = time.perf_counter()
        check_query(query, hospital.policy, released=released_indices(hospital.folder, run_id=1))
        t2 = time.perf_counter()
        reply = make_reply_content(outputs=probs, dtype=query.dtype, hospital="H0", model="smallcnn",
                                   privacy="none", num_private=1, val_auc=0.5, teacher_version="0" * 32)
        parts["parse"].append(t1 - t0)
        parts["policy"].append(t2 - t1)
        parts["pack"].append(time.perf_counter() - t2)
        return Message(reply, reply_to=msg)

    for i in range(7):
        start = time.perf_counter()
        reply = hospital_gate(hospital, run_id=1).guard(_request(content, message_type=QUERY_MESSAGE_TYPE), answer)
        if reply.has_error():
            raise RuntimeError(f"serving parts check failed: {reply.error.reason}")
        inner = parts["parse"][-1] + parts["policy"][-1] + parts["pack"][-1]
        parts["gate"].append(time.perf_counter() - start - inner)
    return {"card": card, "cpu": card_name(torch.device("cpu")), "batch": n,
            **{f"{k}_ms": round(1000 * float(np.median(v[2:])), 2) for k, v in parts.items()},
            "total_ms": round(1000 * float(sum(np.median(v[2:]) for v in parts.values())), 2)}


def distill_figures(device: torch.device, *, n: int, card: str, quick: bool) -> list[dict[str, Any]]:
    """Student (smallcnn) distillation throughput at the default batch size and a large one."""
    from common.config import DistillConfig
    from common.device import place_model
    from common.models import ModelSpec, build_model
    from common.training import seed_everything
    from server.distill import distill_student

    rows = []
    images = torch.rand(n, 3, 28, 28)
    targets = torch.softmax(torch.randn(n, 5), dim=1)
    for batch_size in (32, 512):
        student = place_model(build_model("smallcnn", ModelSpec(spatial_dims=2, in_channels=3, n_classes=5,
                                                                spatial_size=28)), device)
        optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
        cfg = DistillConfig(epochs=1, batch_size=batch_size)
        gen = seed_everything(0)
        seconds = timed(lambda: distill_student(student=student, optimizer=optimizer, images=images,
                                                target_probs=targets, cfg=cfg, gen=gen, amp=True),
                        device=device, min_seconds=0.5 if quick else 2.0, warmup=1, max_iters=10)
        rows.append({"card": card, "student": "smallcnn", "batch_size": batch_size, "bank": n,
                     "images_per_s": round(n / seconds, 1)})
    return rows


def teacher_epoch_figures(device: torch.device, *, quick: bool, card: str) -> list[dict[str, Any]]:
    """One teacher training epoch on the CPU and on ``device`` (smallcnn and resnet18, 28 px)."""
    from common.device import place_model
    from common.models import ModelSpec, build_model
    from common.training import run_epoch, seed_everything, to_model_device

    rows = []
    spec = ModelSpec(spatial_dims=2, in_channels=3, n_classes=5, spatial_size=28)
    for name, n in (("smallcnn", 512 if quick else 8192), ("resnet18", 128 if quick else 2048)):
        images, labels = torch.rand(n, 3, 28, 28), torch.randint(0, 5, (n,))
        seconds = {}
        for where in ("cpu", str(device)):
            dev = torch.device(where)
            model = place_model(build_model(name, spec), dev)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            x, y = to_model_device(model, images, labels)
            gen = seed_everything(0)
            seconds[where] = timed(lambda: run_epoch(model=model, optimizer=optimizer, images=x, batch_size=32,
                                                     gen=gen, augment=True, amp=True,
                                                     loss_fn=lambda logits, idx: torch.nn.functional.cross_entropy(
                                                         logits.float(), y[idx])),
                                   device=dev, min_seconds=0.0, warmup=1 if dev.type == "cuda" else 0, max_iters=1)
        rows.append({"card": card, "cpu": card_name(torch.device("cpu")), "teacher": name, "images": n,
                     "batch_size": 32, "cpu_epoch_s": round(seconds["cpu"], 3),
                     "device_epoch_s": round(seconds[str(device)], 3),
                     "speedup": round(seconds["cpu"] / seconds[str(device)], 2)})
    return rows


def run_checks(device_spec: str, *, quick: bool, only: list[str] | None = None) -> dict[str, Any]:
    """All figures as one JSON-ready document."""
    from common.device import resolve_device

    torch.backends.cudnn.benchmark = True
    device = resolve_device(device_spec)
    card = card_name(device)
    doc: dict[str, Any] = {"card": card, "device": str(device), "torch": torch.__version__, "quick": quick}
    n = 2048 if quick else 65536
    sections: dict[str, Callable[[Path], object]] = {
        "serving": lambda tmp: [serving_figures(device, tmp, model=m, n=n, card=card, quick=quick, selector=sel)
                                for m, sel in (("resnet18", "none"), ("densenet121", "none"),
                                               ("resnet18", "density_ratio"))],
        "serving_parts": lambda tmp: serving_part_figures(tmp, n=n, card=card),
        "distill": lambda tmp: distill_figures(device, n=1024 if quick else 16384, card=card, quick=quick),
        "forward": lambda tmp: forward_figures(device, quick=quick, card=card),
        "teacher_epoch": lambda tmp: teacher_epoch_figures(device, quick=quick, card=card),
    }
    for name, section in sections.items():  # one failing section must not cost the others' figures
        if only and name not in only:
            continue
        start = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="medkd-gpu-check-") as tmp:
                doc[name] = section(Path(tmp))
        except Exception as e:
            logger.exception("section %s failed", name)
            doc[name] = {"card": card, "error": f"{type(e).__name__}: {e}"}
        logger.info("section %s done in %.1f s", name, time.perf_counter() - start)
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:<i>")
    parser.add_argument("--quick", action="store_true", help="small sizes: check the script, not the card")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--only", nargs="+", default=None, choices=["serving", "serving_parts", "distill", "forward",
                                                                    "teacher_epoch"],
                        help="run only these sections")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    doc = run_checks(args.device, quick=args.quick, only=args.only)
    text = json.dumps(doc, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)  # the script's output is this JSON document
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
