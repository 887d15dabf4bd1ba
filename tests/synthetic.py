"""Saved run folders written directly (no training): the files the relay writes, in its format."""

from pathlib import Path

from flower_p2p.config import ExperimentConfig
from flower_p2p.results import write_json, write_jsonl

GROUPS = ("attn", "mlp", "norm", "head")


def write_run(
    folder: Path,
    cfg: ExperimentConfig,
    accs: list[list[float]],
    mb_per_round: float = 2.0,
    unseen: list[list[float]] | None = None,
    finished: bool = True,
    heterogeneity: bool = False,
) -> Path:
    """A run folder whose node ``n`` has accuracy ``accs[round][n]`` (round 0 = initial model)."""
    folder = Path(folder)
    cfg = cfg.replace(out_dir=str(folder), overwrite=True)
    write_json(folder / "config.json", {"config": cfg.to_run_config(), "seed": cfg.seed})
    sends = cfg.strategy not in ("local", "centralized")
    metrics = []
    for t, row in enumerate(accs):
        for n, acc in enumerate(row):
            sent = int(t * mb_per_round * 1e6) if sends else 0
            m = {"round": t, "node": n, "accuracy": acc, "loss": 1.0, "train_loss": 1.0,
                 "bytes_sent": sent, "bytes_received": sent, "network_bytes": sent}  # fmt: skip
            if unseen is not None:
                m["unseen_accuracy"] = unseen[t][n]
            metrics.append(m)
    write_jsonl(folder / "metrics.jsonl", metrics)
    rounds = range(1, len(accs))
    write_jsonl(
        folder / "network.jsonl",
        [{"round": t, "consensus_distance": sum(0.5**t / (i + 1) for i in range(len(GROUPS))),
          "consensus_by_group": {g: 0.5**t / (i + 1) for i, g in enumerate(GROUPS)},
          "wall_s": float(t)} for t in rounds] if sends else
        [{"round": t, "consensus_distance": None, "wall_s": float(t)} for t in rounds],
    )  # fmt: skip
    if finished:
        final = accs[-1]
        summary = {
            "strategy": cfg.strategy,
            "accuracy_mean": sum(final) / len(final),
            "accuracy_min": min(final),
            "accuracy_max": max(final),
            "mean_bytes_sent_per_node": (len(accs) - 1) * mb_per_round * 1e6 if sends else 0.0,
            "network_bytes_per_node": (len(accs) - 1) * mb_per_round * 1e6 if sends else 0.0,
            "wall_s": 1.0,
        }
        if unseen is not None:
            summary["unseen_accuracy_mean"] = sum(unseen[-1]) / len(unseen[-1])
            summary["unseen_accuracy_min"] = min(unseen[-1])
        if heterogeneity:  # what the relay adds (it rebuilds the partitions: a data load)
            from flower_p2p.data import data_summary

            summary.update(data_summary(cfg))
        write_json(folder / "summary.json", summary)
    return folder
