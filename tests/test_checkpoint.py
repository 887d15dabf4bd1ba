"""Checkpoint files: exact round trips, the manifest as commit point, refused resumes."""

import numpy as np
import pytest

from flower_p2p.checkpoint import (
    commit,
    load_latest,
    node_file,
    open_out_dir,
    read_node_state,
    remove_temp_files,
    round_dir,
    write_node_state,
    write_relay_state,
)
from flower_p2p.config import ExperimentConfig
from flower_p2p.registry import ConfigError
from flower_p2p.results import write_json

CONFIG = ExperimentConfig(num_nodes=3, out_dir="/x").to_run_config()


def test_node_state_round_trips_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    params = {"blocks.0.attn.qkv.weight": rng.standard_normal((6, 2)).astype(np.float32)}
    algo = {"hat/self/blocks.0.attn.qkv.weight": rng.standard_normal((6, 2)),
            "choco/round": np.array([4], dtype=np.int64)}  # fmt: skip
    optim = {"state/0/exp_avg": rng.standard_normal((6, 2)).astype(np.float32),
             "state/0/step": np.array(3.0, dtype=np.float32)}  # fmt: skip
    write_node_state(tmp_path / "n.npz", params, algo, optim)
    p, a, o = read_node_state(tmp_path / "n.npz")
    assert p.keys() == params.keys() and a.keys() == algo.keys() and o.keys() == optim.keys()
    pairs = [(p[k], params[k]) for k in params] + [(a[k], algo[k]) for k in algo]
    for got, want in pairs + [(o[k], optim[k]) for k in optim]:
        assert got.dtype == want.dtype and np.array_equal(got, want)
    # a node that never trained, and one whose algorithm keeps no state (DSGD)
    write_node_state(tmp_path / "m.npz", None, None, None)
    assert read_node_state(tmp_path / "m.npz") == (None, None, None)
    write_node_state(tmp_path / "d.npz", params, {}, optim)
    assert read_node_state(tmp_path / "d.npz")[1] == {}


def test_the_manifest_commits_and_older_checkpoints_go(tmp_path):
    msgs = {2: {"x/w": np.arange(3.0)}}
    for rnd in (1, 2):
        folder = round_dir(tmp_path, rnd)
        write_node_state(node_file(folder, 0), None, None, None)
        write_relay_state(folder, {"round": rnd}, msgs)
        commit(tmp_path, rnd, CONFIG)
    round_dir(tmp_path, 3).mkdir()  # a later checkpoint whose writing was interrupted
    ckpt = load_latest(tmp_path, CONFIG)
    assert ckpt.round == 2 and ckpt.relay == {"round": 2} and ckpt.folder == round_dir(tmp_path, 2)
    assert np.array_equal(ckpt.last_out[2]["x/w"], msgs[2]["x/w"])
    assert not round_dir(tmp_path, 1).exists()
    # resuming may change how often to checkpoint and the spelling of out-dir, nothing else
    same = {**CONFIG, "checkpoint-every": 5, "resume": True, "out-dir": "/y"}
    assert load_latest(tmp_path, same).round == 2
    with pytest.raises(ConfigError, match="lr: 0.001 -> 0.01"):
        load_latest(tmp_path, {**CONFIG, "lr": 0.01})


def test_per_receiver_messages_round_trip(tmp_path):
    # RelaySum sends each receiver its own message: {sender: {receiver: arrays}}
    msgs = {0: {1: {"x/w": np.arange(3.0), "count": np.array([2.0])},
                3: {"x/w": np.arange(3.0) + 7, "count": np.array([1.0])}},
            2: {"x/w": np.ones(2)}}  # fmt: skip
    folder = round_dir(tmp_path, 4)
    write_relay_state(folder, {"round": 4}, msgs)
    commit(tmp_path, 4, CONFIG)
    got = load_latest(tmp_path, CONFIG).last_out
    assert sorted(got) == [0, 2] and sorted(got[0]) == [1, 3] and sorted(got[2]) == ["x/w"]
    for receiver in (1, 3):
        for name, value in msgs[0][receiver].items():
            assert np.array_equal(got[0][receiver][name], value)


def test_resume_is_refused_without_a_folder_or_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="out-dir="):
        open_out_dir(tmp_path / "none", CONFIG, resume=True, overwrite=False)
    with pytest.raises(ConfigError, match="no config.json"):
        open_out_dir(tmp_path, CONFIG, resume=True, overwrite=False)
    assert open_out_dir(tmp_path / "new", CONFIG, resume=False, overwrite=False) is None


def _started(folder, every: int, finished: bool = False):
    """A run folder as a run started with checkpoint-every=``every`` leaves it, no checkpoint."""
    folder.mkdir()
    run_config = {**CONFIG, "checkpoint-every": every, "out-dir": str(folder)}
    write_json(folder / "config.json", {"config": run_config, "seed": 0})
    if finished:
        write_json(folder / "summary.json", {})
    return folder


def test_resume_without_a_run_folder_says_none_was_started(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as err:
        load_latest(tmp_path, CONFIG)
    msg = err.value.allowed
    assert "no config.json" in msg and "not a run's results folder" in msg
    assert "without resume=true" in msg


def test_resume_of_a_run_that_never_checkpointed_says_so(tmp_path):
    out = _started(tmp_path / "run", every=0)
    with pytest.raises(ConfigError) as err:
        load_latest(out, CONFIG)
    msg = err.value.allowed
    assert "checkpoint-every=0" in msg and "never checkpointed" in msg
    assert f"overwrite=true resume=false out-dir={out}" in msg


def test_resume_of_a_run_killed_before_its_first_checkpoint_says_so(tmp_path):
    out = _started(tmp_path / "run", every=5)
    with pytest.raises(ConfigError) as err:
        load_latest(out, {**CONFIG, "checkpoint-every": 5})
    msg = err.value.allowed
    assert "checkpoint-every=5" in msg and "stopped before round 5 finished" in msg
    assert "checkpoint-every > 0" not in msg  # it was: the old advice was wrong
    assert f"overwrite=true resume=false out-dir={out}" in msg


def test_resume_of_a_run_that_finished_before_its_first_checkpoint_says_so(tmp_path):
    out = _started(tmp_path / "run", every=500, finished=True)
    with pytest.raises(ConfigError, match="finished .*before round 500"):
        load_latest(out, CONFIG)


def test_temporary_files_of_a_killed_run_are_removed(tmp_path):
    (tmp_path / ".metrics.jsonl.ab12cd").write_text("{half")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (round_dir(tmp_path, 3)).mkdir(parents=True)
    (round_dir(tmp_path, 3) / ".node-1.npz.x1y2").write_bytes(b"half")
    remove_temp_files(tmp_path)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["metrics.jsonl"]


def test_a_checkpoint_from_before_a_key_existed_resumes_with_that_keys_default(tmp_path):
    older = {k: v for k, v in CONFIG.items() if k not in ("placement", "feature-skew")}
    write_node_state(node_file(round_dir(tmp_path, 1), 0), None, None, None)
    write_relay_state(round_dir(tmp_path, 1), {"round": 1}, {})
    commit(tmp_path, 1, older)
    assert load_latest(tmp_path, CONFIG).round == 1  # it ran with placement=random
    with pytest.raises(ConfigError, match="placement: 'random' -> 'clustered'"):
        load_latest(tmp_path, {**CONFIG, "placement": "clustered"})
