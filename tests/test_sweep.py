"""Sweeps: grid expansion, validation before any run, skipping finished runs, re-doing interrupted
ones, and the mean +- std table. Most tests use a fake runner that writes a run folder the way
the relay does; one tiny sweep goes through Flower's simulation engine."""

import json
from pathlib import Path

import pytest
from synthetic import write_run

from flower_p2p.registry import ConfigError
from flower_p2p.results import read_jsonl
from sim.cli import main
from sim.sweep import mean_std, run_sweep

TINY = """
[base]
num-nodes = 2
num-rounds = 2
depth = 1
img-size = 16
topology = "complete"
"""


def accuracy_of(cfg):
    """Deterministic fake final accuracy: depends on alpha and seed."""
    return 0.5 + 0.2 * min(cfg.alpha, 1.0) + 0.02 * cfg.seed


class FakeRunner:
    """Writes what a finished run writes; records which runs it was asked for."""

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def __call__(self, cfg):
        out = Path(cfg.out_dir)
        self.calls.append(out.name)
        acc = accuracy_of(cfg)
        interrupted = out.name == self.fail_on
        write_run(out, cfg, [[0.1, 0.1], [acc - 0.1, acc], [acc - 0.05, acc + 0.05]], 1.5,
                  finished=not interrupted)  # fmt: skip
        if interrupted:
            raise KeyboardInterrupt("killed mid-run")
        return out


def sweep_file(tmp_path, grid, base=TINY):
    path = tmp_path / "s.toml"
    path.write_text(base + "[grid]\n" + grid)
    return path


def test_runs_every_point_and_seed_then_skips_finished(tmp_path):
    path = sweep_file(tmp_path, "alpha = [0.1, 1.0]\nseeds = [0, 1]\n")
    runner = FakeRunner()
    out = run_sweep(path, plot=False, runner=runner)
    assert out == tmp_path / "s"  # next to the sweep file
    assert runner.calls == ["alpha=0.1,seed=0", "alpha=0.1,seed=1", "alpha=1.0,seed=0",
                            "alpha=1.0,seed=1"]  # fmt: skip
    saved = json.loads((out / "alpha=1.0,seed=1" / "config.json").read_text())["config"]
    assert saved["alpha"] == 1.0 and saved["seed"] == 1 and saved["num-rounds"] == 2
    described = json.loads((out / "sweep.json").read_text())
    assert described["grid"] == {"alpha": [0.1, 1.0]} and described["seeds"] == [0, 1]
    assert [r["dir"] for r in described["runs"]] == runner.calls
    again = FakeRunner()
    run_sweep(path, plot=False, runner=again)
    assert again.calls == []


def test_interrupted_run_is_redone_and_finished_ones_kept(tmp_path):
    path = sweep_file(tmp_path, "alpha = [0.1, 1.0]\nseeds = [0]\n")
    with pytest.raises(KeyboardInterrupt):
        run_sweep(path, plot=False, runner=FakeRunner(fail_on="alpha=1.0,seed=0"))
    out = tmp_path / "s"
    kept = (out / "alpha=0.1,seed=0" / "summary.json").read_text()
    assert not (out / "alpha=1.0,seed=0" / "summary.json").exists()
    assert (out / "alpha=1.0,seed=0" / "metrics.jsonl").exists()  # half a run is there
    resumed = FakeRunner()
    run_sweep(path, plot=False, runner=resumed)
    assert resumed.calls == ["alpha=1.0,seed=0"]
    assert (out / "alpha=0.1,seed=0" / "summary.json").read_text() == kept


def test_table_has_mean_and_std_over_seeds(tmp_path):
    path = sweep_file(tmp_path, "alpha = [0.1, 1.0]\nseeds = [0, 1, 2]\n")
    out = run_sweep(path, plot=False, runner=FakeRunner())
    lines = (out / "sweep.md").read_text().strip().splitlines()
    assert lines[0] == (
        "| alpha | seeds | mean acc (%) | worst node (%) | MB on the network per node |"
    )
    # alpha=0.1: final node accuracies acc -+ 0.05, acc = 0.52 + 0.02 * seed -> mean 52, 54, 56
    assert lines[2] == "| 0.1 | 3/3 | 54.00 ± 2.00 | 49.00 ± 2.00 | 3.0 ± 0.0 |"
    assert lines[3] == "| 1.0 | 3/3 | 72.00 ± 2.00 | 67.00 ± 2.00 | 3.0 ± 0.0 |"
    csv = (out / "sweep.csv").read_text().splitlines()
    assert csv[1] == "0.1,3/3,54.00 ± 2.00,49.00 ± 2.00,3.0 ± 0.0"


