"""`python -m sim table`: rows from saved runs, and the accuracy-vs-MB plot."""

import pytest

from flower_p2p.config import ExperimentConfig
from flower_p2p.results import write_json, write_jsonl
from sim.cli import main
from sim.plots import node_curve, seed_band
from sim.runs import Run
from sim.table import write_table


def _fake_run(folder, strategy, finetune, accs, mb_per_round):
    cfg = ExperimentConfig(strategy=strategy, finetune=finetune, num_nodes=2).to_run_config()
    write_json(folder / "config.json", {"config": cfg, "seed": 0, "versions": {}})
    metrics = [
        {"round": t, "node": n, "accuracy": accs[t][n], "loss": 1.0, "train_loss": 1.0,
         "bytes_sent": int(t * mb_per_round * 1e6), "wall_s": float(t)}
        for t in range(len(accs)) for n in range(2)
    ]  # fmt: skip
    write_jsonl(folder / "metrics.jsonl", metrics)
    final = accs[-1]
    write_json(folder / "summary.json", {
        "accuracy_mean": sum(final) / 2, "accuracy_min": min(final), "wall_s": 12.0,
        "mean_bytes_sent_per_node": (len(accs) - 1) * mb_per_round * 1e6,
    })  # fmt: skip


def test_table_and_plot_from_saved_runs(tmp_path, capsys):
    _fake_run(tmp_path / "a", "dsgd", "full", [[0.1, 0.1], [0.5, 0.7], [0.8, 0.9]], 4.0)
    _fake_run(tmp_path / "b", "choco", "lora", [[0.1, 0.1], [0.3, 0.5]], 0.5)
    md = write_table(tmp_path, ("strategy", "finetune"))
    lines = md.strip().splitlines()
    assert lines[2] == "| choco | lora | 40.00 | 30.00 | 0.5 | 12 |"
    assert lines[3] == "| dsgd | full | 85.00 | 80.00 | 8.0 | 12 |"
    assert (tmp_path / "table.csv").read_text().count("\n") == 3
    assert main(["table", str(tmp_path)]) == 0
    assert (tmp_path / "accuracy_vs_mb.png").stat().st_size > 0
    assert "dsgd | full" in capsys.readouterr().out


def test_accuracy_vs_mb_pairs_each_round_with_bytes_so_far():
    metrics = [{"round": t, "node": n, "accuracy": 0.1 * (t + n), "bytes_sent": t * 2_000_000}
               for t in range(3) for n in range(2)]  # fmt: skip
    band = seed_band([node_curve(Run(dir=None, config={}, metrics=metrics))])
    assert list(band.mb) == [0.0, 2.0, 4.0]
    assert [round(a, 6) for a in band.mean] == [5.0, 15.0, 25.0]


def test_runs_recorded_before_network_bytes_are_read_as_they_were_or_refused(tmp_path):
    # Older runs counted only what nodes sent: right for peer-to-peer strategies (no server),
    # half the real cost for fedavg (its server's broadcast was not counted): refused.
    _fake_run(tmp_path / "a", "dsgd", "full", [[0.1, 0.1], [0.5, 0.7]], 4.0)
    assert "| dsgd | full | 60.00 | 50.00 | 4.0 | 12 |" in write_table(
        tmp_path, ("strategy", "finetune")
    )
    _fake_run(tmp_path / "b", "fedavg", "full", [[0.1, 0.1], [0.5, 0.7]], 4.0)
    with pytest.raises(ValueError, match="half the real cost"):
        write_table(tmp_path, ("strategy", "finetune"))
    run = Run(
        dir=tmp_path / "b",
        config={"strategy": "fedavg"},
        metrics=[{"round": 0, "node": 0, "accuracy": 0.1, "bytes_sent": 0}],
    )
    with pytest.raises(ValueError, match="run it again"):
        node_curve(run)
