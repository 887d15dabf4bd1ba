"""Every plot from saved files: what each figure holds (lines, panels, cells), and that `sim plot`
regenerates every file of a run, compare and sweep folder. Runs are written directly (no
training); node models are freshly built ones saved the way nodes save them."""

import numpy as np
import pytest
from synthetic import GROUPS, write_run

from flower_p2p.config import ExperimentConfig
from flower_p2p.data import data_summary, label_histogram, load_data
from flower_p2p.models import apply_finetune, create_model, get_params
from flower_p2p.results import FINAL_DIR, node_params_path, write_json, write_params
from sim.cli import main
from sim.plots import (
    comparison_figure,
    consensus_figure,
    convergence_figure,
    label_figure,
    plot_folder,
    topology_figure,
)
from sim.runs import load_run

SMALL = dict(num_nodes=3, num_rounds=2, depth=1, img_size=16, eval_every=1)
ACCS = [[0.1, 0.1, 0.1], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]]


def cfg(**kw):
    return ExperimentConfig(**{**SMALL, **kw})


def save_final_models(run_dir, config, nodes):
    """What nodes write at the final evaluate: their trainable parameters."""
    c = ExperimentConfig.from_run_config(config)
    model, trainable = apply_finetune(create_model(c, 10), c)
    for n in range(nodes):
        write_params(node_params_path(run_dir / FINAL_DIR, n), get_params(model, trainable))


def is_png(path):
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_convergence_one_seed_has_a_line_per_node_and_the_mean(tmp_path):
    run = load_run(write_run(tmp_path / "r", cfg(), ACCS))
    fig = convergence_figure([run])
    by_round, by_mb = fig.axes
    assert len(by_round.lines) == 3 + 1 and len(by_mb.lines) == 3 + 1
    mean = by_round.lines[-1]
    assert list(mean.get_xdata()) == [0, 1, 2]
    assert np.allclose(mean.get_ydata(), [10, 50, 80])
    # MB panel: cumulative MB per node, 2 MB a round
    assert np.allclose(by_mb.lines[-1].get_xdata(), [0, 2, 4])
    assert len(by_round.collections) == 1  # the min-max band


def test_convergence_over_seeds_with_reference_and_unseen(tmp_path):
    runs = []
    for s in (0, 1):
        accs = [[a + 0.1 * s for a in row] for row in ACCS]
        unseen = [[0.0] * 3, [0.1] * 3, [0.2 + 0.1 * s] * 3]
        runs.append(load_run(write_run(tmp_path / f"s{s}", cfg(seed=s), accs, unseen=unseen)))
    ref = load_run(write_run(tmp_path / "c", cfg(strategy="centralized", num_nodes=1),
                             [[0.1], [0.6], [0.95]]))  # fmt: skip
    fig = convergence_figure(runs, [ref])
    by_round, by_mb = fig.axes
    # 2 seeds x 3 nodes thin, the mean, unseen-class accuracy, the centralized reference
    assert len(by_round.lines) == 6 + 1 + 1 + 1 and len(by_mb.lines) == 6 + 1 + 1 + 1
    mean, unseen, reference = by_round.lines[6:]
    assert np.allclose(mean.get_ydata(), [15, 55, 85])
    assert np.allclose(unseen.get_ydata(), [0, 10, 25])
    assert np.allclose(reference.get_ydata(), [10, 60, 95])
    assert np.allclose(by_mb.lines[-1].get_ydata(), [95, 95])  # final value as a level
    assert "std over 2 seeds" in fig._suptitle.get_text()
    # the +-std band of the accuracy: seeds differ by 10 points -> std 7.07
    band = by_round.collections[0].get_paths()[0].vertices[:, 1]
    assert np.isclose(band.max(), 85 + 10 / np.sqrt(2))