PLACED = """
[base]
num-nodes = 8
num-rounds = 2
depth = 1
img-size = 16
alpha = 0.1
"""


def test_table_carries_edge_heterogeneity_and_the_plot_accuracy_against_it(tmp_path):
    from sim.plots import plot_collection

    class Placed(FakeRunner):
        def __call__(self, cfg):
            out = Path(cfg.out_dir)
            acc = {"clustered": 0.5, "random": 0.6, "spread": 0.7}.get(cfg.placement, 0.9)
            return write_run(out, cfg, [[0.1] * 8, [acc] * 8], heterogeneity=True)

    path = sweep_file(tmp_path, 'placement = ["random", "clustered", "spread"]\n'
                      "reference = true\n", base=PLACED)  # fmt: skip
    out = run_sweep(path, plot=False, runner=Placed())
    lines = (out / "sweep.md").read_text().strip().splitlines()
    assert lines[0].endswith("| edge TV | edge / all-pairs TV | MB on the network per node |")
    tv = {row.split("|")[1].strip(): float(row.split("|")[-4]) for row in lines[2:]}
    assert tv["clustered"] < tv["random"] < tv["spread"]
    assert len(list((out / "reference").iterdir())) == 1  # placement: one reference serves all
    paths = plot_collection(out, per_run=False)
    assert out / "plots" / "accuracy-vs-edge-tv.png" in paths


def test_a_finished_run_from_before_a_key_existed_counts_as_that_keys_default(tmp_path):
    path = sweep_file(tmp_path, "alpha = [0.1]\n")
    out = run_sweep(path, plot=False, runner=FakeRunner())
    config = out / "alpha=0.1,seed=0" / "config.json"
    saved = json.loads(config.read_text())
    del saved["config"]["placement"], saved["config"]["feature-skew"]  # an older run's config
    config.write_text(json.dumps(saved))
    again = FakeRunner()
    run_sweep(path, plot=False, runner=again)
    assert again.calls == []  # kept: it ran with placement=random, feature-skew=none


def test_mean_std():
    assert mean_std([0.90, 0.92, 0.94]) == "92.00 ± 2.00"
    assert mean_std([0.9]) == "90.00"
    assert mean_std([]) == "-"


def test_reference_runs_once_per_seed_and_data_setting(tmp_path):
    path = sweep_file(
        tmp_path, 'alpha = [0.1, 1.0]\ntopology = ["complete", "ring"]\nseeds = [0, 1]\n'
        "reference = true\n", base=TINY.replace("num-nodes = 2", "num-nodes = 3"),
    )  # fmt: skip
    runner = FakeRunner()
    out = run_sweep(path, plot=False, runner=runner)
    refs = [c for c in runner.calls if (out / "reference" / c).is_dir()]
    # topology changes nothing for one centralized model: one reference per (alpha, seed), first
    assert runner.calls[:4] == refs == ["alpha=0.1,seed=0", "alpha=0.1,seed=1",
                                        "alpha=1.0,seed=0", "alpha=1.0,seed=1"]  # fmt: skip
    assert len(runner.calls) == 4 + 8
    ref_cfg = json.loads((out / "reference/alpha=1.0,seed=1/config.json").read_text())["config"]
    assert ref_cfg["strategy"] == "centralized" and ref_cfg["alpha"] == 1.0
    lines = (out / "sweep.md").read_text().strip().splitlines()
    assert "centralized (%)" in lines[0]
    # the reference's fake accuracy is that of its alpha and seeds: 72 +- 1.41
    assert lines[4].startswith(
        "| 1.0 | complete | 2/2 | 71.00 ± 1.41 | 66.00 ± 1.41 | 71.00 ± 1.41"
    )


def test_unseen_accuracy_column_when_runs_report_it(tmp_path):
    path = sweep_file(tmp_path, "alpha = [0.5]\nseeds = [0, 1]\n")

    def runner(cfg):
        out = Path(cfg.out_dir)
        accs = [[0.1, 0.1], [0.8, 0.9]]
        unseen = [[0.0, 0.0], [0.2 + 0.1 * cfg.seed, 0.2 + 0.1 * cfg.seed]]
        return write_run(out, cfg, accs, unseen=unseen)

    out = run_sweep(path, plot=False, runner=runner)
    lines = (out / "sweep.md").read_text().strip().splitlines()
    assert "unseen acc (%)" in lines[0]
    assert "| 25.00 ± 7.07 |" in lines[2]


