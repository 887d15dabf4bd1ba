"""Partitioners (every named one, the user's file and class), placement on the graph,
heterogeneity figures and feature skew: partition-level tests, no training."""

import functools
import inspect
import json

import flwr_datasets.partitioner as fp
import numpy as np
import pytest
import torch

from flower_p2p import prefix_cache
from flower_p2p.config import ExperimentConfig
from flower_p2p.data import (
    PARTITIONERS,
    _split_off_test,
    data_summary,
    digits_dataset,
    label_histogram,
    load_data,
    make_transform,
    partition_by_column,
    to_tensors,
)
from flower_p2p.feature_skew import shift_for
from flower_p2p.heterogeneity import heterogeneity, label_entropy, tv_matrix, undirected_edges
from flower_p2p.models import data_config
from flower_p2p.node import NodeRuntime, _train_tensors
from flower_p2p.partitioning import node_rows
from flower_p2p.placement import place, placement_edges
from flower_p2p.registry import ConfigError

NORM = ((0.5,) * 3, (0.5,) * 3)


@pytest.fixture(scope="module")
def digits():
    return digits_dataset()


def _rows(digits, **kw):
    cfg = ExperimentConfig().replace(**kw)
    by = partition_by_column(cfg, digits.column_names, "label")
    return node_rows(cfg, digits, "label", 10, by).rows


# name: (config, complete: every training row is some node's)
PARTITIONS = {
    "iid": ({}, True),
    "dirichlet": ({"alpha": 0.3}, True),
    "pathological": ({"classes_per_node": 3}, False),  # classes nobody drew are left out
    "unseen": ({"classes_per_node": 3}, True),
    "shard": ({"shards_per_node": 3}, False),  # the rows that fill no whole shard are left out
    "inner-dirichlet": ({"alpha": 0.3, "node_sizes": "lognormal"}, True),
    "linear": ({}, True),
    "square": ({}, True),
    "exponential": ({"num_nodes": 3}, True),
    "size": ({"node_sizes": "1,1,2,2,4,4,8,8"}, True),
    "natural-id": ({"partition_by": "label", "num_nodes": 10}, True),
    "grouped-natural-id": ({"partition_by": "label", "group_size": 2, "num_nodes": 5}, True),
    "continuous": ({"strictness": 0.8}, True),
    "distribution": ({"num_nodes": 10, "classes_per_node": 2}, True),
}


def test_every_horizontal_flwr_datasets_partitioner_is_offered():
    from flower_p2p.partitioners import SizedBy, SizedInnerDirichlet

    cfg = ExperimentConfig(num_nodes=10, partition_by="label")
    built = set()
    for name in PARTITIONERS:
        p = PARTITIONERS.get(name)(cfg, "label", 10, "label")
        inner = {SizedBy: fp.SizePartitioner, SizedInnerDirichlet: fp.InnerDirichletPartitioner}
        built.add(inner.get(type(p), type(p)))
    offered = {c for c in vars(fp).values() if inspect.isclass(c) and issubclass(c, fp.Partitioner)}
    # vertical ones split columns; IdToSizeFnc is linear/square/exponential's base
    left_out = {fp.Partitioner, fp.VerticalEvenPartitioner, fp.VerticalSizePartitioner,
                fp.IdToSizeFncPartitioner}  # fmt: skip
    assert offered - left_out <= built | {fp.PathologicalPartitioner}
    assert set(PARTITIONS) == set(PARTITIONERS)


@pytest.mark.parametrize("name", list(PARTITIONS))
def test_every_partitioner_is_disjoint_and_complete_where_it_should_be(digits, name):
    kw, complete = PARTITIONS[name]
    rows = _rows(digits, partitioner=name, **kw)
    sets = [set(r) for r in rows]
    assert all(sets) and sum(len(s) for s in sets) == len(set().union(*sets))
    assert all(len(s) == len(r) for s, r in zip(sets, rows, strict=True))
    assert set().union(*sets) <= set(range(len(digits)))
    if complete:
        assert set().union(*sets) == set(range(len(digits)))