def test_comparison_has_a_curve_per_value_and_a_panel_per_other_value(tmp_path):
    runs = []
    for alpha in (0.1, 1.0):
        for topo in ("ring", "complete"):
            for seed in (0, 1):
                acc = [[0.1] * 3, [0.3 + alpha / 4] * 3, [0.5 + alpha / 4] * 3]
                d = tmp_path / f"{alpha}-{topo}-{seed}"
                runs.append(load_run(write_run(d, cfg(alpha=alpha, topology=topo, seed=seed), acc)))
    refs = [load_run(write_run(tmp_path / f"c{a}-{s}", cfg(strategy="centralized", alpha=a, seed=s),
                               [[0.1] * 3, [0.5] * 3, [0.9 + a / 20] * 3]))
            for a in (0.1, 1.0) for s in (0, 1)]  # fmt: skip
    fig = comparison_figure(runs, "alpha", ("topology",), references=refs)
    assert len(fig.axes) == 2 * 2  # (round, MB) x (ring, complete)
    ax = fig.axes[0]
    assert ax.get_title() == "topology=ring"
    curves = [ln for ln in ax.lines if len(ln.get_xdata()) == 3]
    assert np.allclose([ln.get_ydata() for ln in curves], [[10, 32.5, 52.5], [10, 55, 75]])
    # the references differ per alpha: one dotted level per curve, in its colour
    levels = [ln for ln in ax.lines if ln not in curves]
    assert sorted(round(ln.get_ydata()[0], 1) for ln in levels) == [90.5, 95.0]
    assert [ln.get_color() for ln in levels] == [ln.get_color() for ln in curves]
    assert sorted(t.get_text() for t in ax.texts) == [
        "0.1: 52.5%", "1.0: 75.0%", "centralized (0.1) 90.5%", "centralized (1.0) 95.0%",
    ]  # fmt: skip
    assert "alpha=" not in fig._suptitle.get_text() and "ring" not in fig._suptitle.get_text()
    assert fig.axes[2].get_xscale() == "log"  # MB row (axes are row by row)


def test_comparison_shares_one_reference_line_when_the_curves_share_it(tmp_path):
    runs = [load_run(write_run(tmp_path / t, cfg(topology=t), ACCS)) for t in ("ring", "complete")]
    ref = load_run(write_run(tmp_path / "c", cfg(strategy="centralized"), ACCS))
    fig = comparison_figure(runs, "topology", references=[ref])
    ax = fig.axes[0]
    assert len(ax.lines) == 2 + 1
    assert ax.lines[-1].get_color() == "black" and "centralized 80.0%" in [
        t.get_text() for t in ax.texts]  # fmt: skip


def test_consensus_global_and_per_group(tmp_path):
    run = load_run(write_run(tmp_path / "r", cfg(), ACCS))
    fig = consensus_figure(run)
    total, groups = fig.axes
    assert len(total.lines) == 1 and len(groups.lines) == len(GROUPS)
    assert groups.get_yscale() == "log"
    sums = np.sum([ln.get_ydata() for ln in groups.lines], axis=0)
    assert np.allclose(sums, total.lines[0].get_ydata())
    assert sorted(t.get_text() for t in groups.texts) == sorted(GROUPS)
    local = load_run(write_run(tmp_path / "l", cfg(strategy="local"), ACCS))
    assert consensus_figure(local) is None  # nothing relayed, nothing measured


def test_label_distribution_is_the_partitions_counts(tmp_path):
    c = cfg(alpha=0.3)
    fig = label_figure(load_run(write_run(tmp_path / "r", c, ACCS)))
    cells = fig.axes[0].collections[0].get_array().reshape(3, 10)  # nodes x classes
    bundle = load_data(c)
    expected = np.stack([label_histogram(p, bundle) for p in bundle.partitions])
    assert np.array_equal(cells, expected)
    assert len(fig.axes[0].texts) == 3 * 10  # every count written in its cell
    side = fig.axes[1]  # heterogeneity next to the heatmap: sizes, entropies, edge TV
    assert [b.get_width() for b in side.patches] == [len(p) for p in bundle.partitions]
    assert all(t.get_text().startswith(" H=") for t in side.texts)
    het = data_summary(c)["heterogeneity"]
    assert f"edges {het['edge_tv']:.2f}" in side.get_title()
    central = write_run(tmp_path / "c", cfg(strategy="centralized"), ACCS)
    assert label_figure(load_run(central)) is None


def test_topology_coloured_by_final_accuracy(tmp_path):
    fig = topology_figure(load_run(write_run(tmp_path / "r", cfg(topology="ring"), ACCS)))
    nodes = fig.axes[0].collections[0]
    assert np.allclose(nodes.get_array(), [70, 80, 90])


def test_plot_regenerates_every_file_of_a_run(tmp_path, capsys):
    run_dir = write_run(tmp_path / "r", cfg(), ACCS)
    save_final_models(run_dir, load_run(run_dir).config, 3)
    assert main(["plot", str(run_dir)]) == 0
    names = ("convergence", "topology", "consensus", "labels", "attention")
    printed = capsys.readouterr().out.split()
    assert printed == [str(run_dir / f"{n}.png") for n in names]
    assert all(is_png(run_dir / f"{n}.png") for n in names)


