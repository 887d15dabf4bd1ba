"""Bad input: a clear error naming key, value and what is allowed, before any training."""

import pytest

from flower_p2p.config import ExperimentConfig
from flower_p2p.registry import ConfigError
from flower_p2p.server_app import preflight
from sim.engine import run_experiment

BAD = [
    ({"topology": "hypercube"}, "topology", "one of ring, torus"),
    ({"mixing": "laplacian"}, "mixing", "metropolis-hastings"),
    ({"model": "resnet18"}, "model", "vit_, deit_, swin_"),
    ({"model": "vit_no_such_model"}, "model", "vit_, deit_, swin_"),
    ({"partitioner": "shards"}, "partitioner", "iid, dirichlet, pathological"),
    ({"dataset": "./no/such/folder"}, "dataset", "existing local dataset folder"),
    ({"alpha": 0.0}, "alpha", "> 0"),
    ({"alpha": -1}, "alpha", "> 0"),
    ({"classes-per-node": 0}, "classes-per-node", ">= 1"),
    ({"unseen-layout": "ring"}, "unseen-layout", "neighbours-share, disjoint-neighbours"),
    ({"num-nodes": 1}, "num-nodes", "at least 2 for dsgd"),
    ({"pretrained": "/no/such/ckpt.safetensors"}, "pretrained", "existing checkpoint file"),
    ({"strategy": "gossip"}, "strategy", "dsgd"),
    ({"num-rounds": "ten"}, "num-rounds", "an integer"),
    ({"lr": -0.1}, "lr", "> 0"),
    ({"patch-size": 5}, "patch-size", "divisor of img-size=32"),
    ({"number-of-nodes": 8}, "number-of-nodes", "a known key"),
]


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    BAD,
    ids=[b[1] + "-" + str(b[0][b[1]] if b[1] in b[0] else "") for b in BAD],
)
def test_config_errors_name_key_value_and_allowed(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_run_config(override)
    message = str(err.value)
    value = next(iter(override.values()))
    assert message.startswith(f"{key}={value!r}")
    assert allowed in message


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (
            {"partitioner": "pathological", "classes-per-node": 11},
            r"classes-per-node=11 .*\[1, 10\]",
        ),
        ({"num-nodes": 1500}, r"num-nodes=1500 .*at most 1437"),
        (
            {"partitioner": "unseen", "classes-per-node": 1},
            r"classes-per-node=1 .*8 nodes x 1 classes cannot cover all 10",
        ),
        (
            {"dataset": "no-such-hub-dataset-xyz"},
            r"dataset='no-such-hub-dataset-xyz' .*hub dataset",
        ),
        ({"topology": "random-regular", "degree": 3, "num-nodes": 7}, r"degree=3 .*even"),
    ],
)
def test_errors_found_by_preflight(override, match):
    cfg = ExperimentConfig.from_run_config(override)
    with pytest.raises(ConfigError, match=match):
        preflight(cfg)


def test_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    cfg = ExperimentConfig(num_nodes=1500, out_dir=str(out))
    with pytest.raises(ConfigError):
        run_experiment(cfg)
    assert not out.exists()


def test_existing_results_are_not_overwritten(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("precious\n")
    with pytest.raises(ConfigError, match=r"out-dir=.*overwrite=true"):
        run_experiment(ExperimentConfig(out_dir=str(tmp_path), num_rounds=1, depth=1))
    assert (tmp_path / "metrics.jsonl").read_text() == "precious\n"
