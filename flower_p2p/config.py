"""One validated experiment config, built from Flower's ``context.run_config``.

Keys are kebab-case as in ``[tool.flwr.app.config]``; every error names the key, the bad value
and what is allowed, and is raised before any training starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from flower_p2p.registry import ConfigError

OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")
PRETRAINED_KEYWORDS = ("none", "hub")


@dataclass(frozen=True)
class ExperimentConfig:
    """Every knob of one experiment (field ``num_nodes`` <-> run-config key ``num-nodes``)."""

    num_nodes: int = 8
    num_rounds: int = 90
    strategy: str = "dsgd"
    gamma: float = 0.1
    compressor: str = "top-k"
    compress_fraction: float = 0.1
    topology: str = "ring"
    mixing: str = "metropolis-hastings"
    edge_prob: float = 0.3
    degree: int = 3
    small_world_k: int = 4
    small_world_p: float = 0.2
    dataset: str = "digits"
    image_column: str = "auto"
    label_column: str = "auto"
    test_fraction: float = 0.2
    partitioner: str = "dirichlet"
    alpha: float = 0.5
    classes_per_node: int = 2
    unseen_layout: str = "neighbours-share"
    partition_by: str = "auto"
    shards_per_node: int = 2
    shard_size: int = 0
    node_sizes: str = "lognormal"
    sigma: float = 1.0
    preassigned_per_class: int = 5
    group_size: int = 2
    group_mode: str = "allow-smaller"
    strictness: float = 0.5
    placement: str = "random"
    feature_skew: str = "none"
    skew_domains: int = 0
    skew_strength: float = 1.0
    model: str = "vit_tiny_patch16_224"
    img_size: int = 32
    patch_size: int = 8
    depth: int = 4
    window_size: int = 4
    pretrained: str = "none"
    finetune: str = "full"
    share: str = "all"
    last_k: int = 1
    lora_rank: int = 8
    lora_alpha: int = 16
    prefix_cache: str = "auto"
    cache_max_mb: int = 1024
    memory_limit_gb: float = 0.0
    local_epochs: int = 1
    local_steps: int = 2
    restricted_softmax: float = 1.0
    optimizer: str = "adamw"
    momentum: float = 0.9
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    weight_decay: float = 0.05
    batch_size: int = 32
    eval_every: int = 3
    seed: int = 0
    out_dir: str = ""
    overwrite: bool = False
    node_dropout: float = 0.0
    link_drop: float = 0.0
    straggler: float = 0.0
    straggler_fraction: float = 0.5
    fail_every: int = 0
    checkpoint_every: int = 0
    resume: bool = False
    mode: str = "sync"
    step_time: float = 1.0
    slow_fraction: float = 0.0
    slowdown: float = 4.0
    speed_spread: float = 0.0
    latency: float = 0.0
    latency_spread: float = 0.0
    nodes_per_supernode: int = 1

    @classmethod
    def keys(cls) -> list[str]:
        """All run-config keys, kebab-case."""
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> ExperimentConfig:
        """Parse and validate a run config; unknown keys and bad values raise ConfigError."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            if key not in known:
                raise ConfigError(key, raw, f"a known key: {', '.join(known)}")
            f = known[key]
            values[f.name] = _coerce(key, raw, type(getattr(cls(), f.name)))
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_run_config(self) -> dict[str, Any]:
        """The config as Flower run-config values (kebab-case keys)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A copy with some fields changed (snake_case names), validated."""
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every value against what is allowed; registries name the allowed choices."""
        # Local imports: the registries live next to the code they describe.
        from flower_p2p.data import check_dataset_spec
        from flower_p2p.models import FINETUNE_MODES, PARAM_GROUPS, check_model_name
        from flower_p2p.schedules import SCHEDULES, check_schedule, is_schedule
        from flower_p2p.topology import GRAPHS, MIXINGS
        from flower_p2p.unseen import UNSEEN_LAYOUTS
        from strategies import strategy_names

        _positive("num-nodes", self.num_nodes, minimum=1)
        _positive("num-rounds", self.num_rounds)
        if self.strategy not in strategy_names():
            raise ConfigError("strategy", self.strategy, f"one of {', '.join(strategy_names())}")
        from flower_p2p.node import algorithm_for

        algo = algorithm_for(self)  # strategy hyperparameters (gamma, compressor, ...) checked
        if not algo.tolerates_lost_messages:
            for key in ("link-drop", "node-dropout", "fail-every"):
                if getattr(self, key.replace("-", "_")):
                    raise ConfigError(
                        key,
                        getattr(self, key.replace("-", "_")),
                        f"0 with strategy={self.strategy}: its nodes keep copies of their "
                        "neighbours' public models in sync by increments, and one lost message "
                        "desynchronises a copy for the rest of the run (dsgd, push-sum and "
                        "gradient-tracking run with faults)",
                    )
        if self.strategy not in ("centralized", "local") and self.num_nodes < 2:
            raise ConfigError("num-nodes", self.num_nodes, f"at least 2 for {self.strategy}")
        if (
            self.topology not in GRAPHS
            and not is_schedule(self.topology)
            and not _looks_like_path(self.topology)
        ):
            known = ", ".join([*GRAPHS, *SCHEDULES])
            raise ConfigError(
                "topology", self.topology, f"one of {known} or an edge-list file path"
            )
        if _looks_like_path(self.topology) and not Path(self.topology).expanduser().is_file():
            raise ConfigError("topology", self.topology, "an existing edge-list file")
        MIXINGS.get(self.mixing)
        if self.strategy == "relay-sum" and is_schedule(self.topology):
            raise ConfigError(
                "topology",
                self.topology,
                "a static undirected graph with strategy=relay-sum: it relays over a spanning tree "
                "of the graph, and a tree must stay the same and carry messages both ways",
            )
        if self.strategy not in ("centralized", "local"):
            check_schedule(self)
        from flower_p2p.partitioning import check_partition_keys

        check_partition_keys(self)
        if not self.alpha > 0:
            raise ConfigError("alpha", self.alpha, "a Dirichlet concentration > 0")
        _positive("classes-per-node", self.classes_per_node)
        UNSEEN_LAYOUTS.get(self.unseen_layout)
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError("test-fraction", self.test_fraction, "a fraction in (0, 1)")
        check_dataset_spec(self.dataset)
        check_model_name(self.model)
        # 0 keeps the architecture's own value (e.g. a hub checkpoint's full depth).
        for key in ("img-size", "patch-size", "depth"):
            _positive(key, getattr(self, key.replace("-", "_")), minimum=0)
        _positive("window-size", self.window_size)
        _positive("local-epochs", self.local_epochs)
        _positive("local-steps", self.local_steps, minimum=0)
        if self.img_size and self.patch_size and self.img_size % self.patch_size:
            raise ConfigError(
                "patch-size", self.patch_size, f"a divisor of img-size={self.img_size}"
            )
        if self.pretrained not in PRETRAINED_KEYWORDS:
            path = Path(self.pretrained).expanduser()
            if not path.is_file():
                raise ConfigError(
                    "pretrained",
                    self.pretrained,
                    "none, hub, or an existing checkpoint file (.safetensors, .pth, .pt, .bin)",
                )
        FINETUNE_MODES.get(self.finetune)
        bad = [g for g in self.share.split(",") if g.strip() not in PARAM_GROUPS]
        if bad or not self.share.strip():
            raise ConfigError(
                "share", self.share, f"comma-separated groups of {', '.join(PARAM_GROUPS)}"
            )
        for key in ("last-k", "lora-rank", "lora-alpha", "cache-max-mb"):
            _positive(key, getattr(self, key.replace("-", "_")))
        if not self.memory_limit_gb >= 0:  # also refuses NaN
            raise ConfigError(
                "memory-limit-gb",
                self.memory_limit_gb,
                "0 (what the machine has available) or a positive size in GiB",
            )
        from flower_p2p.prefix_cache import check_mode

        check_mode(self.prefix_cache)
        if not 0.0 <= self.restricted_softmax <= 1.0:
            raise ConfigError(
                "restricted-softmax",
                self.restricted_softmax,
                "a scale in [0, 1] for the logits of a node's missing classes (1: plain "
                "cross-entropy)",
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError("optimizer", self.optimizer, f"one of {', '.join(OPTIMIZERS)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError("momentum", self.momentum, "a momentum coefficient in [0, 1)")
        if self.strategy == "qg-dsgdm" and self.optimizer != "sgd":
            raise ConfigError(
                "optimizer",
                self.optimizer,
                "sgd with strategy=qg-dsgdm: its quasi-global momentum replaces the optimizer's "
                "own (AdamW would add a second momentum and normalise the first)",
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError("lr-schedule", self.lr_schedule, f"one of {', '.join(LR_SCHEDULES)}")
        if not self.lr > 0:
            raise ConfigError("lr", self.lr, "a learning rate > 0")
        if self.weight_decay < 0:
            raise ConfigError("weight-decay", self.weight_decay, "a value >= 0")
        _positive("batch-size", self.batch_size)
        _positive("eval-every", self.eval_every)
        if self.seed < 0:
            raise ConfigError("seed", self.seed, "an integer >= 0")
        for key in ("node-dropout", "link-drop", "straggler"):
            prob = getattr(self, key.replace("-", "_"))
            if not 0.0 <= prob < 1.0:
                raise ConfigError(key, prob, "a probability in [0, 1)")
        if not 0.0 < self.straggler_fraction <= 1.0:
            raise ConfigError("straggler-fraction", self.straggler_fraction, "a fraction in (0, 1]")
        _positive("fail-every", self.fail_every, minimum=0)
        _positive("checkpoint-every", self.checkpoint_every, minimum=0)
        if self.resume and not self.out_dir:
            raise ConfigError("resume", self.resume, "false, or true with out-dir naming the run")
        from flower_p2p.clock import check_clock

        check_clock(self)
        if not 1 <= self.nodes_per_supernode <= max(1, self.num_nodes):
            raise ConfigError(
                "nodes-per-supernode", self.nodes_per_supernode,
                f"an integer in [1, num-nodes={self.num_nodes}]: the graph nodes each SuperNode "
                "hosts (1: one SuperNode per graph node)",
            )  # fmt: skip


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or spec.endswith((".txt", ".edges", ".edgelist", ".csv"))


def _positive(key: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise ConfigError(key, value, f"an integer >= {minimum}")


def _coerce(key: str, raw: Any, kind: type) -> Any:
    """Accept TOML-typed values; ints for floats; refuse everything else by name."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        raise ConfigError(key, raw, "true or false")
    if kind is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            if isinstance(raw, float) and raw.is_integer():
                return int(raw)
            raise ConfigError(key, raw, "an integer")
        return raw
    if kind is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(key, raw, "a number")
        return float(raw)
    if not isinstance(raw, str):
        raise ConfigError(key, raw, "a string")
    return raw
