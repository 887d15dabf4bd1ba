"""The simulated network of a run: who takes part, who hears whom, what is lost, what travels.

The relay (``server_app``) and the plain loop (``sim/loop.py``) both deliver through
``Network.deliver`` and count bytes with ``Traffic``, so the two transports cannot disagree on
who hears whom. Nothing here touches Flower.

Round ``rnd`` (1-based) delivers what was sent in round ``rnd - 1`` over that round's graph
(``topology_at(cfg, rnd - 1)``); an algorithm that keeps copies of its neighbours' state (CHOCO)
hears every node of the run's union graph (``reach_topology``). Faults come from
``faults.fault_plan``: a dropped node gets nothing, a lost link delivers nothing.

Bytes (``Traffic``), per node and cumulative:

* ``sent``: what the node put on the network: its serialized message times the nodes it is
  unicast to (lost messages included: they used the link);
* ``received``: what was delivered to it;
* ``network``: the node's share of all traffic on the network, every transmission counted once:
  what it sent, plus what a server sent to it. Only the ``fedavg`` reference has a server: it
  uploads one model per node and broadcasts the average back to every node, and that broadcast is
  traffic too. Peer-to-peer strategies have no server, so their ``network`` equals ``sent``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from flower_p2p.faults import FaultPlan, deliver, fault_plan
from flower_p2p.schedules import reach_topology, topology_at
from strategies import GossipAlgorithm

CENTRALIZED_NODE = 0

M = TypeVar("M")


@dataclass
class Delivery(Generic[M]):
    """One round's deliveries: each active node's inbox, and the messages lost on links."""

    plan: FaultPlan
    inboxes: dict[int, dict[int, M]]
    lost: int


class Network:
    """Who takes part in a round and who hears whom, for one run's config and algorithm."""

    def __init__(self, cfg, algo: GossipAlgorithm) -> None:  # cfg: ExperimentConfig
        self.cfg, self.algo = cfg, algo
        centralized = cfg.strategy == "centralized"
        self.nodes: list[int] = [CENTRALIZED_NODE] if centralized else list(range(cfg.num_nodes))
        self.relays = algo.communicates and not centralized
        # fedavg: one upload to a (virtual) server, whose average comes back as one broadcast
        self.server_average = cfg.strategy == "fedavg"

    def senders(self, node: int, rnd: int) -> tuple[int, ...]:
        """Who ``node`` hears from among the messages sent in round ``rnd`` (none before 1)."""
        if not self.relays or rnd < 1:
            return ()
        if self.algo.keeps_neighbour_copies:
            return reach_topology(self.cfg).in_neighbours[node]
        return topology_at(self.cfg, rnd).in_neighbours[node]

    def receivers(self, node: int, rnd: int) -> tuple[int, ...]:
        """The nodes ``node``'s round-``rnd`` message is unicast to (fedavg: all, via a server)."""
        if not self.relays:
            return ()
        if self.algo.keeps_neighbour_copies:
            return reach_topology(self.cfg).out_neighbours[node]
        return topology_at(self.cfg, rnd).out_neighbours[node]

    def deliver(self, rnd: int, last_out: Mapping[int, M]) -> Delivery[M]:
        """Round ``rnd``'s inbox of each node taking part, from round ``rnd - 1``'s messages.

        ``last_out[j]`` is j's message, or for a ``per_receiver_messages`` algorithm
        ``{receiver: message}``.
        """
        plan = fault_plan(self.cfg, rnd)
        inboxes: dict[int, dict[int, M]] = {}
        lost = 0
        for p in self.nodes:
            if p in plan.dropped:
                continue
            sent = last_out
            if self.algo.per_receiver_messages:  # last_out[j]: {receiver: message}
                sent = {j: m[p] for j, m in last_out.items() if p in m}  # type: ignore[index]
            inboxes[p], n_lost = deliver(plan, p, self.senders(p, rnd - 1), sent)
            lost += n_lost
        return Delivery(plan=plan, inboxes=inboxes, lost=lost)


@dataclass
class Traffic:
    """Cumulative bytes per node: sent, received, and its share of the network's traffic."""

    sent: dict[int, int] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)
    from_server: dict[int, int] = field(default_factory=dict)

    @classmethod
    def start(cls, nodes: list[int]) -> Traffic:
        """Zero bytes for every node."""
        return cls(*(dict.fromkeys(nodes, 0) for _ in range(3)))

    def count_sent(self, node: int, payload: int, receivers: int) -> None:
        """``node`` unicast a ``payload``-byte message to ``receivers`` nodes (or the server)."""
        self.sent[node] += payload * receivers

    def count_delivery(self, node: int, inbox_payloads: list[int], broadcast: int = 0) -> None:
        """Bytes delivered to ``node``: its neighbours' messages, or a server's broadcast."""
        if broadcast:
            self.received[node] += broadcast
            self.from_server[node] += broadcast
        else:
            self.received[node] += sum(inbox_payloads)

    def network(self, node: int) -> int:
        """``node``'s share of the network's traffic: what it sent plus what a server sent it."""
        return self.sent[node] + self.from_server[node]

    def record(self, node: int) -> dict[str, int]:
        """The node's cumulative byte counts, as metrics.jsonl stores them."""
        return {"bytes_sent": self.sent[node], "bytes_received": self.received[node],
                "network_bytes": self.network(node)}  # fmt: skip

    def to_dict(self) -> dict:
        """For checkpoints (JSON keys are strings)."""
        return {name: {str(p): v for p, v in getattr(self, name).items()}
                for name in ("sent", "received", "from_server")}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> Traffic:
        """Inverse of ``to_dict``."""
        return cls(*({int(p): v for p, v in d[name].items()}
                     for name in ("sent", "received", "from_server")))  # fmt: skip

    def summary(self) -> dict:
        """Totals and per-node means for summary.json."""
        n = max(len(self.sent), 1)
        total = sum(self.network(p) for p in self.sent)
        return {
            "total_bytes_sent": int(sum(self.sent.values())),
            "mean_bytes_sent_per_node": sum(self.sent.values()) / n,
            "mean_bytes_received_per_node": sum(self.received.values()) / n,
            "network_bytes": int(total),
            "network_bytes_per_node": total / n,
        }
