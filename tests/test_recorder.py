"""Results files grow by appending final records: nothing is rewritten, nothing kept forever."""

import pytest

from flower_p2p.recorder import Recorder
from flower_p2p.results import read_jsonl


def _start(rec: Recorder, nodes: int = 3) -> Recorder:
    for n in range(nodes):  # round 0: the initial models, as the relay records them
        rec.update(0, n)
    return rec


def _round(rec: Recorder, rnd: int, nodes: int = 3) -> None:
    for n in range(nodes):
        rec.update(rnd, n, train_loss=float(rnd), bytes_sent=rnd * 10)
    rec.close_round({"round": rnd, "wall_s": float(rnd)})


def test_a_round_is_appended_once_when_it_closes_and_then_forgotten(tmp_path):
    rec = _start(Recorder(tmp_path))
    for rnd in range(1, 6):
        _round(rec, rnd)
        rec.update(rnd - 1, 0, accuracy=0.5)  # evaluated in the next exchange
        rec.close_through(rnd - 1)
        assert {r for r, _ in rec.records} == {rnd}  # only the open round is in memory
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(m["round"], m["node"]) for m in metrics] == [
        (r, n) for r in range(5) for n in range(3)
    ]
    assert metrics[3]["accuracy"] == 0.5 and metrics[4]["accuracy"] is None
    assert [n["round"] for n in read_jsonl(tmp_path / "network.jsonl")] == [1, 2, 3, 4]
    assert rec.round_accuracies(4) == [0.5]  # the last closed round is still readable
    with pytest.raises(ValueError, match="final"):
        rec.update(2, 0, accuracy=0.9)


def test_a_torn_last_line_is_not_a_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0, "node": 0}\n{"round": 0, "no')
    assert read_jsonl(path) == [{"round": 0, "node": 0}]


def test_resume_cuts_the_files_back_to_the_checkpoint(tmp_path):
    rec = _start(Recorder(tmp_path))
    for rnd in range(1, 4):
        _round(rec, rnd)
        rec.close_through(rnd - 1)
    saved = rec.state()  # a checkpoint after round 3: rounds 0..2 written, round 3 open
    for rnd in range(4, 6):  # the run goes on, then is killed mid-append
        _round(rec, rnd)
        rec.close_through(rnd - 1)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"round": 5, "no')
    again = Recorder(tmp_path)
    again.restore(saved)
    assert {m["round"] for m in read_jsonl(tmp_path / "metrics.jsonl")} == {0, 1, 2}
    assert [n["round"] for n in read_jsonl(tmp_path / "network.jsonl")] == [1, 2]
    _round(again, 4)
    again.close_through(3)
    assert {m["round"] for m in read_jsonl(tmp_path / "metrics.jsonl")} == {0, 1, 2, 3}
