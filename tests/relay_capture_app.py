"""A ServerApp that runs the real relay through a Grid that records every message it sends.

For tests: ``sim.engine.run_experiment(cfg, server_app="relay_capture_app:app")`` runs the
project's own ``server_app.run_experiment`` unchanged; the wrapper only watches. It writes
``relay_log.json`` into the run's folder: for every train/evaluate message the round, the
receiving partition and, per ``in:<j>`` record, a hash of its arrays; for every reply the hash
of the ``out`` record its node sent (or of each ``out:<k>``, with its receiver k).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from flwr.app import ArrayRecord, Context, MessageType
from flwr.serverapp import Grid, ServerApp

from flower_p2p.config import ExperimentConfig
from flower_p2p.server_app import run_experiment
from flower_p2p.wire import INBOX_PREFIX, OUTBOX_PREFIX

app = ServerApp()


def record_hash(record: ArrayRecord) -> str:
    """A digest of a record's names and array bytes."""
    h = hashlib.sha256()
    for name, array in record.items():
        h.update(name.encode())
        h.update(array.data)
    return h.hexdigest()


class RecordingGrid:
    """Forwards everything to ``grid``; logs what the relay sends and what the nodes reply."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.partition_of: dict[int, int] = {}
        self.sent: list[dict] = []
        self.replies: list[dict] = []

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *args, **kwargs):
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, *args, **kwargs))
        # mode=async: which activation each node ran (a call sends a node one message at most)
        activation_of = {
            m.metadata.dst_node_id: int(m.content.config_records["config"]["activation"])
            for m in messages
            if "config" in m.content.config_records
            and "activation" in m.content.config_records["config"]
        }
        for reply in replies:
            if reply.has_error():
                continue
            src = reply.metadata.src_node_id
            if "node" in reply.content.config_records:
                pid = int(reply.content.config_records["node"]["partition-id"])
                self.partition_of[src] = pid
            rnd = int(reply.metadata.group_id) if reply.metadata.group_id else 0
            for key, record in reply.content.array_records.items():
                if key == "out" and len(record):  # one message for every receiver
                    self.replies.append({"round": rnd, "node": self.partition_of[src],
                                         "to": None, "out": record_hash(record),
                                         "activation": activation_of.get(src)})  # fmt: skip
                elif key.startswith(OUTBOX_PREFIX):  # a message for one receiver
                    self.replies.append({"round": rnd, "node": self.partition_of[src],
                                         "to": int(key[len(OUTBOX_PREFIX):]),
                                         "out": record_hash(record)})  # fmt: skip
        for msg in messages:
            if msg.metadata.message_type not in (MessageType.TRAIN, MessageType.EVALUATE):
                continue
            inbox = {
                key[len(INBOX_PREFIX) :]: record_hash(rec)
                for key, rec in msg.content.array_records.items()
                if key.startswith(INBOX_PREFIX)
            }
            config = msg.content.config_records["config"]
            self.sent.append({
                "round": int(config["round"]),
                "activation": int(config["activation"]) if "activation" in config else None,
                "node": self.partition_of[msg.metadata.dst_node_id],
                "kind": msg.metadata.message_type,
                "inbox": inbox,
                "keys": sorted(msg.content.keys()),
            })  # fmt: skip
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The project's relay, watched."""
    cfg = ExperimentConfig.from_run_config(dict(context.run_config))
    watched = RecordingGrid(grid)
    out = run_experiment(watched, cfg)  # type: ignore[arg-type]
    log = {"sent": watched.sent, "replies": watched.replies}
    Path(out, "relay_log.json").write_text(json.dumps(log))


__all__ = ["app"]
