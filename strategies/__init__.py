"""Gossip algorithms: pure, transport-free definitions, one registry name each."""

from __future__ import annotations

from strategies.ad_psgd import ADPSGD
from strategies.base import GossipAlgorithm, Params, State, weighted_sum
from strategies.choco import Choco
from strategies.compression import COMPRESSORS, Compressor, create_compressor
from strategies.dsgd import DSGD
from strategies.fedavg import FedAvg
from strategies.gradient_tracking import GradientTracking
from strategies.k_gt import KGT, KGTGradient
from strategies.local import LocalOnly
from strategies.push_sum import PushSum
from strategies.qg_dsgdm import QGDSGDm
from strategies.registry import Registry
from strategies.relay_sum import RelaySum

STRATEGIES: Registry = Registry("strategy")
STRATEGIES.register("dsgd")(DSGD)
STRATEGIES.register("local")(LocalOnly)
STRATEGIES.register("choco")(Choco)
STRATEGIES.register("gradient-tracking")(GradientTracking)
STRATEGIES.register("push-sum")(PushSum)
STRATEGIES.register("relay-sum")(RelaySum)
STRATEGIES.register("k-gt")(KGT)
STRATEGIES.register("k-gt-grad")(KGTGradient)
STRATEGIES.register("qg-dsgdm")(QGDSGDm)
# Asynchronous only (mode=async): pairwise averaging at the end of every activation.
STRATEGIES.register("ad-psgd")(ADPSGD)
# Not peer-to-peer: the server-average reference, computed at each node over all nodes.
STRATEGIES.register("fedavg")(FedAvg)

# References that are not gossip: run by the harness itself, same data and optimizer steps.
REFERENCES = ("centralized",)


def strategy_names() -> list[str]:
    """Every value the ``strategy`` key accepts."""
    return [*STRATEGIES.names(), *REFERENCES]


def create_strategy(name: str, **kwargs: object) -> GossipAlgorithm:
    """Instantiate the gossip algorithm registered as ``name`` (``kwargs``: its parameters)."""
    return STRATEGIES.get(name)(**kwargs)


__all__ = [
    "ADPSGD",
    "COMPRESSORS",
    "Choco",
    "Compressor",
    "DSGD",
    "FedAvg",
    "GossipAlgorithm",
    "GradientTracking",
    "KGT",
    "KGTGradient",
    "LocalOnly",
    "PushSum",
    "QGDSGDm",
    "RelaySum",
    "create_compressor",
    "Params",
    "State",
    "STRATEGIES",
    "REFERENCES",
    "create_strategy",
    "strategy_names",
    "weighted_sum",
]
