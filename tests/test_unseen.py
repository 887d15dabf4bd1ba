"""Unseen-class partitions and accuracy, in the plain loop, a Flower run and the compare table."""

import numpy as np
import pytest
import torch

from flower_p2p.config import ExperimentConfig
from flower_p2p.data import PARTITIONERS, digits_dataset, load_data
from flower_p2p.registry import ConfigError
from flower_p2p.unseen import UNSEEN_LAYOUTS, class_assignment, unseen_class_accuracy
from sim.compare import write_table
from sim.loop import run_plain

LAYOUTS = list(UNSEEN_LAYOUTS)


@pytest.fixture(scope="module")
def digits():
    ds = digits_dataset()
    return ds.add_column("idx", list(range(len(ds))))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("n", "k"), [(8, 3), (10, 1), (12, 2), (5, 6), (16, 4), (4, 9)])
def test_assignment_covers_every_class_with_exactly_k_each(layout, n, k):
    if layout == "neighbours-share" and n + k - 1 < 10:
        pytest.skip("infeasible for this layout (refused: see below)")
    held = class_assignment(n, 10, k, layout)
    assert len(held) == n
    assert all(len(set(h)) == k and set(h) <= set(range(10)) for h in held)
    assert set().union(*map(set, held)) == set(range(10))


def test_neighbours_share_is_flwr_deterministic_and_consecutive_nodes_overlap():
    held = class_assignment(8, 10, 3, "neighbours-share")
    assert held[0] == (0, 1, 2) and held[7] == (7, 8, 9)
    assert all(len(set(held[i]) & set(held[i + 1])) == 2 for i in range(7))


@pytest.mark.parametrize(("n", "k"), [(8, 2), (8, 3), (6, 4), (12, 2), (4, 3), (10, 5)])
def test_disjoint_neighbours_share_nothing_with_ring_neighbours(n, k):
    held = class_assignment(n, 10, k, "disjoint-neighbours")
    for i in range(n):
        assert not set(held[i]) & set(held[(i + 1) % n]), (i, held)


def test_disjoint_neighbours_overlap_as_little_as_possible_when_forced():
    held = class_assignment(3, 10, 4, "disjoint-neighbours")  # a triangle: all are neighbours
    assert set().union(*map(set, held)) == set(range(10))
    # 3 x 4 = 12 slots for 10 classes: exactly two classes are held twice
    assert sum(len(h) for h in held) - 10 == 2


@pytest.mark.parametrize(
    ("n", "k", "layout", "match"),
    [
        (4, 2, "disjoint-neighbours", r"classes-per-node=2 .*at least 3.*cannot cover all 10"),
        (4, 11, "disjoint-neighbours", r"classes-per-node=11 .*\[1, 10\]"),
        (8, 2, "neighbours-share", r"classes-per-node=2 .*at least 3 for unseen-layout"),
    ],
)
def test_infeasible_settings_are_refused_before_training(n, k, layout, match):
    cfg = ExperimentConfig(partitioner="unseen", num_nodes=n, classes_per_node=k,
                           unseen_layout=layout)  # fmt: skip
    with pytest.raises(ConfigError, match=match):
        load_data(cfg)


def test_unknown_layout_is_refused():
    with pytest.raises(ConfigError, match=r"unseen-layout='near'.*neighbours-share"):
        ExperimentConfig(unseen_layout="near").validate()


@pytest.mark.parametrize(("layout", "n", "k"), [("neighbours-share", 8, 3),
                                               ("disjoint-neighbours", 8, 2),
                                               ("disjoint-neighbours", 5, 4)])  # fmt: skip
def test_each_node_holds_exactly_its_classes_and_all_their_samples(digits, layout, n, k):
    cfg = ExperimentConfig(partitioner="unseen", num_nodes=n, classes_per_node=k,
                           unseen_layout=layout)  # fmt: skip
    partitioner = PARTITIONERS.get("unseen")(cfg, "label", 10)
    partitioner.dataset = digits
    parts = [partitioner.load_partition(i) for i in range(n)]
    held = class_assignment(n, 10, k, layout)
    for part, classes in zip(parts, held, strict=True):
        assert set(part["label"]) == set(classes)
    ids = [set(p["idx"]) for p in parts]
    assert sum(len(s) for s in ids) == len(digits)  # disjoint ...
    assert set().union(*ids) == set(range(len(digits)))  # ... and complete
    labels = np.asarray(digits["label"])
    for c in range(10):  # a class's samples split evenly among the nodes holding it
        sizes = [int(np.sum(labels[list(s)] == c)) for s, h in zip(ids, held, strict=True)
                 if c in h]  # fmt: skip
        assert max(sizes) - min(sizes) <= 1


