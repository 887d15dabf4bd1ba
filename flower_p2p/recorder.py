"""metrics.jsonl and network.jsonl of a run: what the relay records, as it completes."""

from __future__ import annotations

from pathlib import Path

from flower_p2p.results import write_jsonl


class Recorder:
    """metrics.jsonl (per round and node) and network.jsonl (per round), rewritten as they grow.

    A network record of round r is complete once the models after round r were evaluated (in
    round r + 1's exchange): only then is it written, with their consensus distance.
    """

    def __init__(self, out: Path | None) -> None:
        self.out = out
        self.records: dict[tuple[int, int], dict] = {}
        self.network: list[dict] = []
        self.pending: dict | None = None

    def update(self, rnd: int, node: int, **values: float | None) -> None:
        """Merge values into the record of (round, node)."""
        rec = self.records.setdefault(
            (rnd, node),
            {"round": rnd, "node": node, "accuracy": None, "unseen_accuracy": None,
             "domain_accuracy": None, "loss": None,
             "train_loss": None, "bytes_sent": 0, "bytes_received": 0, "network_bytes": 0},
        )  # fmt: skip
        rec.update(values)

    def close_round(self, record: dict) -> None:
        """Round ``record['round']`` is over; its record waits for the next evaluation."""
        self.complete_pending(None)
        self.pending = record

    def complete_pending(self, by_group: dict[str, float] | None) -> None:
        """Write the waiting round record, with the consensus of its evaluated models if any."""
        if self.pending is None:
            return
        self.pending["consensus_distance"] = sum(by_group.values()) if by_group else None
        self.pending["consensus_by_group"] = by_group or None
        self.network.append(self.pending)
        self.pending = None

    def flush(self) -> None:
        """Rewrite metrics.jsonl and network.jsonl with everything recorded so far.

        Without a results folder (a strategy used by another app) nothing is written.
        """
        if self.out is None:
            return
        ordered = [self.records[k] for k in sorted(self.records)]
        write_jsonl(self.out / "metrics.jsonl", ordered)
        write_jsonl(self.out / "network.jsonl", self.network)

    def round_accuracies(self, rnd: int, key: str = "accuracy") -> list[float]:
        """Accuracies (or another metric ``key``) recorded for round ``rnd``."""
        return [r[key] for (t, _), r in self.records.items() if t == rnd and r[key] is not None]
