"""The simulation's message pump: one scan per sweep, at most one message per node, as Flower's."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from sim import message_pump


class FakeState:
    """The LinkState internals the pump reads: a lock, the store, its validation."""

    def __init__(self, messages: list) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = {m.metadata.message_id: m for m in messages}
        self.checked: list[set] = []

    def _check_stored_messages(self, ids: set) -> None:
        self.checked.append(ids)
        for i in ids:  # like Flower: invalid (here: expired) messages are deleted
            if self.message_ins_store[i].expired:
                del self.message_ins_store[i]


def _msg(mid: str, dst: int, delivered: str = "", expired: bool = False):
    meta = SimpleNamespace(message_id=mid, dst_node_id=dst, delivered_at=delivered)
    return SimpleNamespace(metadata=meta, expired=expired)


def test_one_scan_hands_out_one_undelivered_message_per_node_and_marks_it():
    msgs = [_msg("a", 1), _msg("b", 1), _msg("c", 2, delivered="earlier"), _msg("d", 3),
            _msg("e", 4, expired=True), _msg("f", 9)]  # fmt: skip
    state = FakeState(msgs)
    got = message_pump._undelivered_once(state, {1, 2, 3, 4})
    assert [m.metadata.message_id for m in got] == ["a", "d"]  # node 1's first, node 3's
    assert all(m.metadata.delivered_at for m in got)
    assert len(state.checked) == 1  # validated once, not once per node
    assert "e" not in state.message_ins_store  # expired: dropped, never handed out
    again = message_pump._undelivered_once(state, {1, 2, 3, 4})
    assert [m.metadata.message_id for m in again] == ["b"]  # node 1's next, one per sweep
    assert message_pump._undelivered_once(state, {1, 2, 3, 4}) == []


def test_installed_in_the_engine_this_flower_runs():
    from flwr.server.superlink.fleet.vce import vce_api

    assert message_pump.install()
    assert vce_api.add_messages_to_queue is message_pump.add_messages_to_queue
    assert message_pump.FLOWER_PUMP is not None and message_pump.install()  # idempotent
