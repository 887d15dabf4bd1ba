"""Small real runs through Flower's simulation engine (Ray backend) on the bundled digits.

Every strategy and every fine-tune mode runs once, long enough to learn (4 nodes, 8 rounds of 4
local steps, a depth-1 ViT on 16x16 images, mild label skew). Each run must clear an accuracy
floor far above chance (10 classes: 10 %), and must compute exactly what the plain
single-process loop (``sim.loop.run_plain``, no Flower, no Ray) computes for the same config: a
run that breaks learning, or a relay that delivers the wrong messages, fails here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from flower_p2p.config import ExperimentConfig
from flower_p2p.results import read_jsonl
from sim.engine import run_experiment
from sim.loop import run_plain

BASE = dict(num_nodes=4, num_rounds=8, local_steps=4, depth=1, img_size=16, alpha=1.0,
            lr_schedule="constant", lr=3e-3, eval_every=4)  # fmt: skip

# name: (config changes, floor on the mean node accuracy, floor on the worst node). Floors sit
# about 15 points below what these runs reached here (noted per line, mean / worst).
CASES = {
    "dsgd": ({}, 0.55, 0.5),  # 0.70 / 0.68
    "choco-8bit": ({"strategy": "choco", "compressor": "8bit", "gamma": 1.0}, 0.55, 0.5),  # .70/.67
    "gradient-tracking": ({"strategy": "gradient-tracking"}, 0.55, 0.5),  # 0.73 / 0.71
    "push-sum": ({"strategy": "push-sum"}, 0.55, 0.5),  # 0.70 / 0.68
    "fedavg": ({"strategy": "fedavg"}, 0.55, 0.55),  # 0.73 / 0.73
    "centralized": ({"strategy": "centralized"}, 0.55, 0.55),  # 0.72
    "local": ({"strategy": "local"}, 0.25, 0.15),  # 0.41 / 0.31: no communication
    "dsgd-one-peer": ({"topology": "one-peer-exponential"}, 0.5, 0.45),
    "choco-one-peer": (
        {
            "strategy": "choco",
            "compressor": "none",
            "gamma": 1.0,
            "topology": "one-peer-exponential",
        },
        0.5,
        0.45,
    ),  # fmt: skip
    "head": ({"finetune": "head", "lr": 1e-2}, 0.55, 0.5),  # 0.75 / 0.71
    "last-k": ({"finetune": "last-k", "lr": 1e-2}, 0.5, 0.45),  # 0.66 / 0.63
    "lora": ({"finetune": "lora", "lr": 1e-2}, 0.6, 0.55),  # 0.84 / 0.84
}


def _config(name: str, out: str) -> ExperimentConfig:
    cfg = ExperimentConfig(out_dir=out, **{**BASE, **CASES[name][0]})
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each case's results folder, run through Flower on first use."""
    done: dict[str, object] = {}

    def get(name: str):
        if name not in done:
            done[name] = run_experiment(_config(name, str(tmp_path_factory.mktemp(name))))
        return done[name]

    return get