def test_quantity_skew_follows_node_sizes(digits):
    rows = _rows(digits, partitioner="size", node_sizes="1,1,2,2,4,4,8,8")
    weights = np.array([1, 1, 2, 2, 4, 4, 8, 8])
    sizes = np.array([len(r) for r in rows])
    assert sizes.sum() == 1797 and np.all(np.abs(sizes - 1797 * weights / 30) <= 1.5)
    lognormal = [len(r) for r in _rows(digits, partitioner="size", sigma=1.5)]
    assert max(lognormal) > 5 * min(lognormal) and sum(lognormal) == 1797


# ---- the user's own partition: a .json file and a file.py:Class --------------------------------

CLASSES = '''
from flwr_datasets.partitioner import Partitioner


class EveryKth(Partitioner):
    """Node i: rows i, i + n, i + 2n, ..."""

    def __init__(self, num_partitions, seed=0):
        super().__init__()
        self._n = num_partitions

    @property
    def num_partitions(self):
        return self._n

    def load_partition(self, partition_id):
        return self.dataset.select(range(partition_id, len(self.dataset), self._n))


class Overlapping(EveryKth):
    def load_partition(self, partition_id):
        return self.dataset.select([0, *range(partition_id + 1, len(self.dataset), self._n)])


class Three(EveryKth):
    def __init__(self, seed=0):
        super().__init__(3)


class NeedsMore(EveryKth):
    def __init__(self, num_partitions, temperature):
        super().__init__(num_partitions)


class Fresh(EveryKth):
    def load_partition(self, partition_id):
        import datasets

        return datasets.Dataset.from_dict({"label": [0]})


class NotAPartitioner:
    pass
'''


@pytest.fixture()
def user_files(tmp_path):
    (tmp_path / "parts.py").write_text(CLASSES)
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    return tmp_path


def test_a_user_class_partitions_and_its_hash_is_recorded(user_files):
    spec = f"{user_files}/parts.py:EveryKth"
    cfg = ExperimentConfig(partitioner=spec, num_nodes=4)
    bundle = load_data(cfg)
    assert [len(p) for p in bundle.partitions] == [360, 359, 359, 359]  # 1437 rows, every 4th
    summary = data_summary(cfg)["partition"]
    import hashlib

    assert summary["sha256"] == hashlib.sha256((user_files / "parts.py").read_bytes()).hexdigest()
    (user_files / "parts.py").write_text(CLASSES.replace("rows i, i + n", "rows i, i+n"))
    assert load_data(cfg) is not bundle  # an edited file is read again (data key: size, mtime)


@pytest.mark.parametrize(("target", "allowed"), [
    ("parts.py:Overlapping", "disjoint partitions (row 0: nodes 0 and 1 share it)"),
    ("parts.py:Three", "a partitioner of num-nodes=4 partitions (it has 3)"),
    ("parts.py:NeedsMore", "(it also requires temperature)"),
    ("parts.py:Fresh", "partitions selected from the partitioner's dataset (partition 0 is not)"),
    ("parts.py:NotAPartitioner", "a subclass of flwr_datasets.partitioner.Partitioner"),
    ("parts.py:Missing", "its Partitioner subclasses: EveryKth, Fresh, NeedsMore, Overlapping"),
    ("broken.py:Any", "an importable Python file (ModuleNotFoundError"),
    ("parts.py:not-a-name", "ClassName: a Python identifier"),
    ("nowhere.py:Any", "naming an existing file"),
])  # fmt: skip
def test_bad_user_classes_are_refused_with_the_reason(user_files, target, allowed):
    with pytest.raises(ConfigError, match="^partitioner=") as err:
        load_data(ExperimentConfig(partitioner=f"{user_files}/{target}", num_nodes=4))
    assert allowed in err.value.allowed


