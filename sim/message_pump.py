"""One scan per sweep: the simulation engine's message pump, linear in nodes instead of quadratic.

Flower 1.42's simulation engine hands messages to its Ray actors from a thread
(``vce_api.add_messages_to_queue``) that, every 0.1 s, asks the in-memory LinkState for the
next message of each node in turn (``get_message_ins(node_id, limit=1)``), and every such call
scans, and validates, every stored message. A round of n nodes stores n messages, so one sweep
costs n x n validations: at 256 nodes most of a round went there, at 1,024 nodes minutes
(``python -m bench.linkstate``).

``install`` replaces that thread's function with one that scans the store once per sweep and
hands out, as before, at most one undelivered message per node, each validated and marked
delivered exactly as ``get_message_ins`` does. It touches nothing else, and only the engine this
process runs (``python -m sim``): a SuperLink started by ``flwr run`` keeps Flower's own pump.
Anything unexpected (another Flower, another LinkState) leaves Flower's pump in place.
"""

from __future__ import annotations

import threading
from queue import Queue
from typing import Any

FLOWER_PUMP: Any = None  # Flower's own function, kept for other LinkStates


def _undelivered_once(state: Any, nodes: set[int]) -> list:
    """At most one undelivered message per node of ``nodes``: one scan of the store."""
    from flwr.supercore.date import now

    with state.lock:
        ids = list(state.message_ins_store)
        state._check_stored_messages(set(ids))  # expiry, federation: as get_message_ins does
        picked, served = [], set()
        for msg_id in ids:
            msg = state.message_ins_store.get(msg_id)
            if msg is None or msg.metadata.delivered_at != "":
                continue
            dst = msg.metadata.dst_node_id
            if dst in nodes and dst not in served:
                served.add(dst)
                picked.append(msg)
        delivered_at = now().isoformat()
        for msg in picked:
            msg.metadata.delivered_at = delivered_at
    return picked


def add_messages_to_queue(
    state: Any, queue: Queue, nodes_mapping: dict, f_stop: threading.Event
) -> None:
    """Flower's pump, with one scan of the store per sweep (see the module docstring)."""
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    if not isinstance(state, InMemoryLinkState) or not _has_internals(state):
        FLOWER_PUMP(state, queue, nodes_mapping, f_stop)
        return
    nodes = set(nodes_mapping)
    while not f_stop.is_set():
        for msg in _undelivered_once(state, nodes):
            queue.put(msg)
        f_stop.wait(0.1)


def _has_internals(state: Any) -> bool:
    return all(hasattr(state, a) for a in ("lock", "message_ins_store", "_check_stored_messages"))


def install() -> bool:
    """Use the one-scan pump in this process's simulation engine; False where Flower differs."""
    global FLOWER_PUMP
    try:
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.supercore.date import now  # noqa: F401  (used by the pump)
    except ImportError:
        return False
    if vce_api.add_messages_to_queue is add_messages_to_queue:
        return True
    if not callable(getattr(vce_api, "add_messages_to_queue", None)):
        return False
    FLOWER_PUMP = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = add_messages_to_queue
    return True


__all__ = ["add_messages_to_queue", "install"]
