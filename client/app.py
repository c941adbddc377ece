"""The hospital's ClientApp: handlers only (unpack, call, pack), all behind the outbound gate.

Handlers
--------
``query.logits``   teacher outputs on proxy indices (trains the teacher the first time).
``train.teacher``  (re)train the teacher on request, if the policy's ``answers.train_teacher`` allows;
                   replies with local metrics only.
``train``          FedAvg *baseline* only, if the policy's ``answers.fedavg_weights`` opted in.

Which hospital this is, where its data and folder are and what it may
release come from its own policy file (see :mod:`client.hospital`), never
from the coordinator's ``run_config``: entries there are ignored and the
hospital notes that in its own log. :class:`HospitalApp` passes every reply,
error replies included, through :class:`client.gate.OutboundGate`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.gate import OutboundGate
from client.hospital import (Hospital, check_query, hospitals_root, ignored_run_config, load_hospital, locate_policy,
                             released_indices)
from client.privacy import describe
from common.config import PrivacyMechanism
from common.errors import PolicyRefusal
from common.payload import HOSPITAL_ERROR_CODE, Query, make_reply_content, parse_query, reportable

if TYPE_CHECKING:
    from common.split import FederatedSplit

logger = logging.getLogger(__name__)


def answer_query(msg: Message, hospital: Hospital, *, split: FederatedSplit | None = None) -> Message:
    """Check the query (contract, then policy), run the teacher on the requested proxy samples, pack the outputs.

    Under the policy's privacy mechanism: ``pate`` and ``hospital_gaussian`` answers are noised and staged
    for charging (:mod:`client.dp_serve`); a ``dp_sgd_teacher`` answers with its DP-trained teacher. Under any
    mechanism the reply carries no local validation figure and announces ``privacy.declared_size`` as its size.
    ``split`` replaces the policy's data only for the canary audit (client/canary.py: the private set plus canaries).
    """
    from client.serve import plain_answer, teacher_outputs
    from client.teacher import load_or_train_teacher
    from common.split import make_split

    split = split or make_split(hospital.cfg)
    proxy = split.proxy
    query = parse_query(msg.content, proxy_size=proxy.labels.shape[0], proxy_hash=split.proxy_hash)
    check_query(query, hospital.policy, released=released_indices(hospital.folder, run_id=msg.metadata.run_id))
    _keep_receipt(query, hospital, run_id=msg.metadata.run_id)
    privacy = hospital.policy.privacy
    label = describe(privacy).label
    if privacy.mechanism in (PrivacyMechanism.PATE, PrivacyMechanism.HOSPITAL_GAUSSIAN):
        from client.dp_serve import noisy_answers

        outputs, model = noisy_answers(query=query, hospital=hospital, split=split, run_id=msg.metadata.run_id)
        content = make_reply_content(outputs=outputs, dtype=query.dtype, hospital=hospital.name, model=model,
                                     privacy=label, num_private=privacy.declared_size, val_auc=float("nan"),
                                     teacher_version=_teacher_version(hospital, split))
        return Message(content, reply_to=msg)
    teacher, info = load_or_train_teacher(cfg=hospital.cfg, split=split, hospital=hospital.index,
                                          hospital_dir=hospital.folder, run_id=msg.metadata.run_id)
    images = split.proxy_on(next(teacher.parameters()).device).take(query.indices)  # only the queried samples
    if privacy.mechanism == PrivacyMechanism.DP_SGD_TEACHER:  # post-processing of the DP-SGD teacher: free
        outputs = teacher_outputs(teacher, images, output=query.output, temperature=query.temperature,
                                  amp=hospital.cfg.amp)
        content = make_reply_content(outputs=outputs, dtype=query.dtype, hospital=hospital.name, model=info.model,
                                     privacy=label, num_private=privacy.declared_size, val_auc=float("nan"),
                                     teacher_version=_teacher_version(hospital, split))
        return Message(content, reply_to=msg)
    from client.selector import load_or_train_selector

    selector = load_or_train_selector(cfg=hospital.cfg, split=split, hospital=hospital.index,
                                      hospital_dir=hospital.folder, teacher=teacher)
    outputs, mask, density = plain_answer(teacher, selector, images, output=query.output,
                                          temperature=query.temperature, amp=hospital.cfg.amp)
    content = make_reply_content(outputs=outputs, dtype=query.dtype, hospital=hospital.name, model=info.model,
                                 privacy=label, num_private=info.num_private, val_auc=info.val_auc, mask=mask,
                                 density=density, label_counts=_label_counts(query, hospital, split),
                                 teacher_version=_teacher_version(hospital, split))
    return Message(content, reply_to=msg)


def _teacher_version(hospital: Hospital, split: FederatedSplit) -> str:
    """The random token naming what answers (teacher and, without DP, the selector); new when either changes.

    Called after the teacher was loaded or trained (training forgets the old tokens).
    """
    from client.teacher import teacher_fingerprint
    from client.teacher_version import teacher_version
    from common.names import SelectorKind

    cfg = hospital.cfg
    identity = [teacher_fingerprint(cfg, split, hospital.index)]
    if hospital.policy.privacy.mechanism == PrivacyMechanism.NONE and cfg.selector.kind != SelectorKind.NONE:
        from client.selector import selector_fingerprint

        identity.append(selector_fingerprint(cfg, split, hospital.index))
    return teacher_version(hospital.folder, *identity)


def _keep_receipt(query: Query, hospital: Hospital, *, run_id: int) -> None:
    """Store the coordinator's receipt for this hospital's last reply (a bad one is noted, never fatal)."""
    if query.receipt is None:
        return
    from client.receipts import store_receipt

    problem = store_receipt(hospital.folder, query.receipt, hospital=hospital.name, run_id=run_id)
    if problem:
        logger.warning("hospital %s did not keep the coordinator's receipt (round %s): %s", hospital.name,
                       query.receipt.get("round"), problem)


def _label_counts(query: Query, hospital: Hospital, split: FederatedSplit) -> np.ndarray | None:
    """The private data's class counts, if the query asks and the policy releases them (else None, noted)."""
    if not query.label_counts:
        return None
    if not hospital.policy.answers.label_counts:
        logger.info("hospital %s: the query asked for label counts; its policy (answers.label_counts) keeps them",
                    hospital.name)
        return None
    from common.data import class_counts

    return class_counts(split.hospital(hospital.index).labels, split.data.n_classes)


