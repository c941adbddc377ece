"""Simulated hospitals in one process share one read-only copy of the data set; each holds only its share."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np

from client.app import make_client_app
from client.hospital import load_hospital
from client.teacher import load_or_train_teacher
from common.config import OutputKind, WireDtype
from common.payload import QUERY_MESSAGE_TYPE, Query, make_query_content
from common.split import make_split
from simulations.run import prepare_hospitals
from tests.conftest import request_message


def test_a_simulated_hospital_holds_its_share_not_a_copy_of_the_data_set(tiny_config, tmp_path: Path) -> None:
    from flwr.app import Context, RecordDict

    cfg = tiny_config(**{"federation.hospitals": 4, "teacher.epochs": 1})
    prepare_hospitals(cfg, tmp_path)
    hospitals = [load_hospital(tmp_path / f"H{i}" / "policy.yaml") for i in range(4)]
    splits = [make_split(h.cfg) for h in hospitals]
    assert all(s is splits[0] for s in splits)  # one split (and one data set) per process, whatever the hospital
    split = splits[0]
    whole = split.data.train.images.nbytes + split.data.val.images.nbytes + split.data.test.images.nbytes
    shares = [split.hospital(h.index).images.nbytes for h in hospitals]
    assert sum(shares) <= split.data.train.images.nbytes and max(shares) < whole / 2
    assert not split.data.train.images.flags.writeable  # shared read-only: nobody can change another's view

    for h in hospitals:  # teachers trained up front, as the scale benchmark does
        load_or_train_teacher(cfg=h.cfg, split=split, hospital=h.index, hospital_dir=h.folder)
    app = make_client_app(tmp_path)
    query = make_query_content(Query(round=1, proxy_hash=split.proxy_hash, indices=np.arange(64), temperature=2.0,
                                     output=OutputKind.PROBS, dtype=WireDtype.FLOAT16))
    assert split.proxy.images.shape[0] == 270  # the public proxy set is built once per process, before serving
    tracemalloc.start()
    try:
        for rnd in range(2):
            for i in range(4):
                context = Context(run_id=7, node_id=10 + i, node_config={"partition-id": i, "num-partitions": 4},
                                  state=RecordDict(), run_config={})
                reply = app(request_message(query, message_type=QUERY_MESSAGE_TYPE, dst_node_id=10 + i, round=rnd),
                            context)
                assert not reply.has_error()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Eight answered queries from four hospitals allocated less than one copy of the data set in all.
    print(peak, whole, split.data.train.images.nbytes)
    assert peak < whole, f"serving allocated {peak} bytes at peak; the whole data set is {whole}"