def test_a_json_partition_gives_each_node_exactly_its_rows(tmp_path):
    train = _split_off_test(digits_dataset(), "label", 0.2)["train"]
    rows = [[5, 1, 9], [0, 2], [100, 1436, 7]]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    bundle = load_data(ExperimentConfig(partitioner=f"{tmp_path}/p.json", num_nodes=3))
    for part, r in zip(bundle.partitions, rows, strict=True):
        assert part["label"] == train.select(r)["label"]


@pytest.mark.parametrize(("rows", "allowed"), [
    ([[0, 1], [1, 2], [3]], "disjoint partitions (row 1: nodes 0 and 1 share it)"),
    ([[0, 0], [1], [2]], "node 0 holds it twice"),
    ([[0], [1], [1437]], "training-row indices in [0, 1436] (it holds 1437)"),
    ([[0], [1]], "num-nodes=3 lists (it holds 2)"),
    ([[0], [1], ["2"]], "one list of training-row indices (integers) per node"),
])  # fmt: skip
def test_bad_json_partitions_are_refused(tmp_path, rows, allowed):
    (tmp_path / "p.json").write_text(json.dumps(rows))
    with pytest.raises(ConfigError, match="^partitioner=") as err:
        load_data(ExperimentConfig(partitioner=f"{tmp_path}/p.json", num_nodes=3))
    assert allowed in err.value.allowed


def test_an_empty_node_in_a_json_partition_is_refused(tmp_path):
    (tmp_path / "p.json").write_text("[[0, 1], [], [2]]")
    with pytest.raises(ConfigError, match=r"^num-nodes=3 .*empty partitions: \[1\]"):
        load_data(ExperimentConfig(partitioner=f"{tmp_path}/p.json", num_nodes=3))


# ---- heterogeneity ------------------------------------------------------------------------------


def test_heterogeneity_of_known_histograms():
    hists = np.array([[10, 0, 0], [0, 10, 0], [5, 5, 0], [10, 0, 0]])
    dist = tv_matrix(hists)
    assert dist[0, 1] == 1.0 and dist[0, 2] == 0.5 and dist[0, 3] == 0.0
    assert np.allclose(label_entropy(hists), [0, 0, 1, 0])
    ring = undirected_edges([[1, 3], [0, 2], [1, 3], [2, 0]])
    het = heterogeneity(hists, ring)
    assert het["edge_tv"] == pytest.approx((1.0 + 0.5 + 0.5 + 0.0) / 4)
    assert het["all_pairs_tv"] == pytest.approx((1 + 0.5 + 0 + 0.5 + 1 + 0.5) / 6)
    assert het["edge_to_all_pairs"] == pytest.approx(0.5 / (3.5 / 6))
    assert het["size"] == [10, 10, 10, 10] and heterogeneity(hists, None)["edge_tv"] is None


# ---- placement ----------------------------------------------------------------------------------


def test_placement_finds_the_known_optimum_on_a_path():
    hists = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])  # alternating: every edge differs
    path = [(0, 1), (1, 2), (2, 3)]
    held = lambda perm: [int(np.argmax(hists[p])) for p in perm]  # noqa: E731
    clustered, spread = place(hists, path, "clustered", 0), place(hists, path, "spread", 0)
    assert held(clustered) in ([0, 0, 1, 1], [1, 1, 0, 0])
    assert held(spread) in ([0, 1, 0, 1], [1, 0, 1, 0])
    assert place(hists, path, "random", 0) == [0, 1, 2, 3]
    assert sorted(clustered) == [0, 1, 2, 3] and clustered == place(hists, path, "clustered", 0)


