"""metrics.jsonl and network.jsonl of a run: each record appended once, when it is final.

A round's records are final one exchange later: the models after round r are evaluated, and the
messages of round r are delivered (their bytes received), in round r + 1's exchange. So the
relay keeps only the open rounds in memory and appends a round's lines when it closes: writing
costs the same every round however long the run, and memory does not grow with the rounds.
The network record of round r likewise waits for the consensus distance of the models evaluated
after round r.

A line is a record only with its newline: a run killed in the middle of an append leaves at most
a torn last line, which ``results.read_jsonl`` ignores. A resumed run first cuts both files
back to the rounds its checkpoint had closed (a killed run may have appended more after its
last checkpoint), then appends as before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flower_p2p.results import atomic_write_text, read_jsonl

METRICS, NETWORK = "metrics.jsonl", "network.jsonl"


class Recorder:
    """The open rounds' records, appended to the results folder as rounds close."""

    def __init__(self, out: Path | None) -> None:
        self.out = out
        self.records: dict[tuple[int, int], dict] = {}  # open rounds only
        self.closed: dict[int, dict] = {}  # the last closed round's records, by node
        self.pending: dict | None = None  # the network record waiting for its evaluation
        self.closed_round = -1

    def update(self, rnd: int, node: int, **values: float | None) -> None:
        """Merge values into the record of (round, node), a round still open."""
        if rnd <= self.closed_round:
            raise ValueError(f"round {rnd} was closed and written; its records are final")
        rec = self.records.setdefault(
            (rnd, node),
            {"round": rnd, "node": node, "sim_time": None, "accuracy": None,
             "unseen_accuracy": None, "domain_accuracy": None, "loss": None,
             "train_loss": None, "bytes_sent": 0, "bytes_received": 0, "network_bytes": 0},
        )  # fmt: skip
        rec.update(values)

    def close_through(self, rnd: int) -> None:
        """Rounds up to ``rnd`` are final: append their records (round, then node order)."""
        done = sorted(k for k in self.records if k[0] <= rnd)
        if not done:
            return
        self._append(METRICS, [self.records[k] for k in done])
        last = done[-1][0]
        self.closed = {k[1]: self.records[k] for k in done if k[0] == last}
        for k in done:
            del self.records[k]
        self.closed_round = last

    def close_round(self, record: dict) -> None:
        """Round ``record['round']`` is over; its network record waits for the next evaluation."""
        self.complete_pending(None)
        self.pending = record

    def complete_pending(self, by_group: dict[str, float] | None) -> None:
        """Append the waiting network record, with the consensus of its evaluated models."""
        if self.pending is None:
            return
        self.pending["consensus_distance"] = sum(by_group.values()) if by_group else None
        self.pending["consensus_by_group"] = by_group or None
        self._append(NETWORK, [self.pending])
        self.pending = None

    def round_accuracies(self, rnd: int, key: str = "accuracy") -> list[float]:
        """Accuracies (or another metric ``key``) of round ``rnd``: open, or the last closed."""
        if rnd == self.closed_round:
            records = list(self.closed.values())
        else:
            records = [r for (t, _), r in self.records.items() if t == rnd]
        return [r[key] for r in records if r[key] is not None]

    def state(self) -> dict:
        """What a checkpoint keeps: the open rounds and the waiting network record."""
        return {"records": [self.records[k] for k in sorted(self.records)],
                "closed_round": self.closed_round, "pending": self.pending}  # fmt: skip

    def restore(self, state: dict) -> None:
        """Continue from ``state``: both files cut back to the rounds it had closed."""
        self.records = {(r["round"], r["node"]): r for r in state["records"]}
        self.pending = state["pending"]
        self.closed_round = int(state["closed_round"])
        if self.out is None:
            return
        for name in (METRICS, NETWORK):
            path = self.out / name
            kept = [r for r in read_jsonl(path) if r["round"] <= self.closed_round] if (
                path.exists()) else []  # fmt: skip
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
            if name == METRICS:
                self.closed = {r["node"]: r for r in kept if r["round"] == self.closed_round}

    def _append(self, name: str, records: list[dict]) -> None:
        if self.out is None:
            return
        with open(self.out / name, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
