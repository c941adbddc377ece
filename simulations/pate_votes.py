"""How much a hospital's PATE teachers know, before any noise: a diagnostic for the PATE utility study.

    python -m simulations.pate_votes HOSPITAL_DIR [HOSPITAL_DIR ...]

For each hospital folder whose policy uses ``privacy.mechanism: pate``, runs
its saved teachers (``pate/teachers.pt``) on the whole public proxy set and
reports, without noise: how many teachers predict one class for every proxy
sample (they carry no information), the mean vote share each class gets, and
the AUC of the noiseless vote share against the proxy labels (two-class sets).
Nothing leaves the hospital folder: this reads the hospital's own files and
the public proxy set, on the machine that holds them (the hospital's, or a
simulation's).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def vote_report(folder: Path) -> dict[str, Any]:
    """Noiseless vote statistics of the PATE teachers in hospital ``folder`` on the proxy set."""
    from monai.metrics import compute_roc_auc

    from client.dp_teacher import pate_probabilities, pate_teachers
    from client.hospital import load_hospital
    from client.privacy import vote_histogram
    from client.teacher import teacher_fingerprint, teacher_seed
    from common.config import PrivacyMechanism
    from common.device import resolve_device
    from common.errors import MedkdError
    from common.split import make_split

    hospital = load_hospital(Path(folder) / "policy.yaml")
    privacy = hospital.policy.privacy
    if privacy.mechanism != PrivacyMechanism.PATE:
        raise MedkdError(f"{folder}: privacy.mechanism is {privacy.mechanism.value}, not pate")
    cfg, index = hospital.cfg, hospital.index
    split = make_split(cfg)
    if not (hospital.folder / "pate" / "teachers.pt").exists():
        raise MedkdError(f"{hospital.folder}: no pate/teachers.pt (the hospital has not answered a query yet)")
    models = pate_teachers(cfg=cfg, split=split, hospital=index, privacy=privacy, folder=hospital.folder,
                           seed=teacher_seed(cfg, index), fingerprint=teacher_fingerprint(cfg, split, index))
    n = split.proxy.labels.shape[0]
    probs = pate_probabilities(models, split.proxy_on(resolve_device(cfg.device)).take(np.arange(n)), amp=cfg.amp)
    top = probs.argmax(axis=2)  # (m, N)
    constant = int(sum(len(np.unique(row)) == 1 for row in top))
    votes = vote_histogram(probs)
    labels = split.proxy.labels.reshape(-1)
    report: dict[str, Any] = {
        "hospital": hospital.name, "folder": str(hospital.folder), "teachers": len(models),
        "private_records": int(split.hospital(index).labels.shape[0]),
        "records_per_teacher": round(split.hospital(index).labels.shape[0] / len(models), 1),
        "teachers_with_one_class_for_every_input": constant,
        "mean_vote_share_per_class": [round(float(v), 3) for v in votes.mean(axis=0) / len(models)],
    }
    if votes.shape[1] == 2 and len(np.unique(labels)) == 2:
        share = torch.as_tensor(votes[:, 1] / len(models))
        report["proxy_auc_of_noiseless_vote_share"] = round(float(compute_roc_auc(share, torch.as_tensor(labels))), 4)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.pate_votes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="hospital folders (each with policy.yaml)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for folder in args.folders:
        sys.stdout.write(json.dumps(vote_report(folder)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
