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
from flower_p2p.hosting import HOSTED, unpack_sections
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
        self.hosted: list[int] = []  # graph nodes per packed message (nodes-per-supernode)

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *args, **kwargs):
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, *args, **kwargs))
        # nodes-per-supernode > 1: a message carries several graph nodes' sections
        self.hosted.extend(len(_sections(m, None)) for m in messages
                           if HOSTED in m.content.config_records)  # fmt: skip
        sent = [
            (node, content, m.metadata.message_type)
            for m in messages
            for node, content in _sections(m, self.partition_of)
        ]
        # mode=async: which activation each node ran (a call sends a node one message at most)
        activation_of = {
            node: int(content.config_records["config"]["activation"])
            for node, content, _ in sent
            if "config" in content.config_records
            and "activation" in content.config_records["config"]
        }
        for reply in replies:
            if reply.has_error():
                continue
            if "node" in reply.content.config_records:  # discovery: who is who
                pid = int(reply.content.config_records["node"]["partition-id"])
                self.partition_of[reply.metadata.src_node_id] = pid
            rnd = int(reply.metadata.group_id) if reply.metadata.group_id else 0
            for node, content in _sections(reply, self.partition_of):
                for key, record in content.array_records.items():
                    if key == "out" and len(record):  # one message for every receiver
                        self.replies.append({"round": rnd, "node": node, "to": None,
                                             "out": record_hash(record),
                                             "activation": activation_of.get(node)})  # fmt: skip
                    elif key.startswith(OUTBOX_PREFIX):  # a message for one receiver
                        self.replies.append({"round": rnd, "node": node,
                                             "to": int(key[len(OUTBOX_PREFIX):]),
                                             "out": record_hash(record)})  # fmt: skip
        for node, content, kind in sent:
            if kind not in (MessageType.TRAIN, MessageType.EVALUATE):
                continue
            inbox = {
                key[len(INBOX_PREFIX) :]: record_hash(rec)
                for key, rec in content.array_records.items()
                if key.startswith(INBOX_PREFIX)
            }
            config = content.config_records["config"]
            self.sent.append({
                "round": int(config["round"]),
                "activation": int(config["activation"]) if "activation" in config else None,
                "node": node,
                "kind": kind,
                "inbox": inbox,
                "keys": sorted(content.keys()),
            })  # fmt: skip
        return replies


def _sections(msg, partition_of: dict[int, int] | None) -> list:
    """(graph node, content) of each node a message is for or from (several when hosted)."""
    if msg.has_error():
        return []
    if HOSTED in msg.content.config_records:
        return list(unpack_sections(msg.content).items())
    if partition_of is None:
        return [(None, msg.content)]
    ids = (msg.metadata.dst_node_id, msg.metadata.src_node_id)
    node = next((partition_of[i] for i in ids if i in partition_of), None)
    return [(node, msg.content)]


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The project's relay, watched."""
    cfg = ExperimentConfig.from_run_config(dict(context.run_config))
    watched = RecordingGrid(grid)
    out = run_experiment(watched, cfg)  # type: ignore[arg-type]
    log = {"sent": watched.sent, "replies": watched.replies, "hosted": watched.hosted}
    Path(out, "relay_log.json").write_text(json.dumps(log))


__all__ = ["app"]
