"""Round loop of the minimal app: one ``query.echo`` per node per round; writes seconds per round to ``out``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds, wanted = int(context.run_config["rounds"]), int(context.run_config["nodes"])
    while len(list(grid.get_node_ids())) < wanted:
        time.sleep(0.5)
    payload = RecordDict({"x": ArrayRecord({"x": Array(np.zeros((135, 5), dtype=np.float32))})})
    seconds = []
    for rnd in range(1, rounds + 1):
        start = time.perf_counter()
        messages = [Message(payload, dst_node_id=n, message_type="query.echo", group_id=str(rnd))
                    for n in grid.get_node_ids()]
        replies = list(grid.send_and_receive(messages, timeout=300))
        seconds.append(time.perf_counter() - start)
        print(f"roundtrip round {rnd}: {len(replies)} replies in {seconds[-1]:.2f} s", flush=True)
    Path(str(context.run_config["out"])).write_text(json.dumps({"seconds_per_round": seconds}))