def test_plot_of_a_sweep_folder(tmp_path):
    """Two alphas x two seeds and their references: every run's plots, the table, each
    configuration's convergence over seeds and the comparison over alpha."""
    runs = []
    for alpha in (0.1, 1.0):
        for seed in (0, 1):
            name = f"alpha={alpha},seed={seed}"
            acc = [[0.1] * 3, [0.3 + alpha / 4 + seed / 10] * 3, [0.5 + alpha / 4] * 3]
            write_run(tmp_path / name, cfg(alpha=alpha, seed=seed), acc)
            ref = f"reference/{name}"
            write_run(tmp_path / ref, cfg(alpha=alpha, seed=seed, strategy="centralized"), ACCS)
            for d in (name, ref):
                runs.append({"dir": d, "values": {"alpha": alpha}, "seed": seed,
                             "reference": d == ref})  # fmt: skip
    write_json(tmp_path / "sweep.json", {"grid": {"alpha": [0.1, 1.0]}, "seeds": [0, 1],
                                         "reference": True, "runs": runs})  # fmt: skip
    paths = plot_folder(tmp_path)
    expected = {tmp_path / "plots" / n for n in (
        "convergence-alpha=0.1.png", "convergence-alpha=1.0.png", "compare-alpha.png")}  # fmt: skip
    assert expected <= set(paths)
    assert all(is_png(p) for p in paths if p.suffix == ".png")
    per_run = [p for p in paths if p.parent.parent == tmp_path and p.parent.name != "plots"]
    assert len(per_run) == 4 * 4  # convergence, topology, consensus, labels (no saved models)
    references = [p for p in paths if p.parent.parent.name == "reference"]
    assert sorted({p.name for p in references}) == ["convergence.png"]  # one model, no graph
    assert (tmp_path / "sweep.md").read_text().count("\n") == 2 + 2


def test_plot_refuses_a_folder_without_runs(tmp_path):
    assert main(["plot", str(tmp_path)]) == 2


@pytest.mark.parametrize("with_reference", [False, True])
def test_attention_figure_has_a_column_per_node_and_the_reference(tmp_path, with_reference):
    from sim.attention import attention_figure

    run_dir = write_run(tmp_path / "r", cfg(), ACCS)
    save_final_models(run_dir, load_run(run_dir).config, 3)
    ref = None
    if with_reference:
        ref_dir = write_run(tmp_path / "c", cfg(strategy="centralized", num_nodes=3), ACCS)
        save_final_models(ref_dir, load_run(ref_dir).config, 1)
        ref = load_run(ref_dir)
    fig = attention_figure(load_run(run_dir), ref, num_images=4)
    cols = 1 + 3 + with_reference  # input, (centralized), nodes 0-2
    assert len(fig.axes) == 4 * cols
    titles = [ax.get_title() for ax in fig.axes[:cols]]
    assert titles == ["input", *(["centralized"] if with_reference else []), "node 0", "node 1",
                      "node 2"]  # fmt: skip
    assert ("nodes only" in fig._suptitle.get_text()) is not with_reference
    assert "attention rollout" in fig._suptitle.get_text()


def test_a_reference_recorded_before_keys_were_added_still_serves_its_seed(tmp_path):
    # references of seeds 0..2, seed 0's made before `placement` and `memory-limit-gb` existed:
    # it ran with their defaults, and the plot's reference line must average all three seeds
    # (it was silently seed 1 and 2 only, or seed 0 alone, while the table averaged three)
    import json

    from sim.runs import matching_references

    refs = []
    for seed, acc in ((0, 0.9), (1, 0.6), (2, 0.6)):
        folder = write_run(tmp_path / f"ref{seed}", cfg(strategy="centralized", seed=seed),
                           [[acc] * 3] * 3)  # fmt: skip
        if seed == 0:
            saved = json.loads((folder / "config.json").read_text())
            for key in ("placement", "memory-limit-gb"):
                del saved["config"][key]
            (folder / "config.json").write_text(json.dumps(saved))
        refs.append(load_run(folder))
    runs = [load_run(write_run(tmp_path / f"r{s}", cfg(seed=s), ACCS)) for s in range(3)]
    assert len(matching_references(runs[1].config, refs, {0, 1, 2})) == 3
    assert len(matching_references(runs[0].config, refs, {0, 1, 2})) == 3
    fig = comparison_figure(runs, "strategy", references=refs)
    assert "centralized 70.0%" in [t.get_text() for t in fig.axes[0].texts]


def test_topology_of_hundreds_of_nodes_shows_its_gap_and_no_unreadable_ids(tmp_path):
    import math

    n = 300
    run = load_run(write_run(tmp_path / "r", cfg(num_nodes=n), [[0.5] * n] * 3))
    fig = topology_figure(run)
    title = fig.axes[0].get_title()
    gap = 2 / 3 * (1 - math.cos(2 * math.pi / n))  # the ring's closed form
    assert f"spectral gap {gap:.3g}" in title and "0.000," not in title + ","
    assert f"{n} nodes" in title
    assert not fig.axes[0].texts  # no node ids at this size
    small = topology_figure(load_run(write_run(tmp_path / "s", cfg(), ACCS)))
    assert len(small.axes[0].texts) == 3  # 3 nodes, 3 ids
