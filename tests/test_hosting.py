"""``nodes-per-supernode``: several graph nodes per SuperNode compute exactly what they do alone.

The project's own ClientApp and ServerApp code run in this process, behind a Grid that answers
each Flower message as a SuperNode would (its own ``Context``, which it keeps only when the call
succeeded), so a run takes seconds. Hosting must change no number, with faults, a failing node,
the async relay, checkpoints and a resume across hosting. Through Flower's simulation engine the
small run ``relay-sum-unseen`` (per-receiver messages) runs hosted and must compute the plain
loop's numbers (``test_end_to_end.py``), async DSGD with faults is rerun hosted
(``test_async.py``), and the Deployment Engine test runs async mode hosted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from flower_p2p import client_app
from flower_p2p.checkpoint import load_latest
from flower_p2p.config import ExperimentConfig
from flower_p2p.hosting import (
    ERROR,
    HostingGrid,
    host_nodes,
    hosted_by,
    pack_sections,
    supernodes_needed,
    unpack_sections,
)
from flower_p2p.registry import ConfigError
from flower_p2p.server_app import run_experiment
from sim.engine import num_supernodes

pytestmark = pytest.mark.usefixtures("task_identity")


class Crash(Exception):
    """The machine went down (the test's stand-in for a killed process)."""


class InProcessFederation:
    """``num_supernodes`` SuperNodes running the project's ClientApp in this process.

    ``crash_at_train``: raise ``Crash`` when the relay sends its train batch number so-and-so
    (1-based), as a machine that dies mid-run. ``sizes``: the number of graph nodes each packed
    message carried (1 per message when nothing is hosted).
    """

    def __init__(self, num_supernodes: int, crash_at_train: int | None = None) -> None:
        self.contexts = {
            sid: Context(
                1,
                1000 + sid,
                {"partition-id": sid, "num-partitions": num_supernodes},
                RecordDict(),
                {},
            )  # fmt: skip
            for sid in range(num_supernodes)
        }
        self.crash_at_train, self.trains = crash_at_train, 0
        self.messages = 0

    def get_node_ids(self) -> list[int]:
        return [1000 + sid for sid in self.contexts]

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.trains += 1
            if self.crash_at_train is not None and self.trains >= self.crash_at_train:
                raise Crash(f"crashed at train batch {self.trains}")
        self.messages += len(messages)
        return [self._answer(m) for m in messages]

    def _answer(self, msg: Message) -> Message:
        context = self.contexts[msg.metadata.dst_node_id - 1000]
        saved = RecordDict(dict(context.state.items()))
        try:
            return client_app.app(msg, context)
        except Exception as exc:  # Flower: an error reply, and the node's state is not kept
            context.state = saved
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)),
                           reply_to=msg)  # fmt: skip


SMALL = dict(num_nodes=6, num_rounds=4, local_steps=1, depth=1, img_size=16, batch_size=16,
             eval_every=2, lr_schedule="constant", lr=3e-3)  # fmt: skip


def _run(tmp: Path, name: str, per: int, crash_at_train: int | None = None, **keys) -> Path:
    cfg = ExperimentConfig(**{**SMALL, **keys, "nodes_per_supernode": per,
                              "out_dir": str(tmp / name)})  # fmt: skip
    cfg.validate()
    fed = InProcessFederation(num_supernodes(cfg), crash_at_train)
    return run_experiment(fed, cfg)  # type: ignore[arg-type]