def train_teacher_now(msg: Message, hospital: Hospital) -> Message:
    """Retrain the teacher on request; reply with sizes and local validation figures only."""
    from client.teacher import load_or_train_teacher
    from common.split import make_split

    if not hospital.policy.answers.train_teacher:
        raise PolicyRefusal("this hospital does not retrain its teacher on request", field="answers.train_teacher")
    privacy = hospital.policy.privacy
    if privacy.mechanism == PrivacyMechanism.PATE:
        raise PolicyRefusal("PATE teachers are trained once per policy; they are not retrained on request",
                            field="privacy.mechanism")
    _, info = load_or_train_teacher(cfg=hospital.cfg, split=make_split(hospital.cfg), hospital=hospital.index,
                                    hospital_dir=hospital.folder, retrain=True, run_id=msg.metadata.run_id)
    if privacy.mechanism != PrivacyMechanism.NONE:  # sizes and local figures are private data outside the mechanism
        metrics = {"num_private": privacy.declared_size, "val_auc": -1.0, "val_acc": -1.0,
                   "epochs_run": info.epochs_run}
    else:
        metrics = {"num_private": info.num_private, "val_auc": reportable(info.val_auc),
                   "val_acc": reportable(info.val_acc), "epochs_run": info.epochs_run}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def fedavg_train(msg: Message, hospital: Hospital) -> Message:
    """FedAvg baseline: train the received student on private data and send the weights back (policy opt-in)."""
    from client.fedavg import train_received_student

    if not hospital.policy.answers.fedavg_weights:
        raise PolicyRefusal("this hospital does not send model weights (it did not opt in to a FedAvg baseline "
                            "study)", field="answers.fedavg_weights")
    arrays, num_examples, loss = train_received_student(msg.content, hospital=hospital)
    return Message(RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord({"num-examples": num_examples, "train_loss": loss}),
        "hospital": ConfigRecord({"name": hospital.name}),
    }), reply_to=msg)