@pytest.mark.parametrize("graph", [
    {"topology": "ring"}, {"topology": "torus", "num_nodes": 16},
    {"topology": "small-world", "num_nodes": 16}, {"topology": "one-peer-exponential"},
    {"strategy": "relay-sum", "topology": "erdos-renyi", "edge_prob": 0.5},
])  # fmt: skip
@pytest.mark.parametrize("partition", [
    {"partitioner": "dirichlet", "alpha": 0.1}, {"partitioner": "shard"},
    {"partitioner": "inner-dirichlet", "alpha": 0.3},
])  # fmt: skip
def test_placement_lowers_or_raises_the_edge_distance_against_random(digits, graph, partition):
    cfg = ExperimentConfig().replace(**graph, **partition)
    rows = _rows(digits, **graph, **partition)
    labels = np.asarray(digits["label"])
    hists = np.stack([np.bincount(labels[list(r)], minlength=10) for r in rows])
    edges = placement_edges(cfg)
    tv = {}
    for mode in ("random", "clustered", "spread"):
        perm = place(hists, edges, mode, cfg.seed)
        tv[mode] = heterogeneity(hists[perm], edges)["edge_tv"]
    assert tv["clustered"] < tv["random"] < tv["spread"], tv


def test_load_data_places_partitions_and_the_summary_measures_them():
    random = load_data(ExperimentConfig(alpha=0.1))
    placed_cfg = ExperimentConfig(alpha=0.1, placement="clustered")
    placed = load_data(placed_cfg)
    perm = placed.placement
    assert sorted(perm) == list(range(8)) and list(perm) != list(range(8))
    for node, p in enumerate(perm):
        assert placed.partitions[node]["label"] == random.partitions[p]["label"]
    het = data_summary(placed_cfg)["heterogeneity"]
    assert het["edge_tv"] < data_summary(ExperimentConfig(alpha=0.1))["heterogeneity"]["edge_tv"]
    # the centralized reference has no graph: it ignores placement (same data, same order)
    central = load_data(ExperimentConfig(alpha=0.1, placement="clustered", strategy="centralized"))
    assert central.union()["label"] == random.union()["label"]


@pytest.mark.parametrize(("changes", "allowed"), [
    ({"topology": "complete"}, "every node neighbours every other"),
    ({"num_nodes": 3}, "every node neighbours every other"),  # a ring of 3 is a triangle
    ({"strategy": "fedavg"}, "random with strategy=fedavg"),
    ({"topology": "random-matching"}, "random with topology=random-matching"),
])  # fmt: skip
def test_placement_is_refused_where_no_placement_differs(changes, allowed):
    with pytest.raises(ConfigError, match="^placement='spread'") as err:
        load_data(ExperimentConfig(placement="spread").replace(**changes))
    assert allowed in err.value.allowed


# ---- feature skew -------------------------------------------------------------------------------


@functools.cache
def _skewed(node, **kw):
    cfg = ExperimentConfig(num_nodes=4, partitioner="iid", img_size=16, **kw)
    return _train_tensors(cfg, load_data(cfg), node, NORM)[0]


@pytest.mark.parametrize("kind", ["rotation", "contrast", "noise", "invert", "mixed"])
def test_feature_skew_is_deterministic_per_node_and_seed(kind):
    skewed = {i: _skewed(i, feature_skew=kind) for i in (0, 3)}
    again = {i: _skewed.__wrapped__(i, feature_skew=kind) for i in (0, 3)}  # built afresh
    assert all(torch.equal(skewed[i], again[i]) for i in (0, 3))
    if kind != "mixed":  # domain 0 is unshifted (mixed rotates it)
        assert torch.equal(skewed[0], _skewed(0))
    assert not torch.equal(skewed[3], _skewed(3))
    if kind == "noise":  # the noise is drawn from the seed (iid partitions ignore it)
        assert not torch.equal(_skewed(3, feature_skew=kind, seed=1), skewed[3])


def test_feature_skew_domains_group_consecutive_nodes():
    a, b = (_skewed(i, feature_skew="invert", skew_domains=2) for i in (0, 1))
    c = _skewed(2, feature_skew="invert", skew_domains=2)
    plain = _skewed(2)
    assert torch.equal(a, _skewed(0)) and torch.equal(b, _skewed(1))  # domain 0: as they are
    assert torch.allclose(c, -plain, atol=1e-6)  # domain 1: inverted (normalised around 0.5)