def _summary(folder) -> dict:
    return json.loads((folder / "summary.json").read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_accuracy_floor_and_the_plain_loop_agrees(runs, name):
    folder = runs(name)
    summary = _summary(folder)
    _, mean_floor, worst_floor = CASES[name]
    assert summary["accuracy_mean"] > mean_floor, summary["accuracy_mean"]
    assert summary["accuracy_min"] > worst_floor, summary["accuracy_min"]
    # the same config in one process, without Flower: the very same numbers. One torch thread,
    # as in Flower's Ray actors: reductions split over more threads round differently.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = run_plain(_config(name, ""))
    finally:
        torch.set_num_threads(threads)
    final = sorted((m["node"], m["accuracy"]) for m in read_jsonl(folder / "metrics.jsonl")
                   if m["round"] == BASE["num_rounds"])  # fmt: skip
    assert [acc for _, acc in final] == plain["accuracy"][BASE["num_rounds"]]


def test_gossip_learns_what_no_node_learns_alone(runs):
    assert _summary(runs("dsgd"))["accuracy_mean"] > _summary(runs("local"))["accuracy_mean"] + 0.15


def test_choco_without_compression_computes_dsgd_on_a_changing_graph(runs):
    # the defect this guards: CHOCO's copies drifted on per-round graphs (chance accuracy)
    choco = read_jsonl(runs("choco-one-peer") / "metrics.jsonl")
    dsgd = read_jsonl(runs("dsgd-one-peer") / "metrics.jsonl")
    for c, d in zip(choco, dsgd, strict=True):
        if d["accuracy"] is not None:
            assert c["accuracy"] == pytest.approx(d["accuracy"], abs=0.02)


def test_metrics_file_has_every_round_and_node(runs):
    metrics = read_jsonl(runs("dsgd") / "metrics.jsonl")
    assert sorted((m["round"], m["node"]) for m in metrics) == [
        (r, n) for r in range(9) for n in range(4)
    ]
    for m in metrics:
        assert set(m) >= {"round", "node", "accuracy", "loss", "train_loss", "bytes_sent",
                          "bytes_received", "network_bytes"}  # fmt: skip
        assert "wall_s" not in m  # timings go to network.jsonl: metrics.jsonl is deterministic
        assert (m["accuracy"] is not None) == (m["round"] % 4 == 0)


def test_bytes_are_counted_from_real_payloads(runs):
    metrics = read_jsonl(runs("dsgd") / "metrics.jsonl")
    node0 = [m for m in metrics if m["node"] == 0]
    sent = [m["bytes_sent"] for m in node0]
    # ring of 4: two neighbours; each round sends the same full trainable payload twice
    payload = sent[1] / 2
    assert sent == [2 * payload * r for r in range(9)] and payload > 1e5
    # it receives its two neighbours' messages of the same size; no server: network = sent
    assert [m["bytes_received"] for m in node0] == sent
    assert all(m["network_bytes"] == m["bytes_sent"] for m in metrics)
    summary = _summary(runs("dsgd"))
    assert summary["total_bytes_sent"] == sum(m["bytes_sent"] for m in metrics if m["round"] == 8)
    assert summary["network_bytes_per_node"] == summary["mean_bytes_sent_per_node"] == sent[-1]


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("choco-8bit", 0.2, 0.3),  # int8 values + one scale per tensor
        ("gradient-tracking", 1.9, 2.1),  # sends x and the tracker y
        ("push-sum", 0.99, 1.05),  # the model numerator plus one weight
        ("lora", 0.005, 0.2),  # only adapters and head travel
        ("dsgd-one-peer", 0.49, 0.51),  # one peer a round instead of two neighbours
        # upload of the model to a server and its broadcast of the average back: on a ring of 4
        # exactly what two neighbours cost (it counted only the upload before: 0.5)
        ("fedavg", 0.99, 1.01),
    ],
)
def test_network_bytes_against_dsgd(runs, name, low, high):
    ratio = _summary(runs(name))["network_bytes"] / _summary(runs("dsgd"))["network_bytes"]
    assert low < ratio < high


def test_fedavg_counts_the_servers_broadcast(runs):
    summary = _summary(runs("fedavg"))
    node = [m for m in read_jsonl(runs("fedavg") / "metrics.jsonl") if m["node"] == 1][-1]
    # each round the node uploads its model and its sample count, and gets the model back
    count = ArrayRecord({"fedavg/n": Array(np.zeros(1))}).count_bytes()
    assert node["bytes_sent"] - node["bytes_received"] == BASE["num_rounds"] * count
    assert node["network_bytes"] == node["bytes_sent"] + node["bytes_received"]
    received = 4 * summary["mean_bytes_received_per_node"]
    assert summary["network_bytes"] == summary["total_bytes_sent"] + received


def test_choco_on_a_schedule_pays_for_its_union_delivery(runs):
    # CHOCO's increments reach every node that ever mixes with the sender (i+1 and i+2 on 4
    # nodes), one-peer DSGD only this round's peer: twice the messages of the same size
    ratio = _summary(runs("choco-one-peer"))["network_bytes"] / _summary(
        runs("dsgd-one-peer"))["network_bytes"]  # fmt: skip
    assert 1.99 < ratio < 2.01


def test_results_folder_is_complete(runs):
    folder = runs("dsgd")
    for name in ("config.json", "metrics.jsonl", "network.jsonl", "summary.json",
                 "convergence.png", "topology.png", "consensus.png"):  # fmt: skip
        assert (folder / name).stat().st_size > 0, name
    summary = _summary(folder)
    assert summary["spectral_gap"] == pytest.approx(2 / 3)  # ring of 4, Metropolis-Hastings
    config = json.loads((folder / "config.json").read_text())
    assert config["seed"] == 0 and "torch" in config["versions"]
    network = read_jsonl(folder / "network.jsonl")
    assert [n["round"] for n in network] == list(range(1, 9))
    walls = [n["wall_s"] for n in network]
    assert 0 < walls[0] and walls == sorted(walls)
    # consensus of the evaluated models: after rounds 4 and 8, not between evaluations
    measured = {n["round"]: n["consensus_distance"] for n in network}
    assert measured[4] > 0 and measured[8] > 0
    assert all(measured[r] is None for r in (1, 2, 3, 5, 6, 7))


@pytest.mark.parametrize("name", ["push-sum", "gradient-tracking", "choco-8bit", "fedavg"])
def test_consensus_distance_is_measured_for_every_strategy(runs, name):
    network = read_jsonl(runs(name) / "network.jsonl")
    value = network[-1]["consensus_distance"]
    assert value is not None and value >= 0
    if name == "fedavg":  # every node takes the same average
        assert value == 0.0
    else:
        assert value > 0