def hospital_gate(hospital: Hospital, *, run_id: int) -> OutboundGate:
    """The outbound gate of ``hospital`` in run ``run_id``, built from its policy (the ClientApp's and the canary's)."""
    return OutboundGate(hospital=hospital.name, folder=hospital.folder, run_id=run_id,
                        allow_weights=hospital.policy.answers.fedavg_weights, privacy=hospital.policy.privacy,
                        archive_payloads=hospital.policy.audit_archive)


class HospitalApp(ClientApp):
    """A ClientApp whose every reply, for every message type, leaves through the hospital's gate.

    The gate wraps Flower's whole dispatch (handlers, their mods, and the
    unknown-message-type error), so nothing runs after it.
    """

    def __init__(self, *, hospitals_dir: Path | None = None) -> None:
        super().__init__()
        self._hospitals_dir = hospitals_dir

    def __call__(self, message: Message, context: Context) -> Message:
        try:
            path = locate_policy(context.node_config, hospitals_root(self._hospitals_dir))
            hospital = load_hospital(path)
        except Exception as e:  # no policy, no folder: nothing can be released or logged
            logger.error("hospital node %s is not set up: %s", context.node_id, e)
            return Message(Error(code=HOSPITAL_ERROR_CODE, reason="hospital is not set up: its policy is missing or "
                                 "invalid; details stay in the hospital's log"), reply_to=message)
        gate = hospital_gate(hospital, run_id=context.run_id)
        _note_ignored_run_config(context, gate)
        dispatch: Callable[[Message], Message] = lambda m: super(HospitalApp, self).__call__(m, context)  # noqa: E731
        try:
            return gate.guard(message, dispatch)
        except OSError as e:  # the outbound log cannot be written: release nothing
            logger.error("hospital %s cannot write its outbound log: %s", hospital.name, e)
            return Message(Error(code=HOSPITAL_ERROR_CODE, reason=f"hospital {hospital.name} cannot record its "
                                 "outbound traffic; nothing was released"), reply_to=message)


def _note_ignored_run_config(context: Context, gate: OutboundGate) -> None:
    """Note once per run, in the hospital's own log, every coordinator run-config entry it ignores."""
    ignored = ignored_run_config(context.run_config)
    marker = context.state.config_records.get("medkd")
    if not ignored or (marker is not None and marker.get("run_config_noted")):
        return
    for key, value in sorted(ignored.items()):
        gate.note(f"ignored the coordinator's run_config {key}={value!r}: this hospital takes its data, folder, "
                  "method and limits from its own policy only")
    logger.warning("hospital %s ignores the coordinator's run_config (%s): its own policy decides",
                   gate.hospital, ", ".join(sorted(ignored)))
    context.state.config_records["medkd"] = ConfigRecord({"run_config_noted": True})


def make_client_app(hospitals_dir: Path | None = None, *, query_mods: list[Mod] | None = None) -> ClientApp:
    """The hospital ClientApp; simulated hospital ``i`` reads ``<hospitals_dir>/H<i>/policy.yaml``.

    ``hospitals_dir`` None means ``$MEDKD_HOSPITALS`` (or the default
    folder); a SuperNode's ``node_config`` naming ``policy`` or
    ``hospital-dir`` takes precedence. ``query_mods`` are Flower mods around
    the ``query.logits`` handler (simulation fault injection); they run
    inside the gate, so their changes are what the gate logs.
    """
    client_app = HospitalApp(hospitals_dir=hospitals_dir)

    def resolve(context: Context) -> Hospital:
        import torch

        hospital = load_hospital(locate_policy(context.node_config, hospitals_root(hospitals_dir)))
        torch.set_num_threads(hospital.policy.threads)
        return hospital

    @client_app.query("logits", mods=query_mods)
    def query_logits(msg: Message, context: Context) -> Message:
        return answer_query(msg, resolve(context))

    @client_app.train("teacher")
    def train_teacher(msg: Message, context: Context) -> Message:
        return train_teacher_now(msg, resolve(context))

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return fedavg_train(msg, resolve(context))

    return client_app


app = make_client_app()