def test_feature_skew_keeps_the_global_test_set_and_adds_the_nodes_own_copy():
    cfg = ExperimentConfig(num_nodes=4, partitioner="iid", img_size=16, depth=1,
                           feature_skew="rotation")  # fmt: skip
    plain = NodeRuntime(ExperimentConfig(num_nodes=4, partitioner="iid", img_size=16, depth=1), 3)
    rt = NodeRuntime(cfg, 3)
    assert torch.equal(rt.test_x, plain.test_x) and plain.domain_test_x is None
    assert rt.domain_test_x.shape == rt.test_x.shape
    assert not torch.equal(rt.domain_test_x, rt.test_x)


def test_the_centralized_reference_trains_on_every_domain_whatever_the_placement():
    kw = dict(num_nodes=4, img_size=16, feature_skew="rotation", alpha=0.1)
    placed = ExperimentConfig(placement="clustered", **kw)
    bundle = load_data(placed)
    nodes = [_train_tensors(placed, bundle, i, NORM) for i in range(4)]
    by_partition = [nodes[list(bundle.placement).index(j)] for j in range(4)]
    central = _train_tensors(
        ExperimentConfig(strategy="centralized", **kw),
        load_data(ExperimentConfig(strategy="centralized", **kw)),
        0,
        NORM,
    )
    assert torch.equal(central[0], torch.cat([x for x, _ in by_partition]))
    assert torch.equal(central[1], torch.cat([y for _, y in by_partition]))


def test_prefix_cache_with_feature_skew_caches_each_nodes_own_domain_copy():
    cfg = ExperimentConfig(num_nodes=4, partitioner="iid", img_size=16, depth=1,
                           finetune="head", feature_skew="contrast", prefix_cache="on")  # fmt: skip
    rt = NodeRuntime(cfg, 2)
    assert rt.cache.on
    bundle = load_data(cfg)
    norm = data_config(rt.model)
    shifted = to_tensors(bundle.test, bundle, make_transform(16, *norm, shift=shift_for(cfg, 2),
                                                             split="test"))[0]  # fmt: skip
    expected = prefix_cache.activations(rt.cache.split, shifted, rt.device)
    assert torch.allclose(rt.domain_test_x, expected)
    assert not torch.allclose(rt.domain_test_x, rt.test_x)
    assert label_histogram(bundle.partitions[2], bundle).sum() == len(rt.train_y)


# ---- one Flower run: the user's class loaded in the simulation's workers, placed, skewed -------


def test_flower_run_with_a_user_class_placement_and_feature_skew(small_runs):
    from small_runs import case_config

    from sim.runs import load_run

    # tests/every_kth_partitioner.py:EveryKth, spread placement, a noise shift per node
    name = "dsgd-own-partition-skew"
    run, cfg = load_run(small_runs(name)), case_config(name)
    last = [m for m in run.metrics if m["round"] == cfg.num_rounds]
    assert len(last) == 4 and all(m["accuracy"] is not None for m in last)
    assert all(0 <= m["domain_accuracy"] <= 1 for m in last)  # each node on its own domain
    summary, expected = run.summary, data_summary(cfg)
    assert summary["heterogeneity"] == expected["heterogeneity"]
    assert summary["partition"]["sha256"] == expected["partition"]["sha256"] is not None
    assert summary["heterogeneity"]["domain"] == [
        expected["partition"]["node_partition"][i] for i in range(4)
    ]  # one domain per partition, travelling with it
    assert summary["domain_accuracy_mean"] == pytest.approx(np.mean([m["domain_accuracy"]
                                                                     for m in last]))  # fmt: skip
    assert (run.dir / "labels.png").is_file()


def test_pretraining_takes_one_unshifted_partition_whatever_the_partition_keys():
    from sim.pretrain import PretrainConfig, source_pool

    cfg = ExperimentConfig(partitioner="size", node_sizes="1,1,1,1,1,1,1,2", placement="spread",
                           feature_skew="rotation", skew_domains=4)  # fmt: skip
    pool = source_pool(cfg, PretrainConfig(source_dataset="digits"))
    assert len(pool.partitions) == 1 and len(pool.partitions[0]) == 1437
