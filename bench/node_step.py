"""What one node's ClientApp call costs, without Flower's engine or Ray around it.

``python -m bench.node_step [--nodes 32] [--rounds 6] [key=value ...]`` builds a run config
(default: 256 head-only glyphs nodes, IID, the project's defaults otherwise), and calls the
ClientApp's train function for the first ``--nodes`` nodes of a ring, round after round, in this
process, one torch thread (as a Ray actor has), each node receiving its two neighbours' last
messages exactly as the relay delivers them. Prints one JSON line: CPU milliseconds per node-round,
by round. Round 1 also builds every node (data, frozen-prefix activations); evaluation happens in
rounds 1, 4, 7, ... (``eval-every`` 3). CPU time, not wall time: it means something on a shared
machine, where a wall time would not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

DEFAULTS = ["finetune=head", "dataset=glyphs", "partitioner=iid", "num-nodes=256"]


def main(argv: list[str] | None = None) -> int:
    """Run the calls; print CPU ms per node-round, by round, as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.node_step", description=__doc__)
    parser.add_argument("--nodes", type=int, default=32, help="nodes called each round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("overrides", nargs="*", help="run-config key=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from flwr.supercore.task_identity import TaskIdentity

    # Messages are made outside a Flower run here: give them the identity a run would.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    from flwr.app import Context, RecordDict

    from flower_p2p import client_app
    from flower_p2p.gossip_strategy import round_message
    from sim.cli import config_from_args

    cfg = config_from_args([*DEFAULTS, *args.overrides])
    n = min(args.nodes, cfg.num_nodes)
    run_config = cfg.to_run_config()
    contexts = [
        Context(run_id=1, node_id=i + 1, state=RecordDict(), run_config=dict(run_config),
                node_config={"partition-id": i, "num-partitions": cfg.num_nodes})
        for i in range(n)
    ]  # fmt: skip
    last: dict = {}
    per_round = []
    for rnd in range(1, args.rounds + 1):
        sent = {}
        start = time.process_time()
        for i in range(n):
            inbox = {j: last[j] for j in ((i - 1) % n, (i + 1) % n) if j in last}
            evaluate = (rnd - 1) % cfg.eval_every == 0
            msg = round_message(rnd, evaluate, inbox, i + 1, "train", {"steps-fraction": 1.0})
            msg.metadata.__dict__["_message_id"] = f"{rnd}-{i}"
            reply = client_app.train(msg, contexts[i])
            sent[i] = reply.content.array_records["out"]
        per_round.append(1000 * (time.process_time() - start) / n)
        last = sent
    print(json.dumps({"nodes": n, "cpu_ms_per_node_round": [round(t, 2) for t in per_round]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