def test_unseen_class_accuracy_on_a_hand_made_prediction_set():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 3, 4])
    preds = np.array([0, 1, 1, 1, 2, 0, 3, 3, 0, 0])
    # seen {0, 1}: unseen samples are labels 2,2,3,3,3,4 -> right: 2, 3, 3 -> 3/6
    assert unseen_class_accuracy(preds, labels, {0, 1}) == pytest.approx(0.5)
    assert unseen_class_accuracy(preds, labels, [2, 3, 4]) == pytest.approx(3 / 4)  # 0,0,1,1
    assert unseen_class_accuracy(torch.as_tensor(preds), torch.as_tensor(labels),
                                 torch.tensor([0, 1, 2, 3])) == 0.0  # fmt: skip
    assert unseen_class_accuracy(preds, labels, set(range(5))) is None  # saw everything
    assert unseen_class_accuracy(preds, labels, set(range(10))) is None


TINY = dict(num_nodes=4, num_rounds=2, depth=1, img_size=16, local_steps=1, eval_every=1,
            partitioner="unseen", classes_per_node=3,
            unseen_layout="disjoint-neighbours")  # fmt: skip


def test_plain_loop_reports_unseen_accuracy_per_node_and_none_for_centralized():
    gossip = run_plain(ExperimentConfig(**TINY))
    assert all(len(v) == 4 for v in gossip["unseen_accuracy"].values())
    assert 0.0 <= gossip["final_unseen_min"] <= gossip["final_unseen_mean"] <= 1.0
    central = run_plain(ExperimentConfig(**{**TINY, "strategy": "centralized"}))
    assert central["unseen_accuracy"] == {} and central["final_unseen_mean"] is None


def test_compare_table_shows_unseen_columns_only_when_present(tmp_path):
    base = {"accuracy_mean": 0.5, "accuracy_min": 0.25, "mean_bytes_sent_per_node": 2e6,
            "wall_s": 10.0}  # fmt: skip
    write_table(tmp_path, {"dsgd": {**base, "unseen_accuracy_mean": 0.4,
                                    "unseen_accuracy_min": 0.125},
                           "centralized": {**base, "unseen_accuracy_mean": None,
                                           "unseen_accuracy_min": None}})  # fmt: skip
    md = (tmp_path / "compare.md").read_text()
    assert "mean unseen-class acc (%)" in md
    assert "| dsgd | 50.00 | 25.00 | 40.00 | 12.50 | 2.00 | 10 |" in md
    assert "| centralized | 50.00 | 25.00 | – | – |" in md
    write_table(tmp_path, {"dsgd": base})
    assert "unseen" not in (tmp_path / "compare.md").read_text()


def test_flower_run_records_unseen_accuracy_per_round_and_node(small_runs):
    import json

    from small_runs import BASE

    from flower_p2p.results import read_jsonl

    run = small_runs("relay-sum-unseen")  # 3 classes per node, no class shared with a neighbour
    metrics = read_jsonl(run / "metrics.jsonl")
    rounds = BASE["num_rounds"]
    assert sorted((m["round"], m["node"]) for m in metrics) == [
        (r, n) for r in range(rounds + 1) for n in range(4)
    ]
    # every node lacks 7 of the 10 classes: its unseen-class accuracy is measured whenever it
    # evaluates (the engine = plain loop equality is in test_end_to_end.py)
    evaluated = [m for m in metrics if m["accuracy"] is not None]
    assert evaluated and all(0.0 <= m["unseen_accuracy"] <= 1.0 for m in evaluated)
    final = [m["unseen_accuracy"] for m in metrics if m["round"] == rounds]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["unseen_accuracy_mean"] == pytest.approx(np.mean(final))
    assert summary["unseen_accuracy_min"] == pytest.approx(min(final))
    assert summary["unseen_accuracy_mean"] > 0.3  # measured 0.53: neighbours' classes learnt