@pytest.mark.parametrize(
    "grid, key, value",
    [
        ("alpha = [0.5, 0.0]\n", "alpha", 0.0),
        ('topology = ["ring", "moebius"]\n', "topology", "moebius"),
        ("lr = 0.1\n", "grid.lr", 0.1),  # not a list
        ("colour = [1]\n", "grid.colour", [1]),
        ("seed = [1, 2]\n", "grid.seed", [1, 2]),
        ("seeds = [-1]\n", "grid.seeds", [-1]),
        ("classes-per-node = [2, 11]\npartitioner = ['pathological']\n", "classes-per-node", 11),
    ],
)
def test_bad_grid_fails_before_any_run(tmp_path, grid, key, value):
    path = sweep_file(tmp_path, grid)
    runner = FakeRunner()
    with pytest.raises(ConfigError) as err:
        run_sweep(path, plot=False, runner=runner)
    assert err.value.key == key and err.value.value == value
    assert runner.calls == [] and not (tmp_path / "s").exists()


def test_changed_base_does_not_reuse_finished_runs(tmp_path):
    path = sweep_file(tmp_path, "alpha = [0.5]\n")
    run_sweep(path, plot=False, runner=FakeRunner())
    path.write_text(TINY.replace("num-rounds = 2", "num-rounds = 3") + "[grid]\nalpha = [0.5]\n")
    runner = FakeRunner()
    with pytest.raises(ConfigError, match="num-rounds"):
        run_sweep(path, plot=False, runner=runner)
    assert runner.calls == []


def test_refuses_a_folder_that_is_not_a_sweep(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="sweep folder"):
        run_sweep(sweep_file(tmp_path, "alpha = [0.5]\n"), plot=False, runner=FakeRunner())
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"


def test_real_sweep_through_flower_then_resumes_without_running(tmp_path, capsys):
    """2 nodes, 1 round, depth-1 ViT: a real run, then a second call that skips it.

    (Several seeds and their mean and std are the fake runner's tests above: one real run is
    enough to show that the sweep drives Flower and reads back what a run writes.)
    """
    base = TINY.replace("num-rounds = 2", "num-rounds = 1\neval-every = 1")
    path = sweep_file(tmp_path, "seeds = [0]\n", base=base)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    for seed in (0,):
        run = out / f"seed={seed}"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["num_nodes"] == 2 and summary["accuracy_mean"] > 0
        assert sorted(p.name for p in (run / "final").iterdir()) == [
            "node-0.safetensors", "node-1.safetensors"]  # fmt: skip
        network = read_jsonl(run / "network.jsonl")[0]
        assert set(network["consensus_by_group"]) >= {"attn", "mlp", "norm", "head"}
        # two nodes on one edge average to the same model: their evaluated models agree exactly,
        # so there is no consensus curve to draw on a log axis
        assert network["consensus_distance"] == 0.0
        assert not (run / "consensus.png").exists()
        for name in ("convergence", "topology", "labels", "attention"):
            assert (run / f"{name}.png").stat().st_size > 0, name
    assert "| 1/1 |" in (out / "sweep.md").read_text()  # (seed bands need 2 seeds: none drawn)
    capsys.readouterr()
    before = (out / "seed=0" / "summary.json").read_text()
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished, skipped") == 1 and "running" not in printed
    assert (out / "seed=0" / "summary.json").read_text() == before


def test_accuracy_against_edge_tv_draws_each_colours_own_reference(tmp_path):
    # the defect this guards: one dashed line at the mean of every reference, so that each
    # point was compared with a reference trained on other data
    from sim.plots import heterogeneity_figure
    from sim.runs import collect_runs, varying_keys

    class TwoData(FakeRunner):
        def __call__(self, cfg):
            if cfg.strategy == "centralized":
                acc = 0.8 if cfg.alpha == 0.1 else 0.4
            else:
                acc = {"clustered": 0.5, "random": 0.6, "spread": 0.7}[cfg.placement]
            return write_run(Path(cfg.out_dir), cfg, [[0.1] * 8, [acc] * 8],
                             heterogeneity=True)  # fmt: skip

    path = sweep_file(tmp_path, 'placement = ["random", "spread"]\nalpha = [0.1, 1.0]\n'
                      "seeds = [0, 1]\nreference = true\n", base=PLACED)  # fmt: skip
    out = run_sweep(path, plot=False, runner=TwoData())
    runs = collect_runs(out)
    compared = [r for r in runs if not r.is_reference]
    fig = heterogeneity_figure(compared, varying_keys(compared),
                               [r for r in runs if r.is_reference])  # fmt: skip
    ax = fig.axes[0]
    flat = [line.get_ydata() for line in ax.lines if len(line.get_ydata()) == 2]
    levels = sorted({round(float(y[0]), 6) for y in flat if y[0] == y[1]})
    assert levels == [40.0, 80.0]
    # one marker per config (mean over its 2 seeds), not one per run
    assert len(ax.containers) == 4
