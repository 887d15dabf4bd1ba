import tomllib
from pathlib import Path

import pytest

from flower_p2p.config import ExperimentConfig
from flower_p2p.registry import ConfigError
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


def test_a_clientapp_parses_each_run_config_once_and_still_refuses_bad_values():
    # Every message carries the run config; the nodes of a process share one parsed copy.
    from flwr.app import Context, RecordDict

    from flower_p2p.client_app import _config

    def context(run_config):
        return Context(run_id=1, node_id=1, node_config={"partition-id": 0},
                       state=RecordDict(), run_config=run_config)  # fmt: skip

    base = ExperimentConfig().to_run_config()
    first = _config(context(dict(base)))
    assert _config(context(dict(reversed(list(base.items()))))) is first
    other = _config(context({**base, "lr": 0.5}))
    assert other.lr == 0.5 and first.lr != 0.5
    for _ in range(2):  # a refusal is not remembered as a config
        with pytest.raises(ConfigError, match="num-nodes"):
            _config(context({**base, "num-nodes": 0}))
