import tomllib
from pathlib import Path

from flower_p2p.config import ExperimentConfig
from sim.cli import parse_overrides


def test_pyproject_run_config_matches_the_dataclass_defaults():
    table = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == ExperimentConfig().to_run_config()


def test_cli_overrides_are_typed_like_flower_run_config():
    assert parse_overrides(["num-rounds=5", "lr=0.01", "topology=torus", "overwrite=true",
                            "out-dir='/tmp/x y'"]) == {  # fmt: skip
        "num-rounds": 5, "lr": 0.01, "topology": "torus", "overwrite": True, "out-dir": "/tmp/x y",
    }  # fmt: skip


def test_roundtrip_through_run_config():
    cfg = ExperimentConfig(num_nodes=5, topology="complete", alpha=0.1)
    assert ExperimentConfig.from_run_config(cfg.to_run_config()) == cfg