CASES = {
    # broadcast messages, node dropout, lost links, node 0 failing every 3rd round
    "dsgd-faults": dict(node_dropout=0.2, link_drop=0.2, fail_every=3),
    # the async relay's waves on the simulated clock, pairwise exchanges and lost messages
    "ad-psgd-async": dict(
        strategy="ad-psgd",
        mode="async",
        slow_fraction=0.34,
        latency=0.5,
        node_dropout=0.15,
        link_drop=0.15,
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hosting_changes_no_number(tmp_path, case):
    alone = _run(tmp_path, "alone", 1, **CASES[case])
    hosted = _run(tmp_path, "hosted", 4, **CASES[case])  # SuperNode 0: nodes 0-3, 1: nodes 4-5
    assert (hosted / "metrics.jsonl").read_bytes() == (alone / "metrics.jsonl").read_bytes()
    for name in sorted(p.name for p in (alone / "final").iterdir()):
        assert (hosted / "final" / name).read_bytes() == (alone / "final" / name).read_bytes()
    faults = [json.loads((d / "summary.json").read_text())["faults"] for d in (alone, hosted)]
    assert faults[0] == faults[1]
    if case == "dsgd-faults":  # node 0 raised in round 3 alone; nodes 1-3, hosted with it, went on
        assert faults[1]["client_errors"] == 1 and faults[1]["failed_nodes"] == {"0": 1}


def test_resume_across_hosting_gives_the_uninterrupted_run(tmp_path):
    keys = dict(node_dropout=0.2, link_drop=0.2, checkpoint_every=2)
    whole = _run(tmp_path, "whole", 1, **keys)
    with pytest.raises(Crash):  # dies in round 3, after round 2's checkpoint
        _run(tmp_path, "cut", 1, crash_at_train=3, **keys)
    assert load_latest(tmp_path / "cut", {**ExperimentConfig(**SMALL, **keys).to_run_config(),
                       "out-dir": str(tmp_path / "cut")}).round == 2  # fmt: skip
    resumed = _run(tmp_path, "cut", 3, resume=True, **keys)  # resumed on 2 SuperNodes of 3
    assert (resumed / "metrics.jsonl").read_bytes() == (whole / "metrics.jsonl").read_bytes()


def test_one_flower_message_per_supernode(tmp_path):
    cfg = ExperimentConfig(**{**SMALL, "num_rounds": 2, "nodes_per_supernode": 4,
                              "out_dir": str(tmp_path / "run")})  # fmt: skip
    cfg.validate()
    fed = InProcessFederation(num_supernodes(cfg))
    run_experiment(fed, cfg)  # type: ignore[arg-type]
    # discovery 2 + identify 2 + configure 2 + 2 train rounds x 2 + final evaluation 2
    assert fed.messages == 12


def test_sections_round_trip_and_hosting_layout():
    a = RecordDict({"config": ConfigRecord({"round": 3})})
    b = RecordDict({"config": ConfigRecord({"round": 4}), "x": ConfigRecord({"y": 1})})
    back = unpack_sections(pack_sections({5: a, 2: b}, 8))
    assert list(back) == [2, 5]
    assert back[5]["config"]["round"] == 3 and back[2]["x"]["y"] == 1
    assert [list(hosted_by(g, 3, 8)) for g in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert supernodes_needed(8, 3) == 3 and supernodes_needed(8, 1) == 8
    cfg = ExperimentConfig(num_nodes=8, nodes_per_supernode=3)
    assert num_supernodes(cfg) == 3
    assert num_supernodes(ExperimentConfig(strategy="centralized", nodes_per_supernode=3)) == 1


def test_the_mod_gives_each_node_its_own_context_and_error():
    def handler(msg: Message, context: Context) -> Message:
        node = int(context.node_config["partition-id"])
        if node == 4:
            context.state["seen"] = ConfigRecord({"n": -1})  # must not be kept: it raises
            raise ValueError("node 4 broke")
        old = int(context.state.config_records["seen"]["n"]) if "seen" in context.state else 0
        context.state["seen"] = ConfigRecord({"n": old + node})
        return Message(RecordDict({"me": ConfigRecord({"node": node})}), reply_to=msg)

    supernode = Context(1, 7, {"partition-id": 1, "num-partitions": 2}, RecordDict(), {})
    content = pack_sections({n: RecordDict() for n in (3, 4, 5)}, 6)
    msg = Message(content, dst_node_id=7, message_type="train", group_id="1")
    for _ in range(2):
        reply = host_nodes(msg, supernode, handler)
    sections = unpack_sections(reply.content)
    assert sections[3]["me"]["node"] == 3 and sections[5]["me"]["node"] == 5
    assert "node 4 broke" in str(sections[4][ERROR]["reason"])
    state = supernode.state.config_records
    assert state["3|seen"]["n"] == 6 and state["5|seen"]["n"] == 10 and "4|seen" not in state
    # an unpacked message goes straight to the handler with the SuperNode's own context
    plain = Message(RecordDict(), dst_node_id=7, message_type="train", group_id="1")
    assert host_nodes(plain, supernode, handler).content["me"]["node"] == 1


def test_hosting_grid_refuses_what_it_cannot_relay(tmp_path):
    grid = HostingGrid(InProcessFederation(2), 6, 3)  # type: ignore[arg-type]
    assert sorted(grid.get_node_ids()) == [1, 2, 3, 4, 5, 6]
    with pytest.raises(NotImplementedError):
        grid.push_messages([])
    msg = Message(RecordDict(), dst_node_id=99, message_type="query", group_id="")
    with pytest.raises(ValueError, match="no graph node 98"):
        grid.send_and_receive([msg])


@pytest.mark.parametrize("value", [0, 9])
def test_nodes_per_supernode_is_refused_outside_one_to_num_nodes(value):
    with pytest.raises(ConfigError, match=f"nodes-per-supernode={value} is not allowed"):
        ExperimentConfig.from_run_config({"num-nodes": 8, "nodes-per-supernode": value})
