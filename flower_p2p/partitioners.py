"""Named partitioners (``partitioner=<name>``): every horizontal one of flwr-datasets, and ours.

Each factory takes the run config, the label column, the number of classes and the column to
partition by (``partition-by``, resolved against the dataset by ``data.load_data``; the label
column when ``None``) and returns an unfitted flwr-datasets ``Partitioner``. Keys a partitioner
reads: ``alpha`` (dirichlet, inner-dirichlet), ``classes-per-node`` (pathological, unseen,
distribution), ``shards-per-node``/``shard-size`` (shard), ``node-sizes``/``sigma`` (size,
inner-dirichlet), ``sigma``/``preassigned-per-class`` (distribution), ``group-size``/``group-mode``
(grouped-natural-id), ``strictness`` (continuous), ``partition-by`` (natural-id,
grouped-natural-id, continuous).

flwr-datasets' vertical partitioners (``VerticalEvenPartitioner``, ``VerticalSizePartitioner``)
split columns, not samples: a node here needs whole images with their labels, so they are not
offered. ``IdToSizeFncPartitioner`` is the base of linear/square/exponential (and needs a Python
function, which ``partitioner=file.py:Class`` accepts).
"""

from __future__ import annotations

import numpy as np
from flwr_datasets.partitioner import (
    ContinuousPartitioner,
    DirichletPartitioner,
    DistributionPartitioner,
    ExponentialPartitioner,
    GroupedNaturalIdPartitioner,
    IidPartitioner,
    InnerDirichletPartitioner,
    LinearPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
    ShardPartitioner,
    SizePartitioner,
    SquarePartitioner,
)

from flower_p2p.config import ExperimentConfig
from flower_p2p.registry import ConfigError, Registry
from flower_p2p.unseen import unseen_partitioner

PARTITIONERS: Registry = Registry("partitioner")
# Partitioners that cut contiguous row ranges: the rows are shuffled with the seed first, so
# that only sizes, not the file order (e.g. a dataset sorted by label), shape the partitions.
BY_POSITION = ("linear", "square", "exponential", "size")
# Partitioners whose ids come from a column; partition-by=auto looks for these names.
NATURAL_ID_COLUMNS = ("writer_id", "user_id", "client_id", "speaker_id", "subject_id", "domain")
NATURAL_ID = ("natural-id", "grouped-natural-id")
GROUP_MODES = ("allow-smaller", "allow-bigger", "drop-reminder", "strict")
NODE_SIZE_LAWS = ("equal", "lognormal")
# Streams of the seed that partitioners draw from besides flwr-datasets' own (sizes, shares).
_SIZES, _SHARES = 1, 2


@PARTITIONERS.register("iid")
def _iid(cfg: ExperimentConfig, label: str, num_classes: int, by: str | None = None) -> Partitioner:
    return IidPartitioner(num_partitions=cfg.num_nodes)


@PARTITIONERS.register("dirichlet")
def _dirichlet(
    cfg: ExperimentConfig, label: str, num_classes: int, by: str | None = None
) -> Partitioner:
    # min_partition_size=1: tiny nodes are part of what a researcher studies, not an error.
    return DirichletPartitioner(
        num_partitions=cfg.num_nodes,
        partition_by=label,
        alpha=cfg.alpha,
        min_partition_size=1,
        seed=cfg.seed,
    )


@PARTITIONERS.register("pathological")
def _pathological(
    cfg: ExperimentConfig, label: str, num_classes: int, by: str | None = None
) -> Partitioner:
    _classes_in_range(cfg, num_classes)
    return PathologicalPartitioner(
        num_partitions=cfg.num_nodes,
        partition_by=label,
        num_classes_per_partition=cfg.classes_per_node,
        class_assignment_mode="random",
        seed=cfg.seed,
    )


@PARTITIONERS.register("unseen")
def _unseen(
    cfg: ExperimentConfig, label: str, num_classes: int, by: str | None = None
) -> Partitioner:
    # Every class held by some node, each node exactly classes-per-node of them (unseen.py).
    return unseen_partitioner(
        cfg.num_nodes, num_classes, cfg.classes_per_node, cfg.unseen_layout, label, cfg.seed
    )


@PARTITIONERS.register("shard")
def _shard(
    cfg: ExperimentConfig, label: str, num_classes: int, by: str | None = None
) -> Partitioner:
    # Sorted by label, cut into shards, shards dealt out: McMahan et al.'s pathological split.
    # The remainder that fills no whole shard is left out (flwr-datasets' keep_incomplete_shard).
    return ShardPartitioner(
        num_partitions=cfg.num_nodes,
        partition_by=label,
        num_shards_per_partition=cfg.shards_per_node,
        shard_size=cfg.shard_size or None,
        seed=cfg.seed,
    )


@PARTITIONERS.register("inner-dirichlet")
def _inner_dirichlet(
    cfg: ExperimentConfig, label: str, num_classes: int, by: str | None = None
) -> Partitioner:
    # Sizes are fixed when the dataset is known (num_rows); see SizedInnerDirichlet.
    return SizedInnerDirichlet(cfg, label)


@PARTITIONERS.register("linear")
def _linear(
    cfg: ExperimentConfig, label: str, num_classes: int, by: str | None = None
) -> Partitioner:
    return LinearPartitioner(num_partitions=cfg.num_nodes)


@PARTITIONERS.register("square")
def _square(
    cfg: ExperimentConfig, label: str, num_classes: int, by: str | None = None
) -> Partitioner:
    return SquarePartitioner(num_partitions=cfg.num_nodes)


@PARTITIONERS.register("exponential")
def _exponential(
    cfg: ExperimentConfig, label: str, num_classes: int, by: str | None = None
) -> Partitioner:
    return ExponentialPartitioner(num_partitions=cfg.num_nodes)


@PARTITIONERS.register("size")
def _size(
    cfg: ExperimentConfig, label: str, num_classes: int, by: str | None = None
) -> Partitioner:
    return SizedBy(cfg)


@PARTITIONERS.register("natural-id")
def _natural_id(
    cfg: ExperimentConfig, label: str, num_classes: int, by: str | None = None
) -> Partitioner:
    return NaturalIdPartitioner(partition_by=by or label)


@PARTITIONERS.register("grouped-natural-id")
def _grouped_natural_id(
    cfg: ExperimentConfig, label: str, num_classes: int, by: str | None = None
) -> Partitioner:
    return GroupedNaturalIdPartitioner(
        partition_by=by or label, group_size=cfg.group_size, mode=cfg.group_mode
    )


@PARTITIONERS.register("continuous")
def _continuous(
    cfg: ExperimentConfig, label: str, num_classes: int, by: str | None = None
) -> Partitioner:
    return ContinuousPartitioner(
        num_partitions=cfg.num_nodes,
        partition_by=by or label,
        strictness=cfg.strictness,
        seed=cfg.seed,
    )


@PARTITIONERS.register("distribution")
def _distribution(
    cfg: ExperimentConfig, label: str, num_classes: int, by: str | None = None
) -> Partitioner:
    n, k = cfg.num_nodes, cfg.classes_per_node
    _classes_in_range(cfg, num_classes)
    if n % num_classes:
        raise ConfigError(
            "num-nodes",
            n,
            f"a multiple of the {num_classes} classes for partitioner=distribution "
            "(flwr-datasets deals each class to the same number of nodes)",
        )
    # Li et al.'s power law, as in flwr-datasets' own example: log-normal shares per class.
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, _SHARES]))
    shares = rng.lognormal(0.0, cfg.sigma, (num_classes, k * n // num_classes))
    return DistributionPartitioner(
        distribution_array=shares,
        num_partitions=n,
        num_unique_labels_per_partition=k,
        partition_by=label,
        preassigned_num_samples_per_label=cfg.preassigned_per_class,
        seed=cfg.seed,
    )


def _classes_in_range(cfg: ExperimentConfig, num_classes: int) -> None:
    if not 1 <= cfg.classes_per_node <= num_classes:
        raise ConfigError(
            "classes-per-node", cfg.classes_per_node, f"an integer in [1, {num_classes}]"
        )


def node_sizes(spec: str, num_nodes: int, total: int, sigma: float, seed: int) -> list[int]:
    """Samples per node (summing to ``total``, each >= 1) under the ``node-sizes`` law.

    ``equal``; ``lognormal`` (weights exp(N(0, sigma^2)) from the seed); or comma-separated
    positive weights, one per node (``1,1,2,4``). Rounded by largest remainder.
    """
    weights = size_weights(spec, num_nodes, sigma, seed)
    if total < num_nodes:
        raise ConfigError("num-nodes", num_nodes, f"at most {total} (training samples)")
    # one sample each first, so no node is empty however skewed the law
    raw = weights / weights.sum() * (total - num_nodes)
    sizes = np.floor(raw).astype(int)
    rest = total - num_nodes - sizes.sum()
    sizes[np.argsort(-(raw - sizes), kind="stable")[:rest]] += 1
    return [int(s) + 1 for s in sizes]


def size_weights(spec: str, num_nodes: int, sigma: float, seed: int) -> np.ndarray:
    """The relative node sizes of ``node-sizes`` (ConfigError for a bad spec)."""
    if spec == "equal":
        return np.ones(num_nodes)
    if spec == "lognormal":
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SIZES]))
        return rng.lognormal(0.0, sigma, num_nodes)
    allowed = (
        f"{', '.join(NODE_SIZE_LAWS)}, or {num_nodes} comma-separated positive weights "
        "(one per node, e.g. 1,1,2,4)"
    )
    try:
        weights = np.array([float(w) for w in spec.split(",")])
    except ValueError as err:
        raise ConfigError("node-sizes", spec, allowed) from err
    if len(weights) != num_nodes or not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ConfigError("node-sizes", spec, allowed)
    return weights


class _SizedLazily(Partitioner):
    """A flwr-datasets partitioner built on first use, its node sizes drawn from ``node-sizes``.

    The sizes depend on the dataset's length, known only once the dataset is attached.
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__()
        self._cfg = cfg
        self._inner: Partitioner | None = None

    @property
    def num_partitions(self) -> int:
        """Number of partitions (nodes)."""
        return self._cfg.num_nodes

    def _build(self, sizes: list[int]) -> Partitioner:
        raise NotImplementedError

    def load_partition(self, partition_id: int):  # -> datasets.Dataset
        """Partition ``partition_id`` of the sizes the law gives for this dataset."""
        if self._inner is None:
            c = self._cfg
            sizes = node_sizes(c.node_sizes, c.num_nodes, len(self.dataset), c.sigma, c.seed)
            self._inner = self._build(sizes)
            self._inner.dataset = self.dataset
        return self._inner.load_partition(partition_id)


class SizedBy(_SizedLazily):
    """flwr-datasets' ``SizePartitioner`` with sizes from ``node-sizes`` over the whole dataset."""

    def _build(self, sizes: list[int]) -> Partitioner:
        return SizePartitioner(sizes)


class SizedInnerDirichlet(_SizedLazily):
    """flwr-datasets' ``InnerDirichletPartitioner``: sizes from ``node-sizes``, labels Dirichlet."""

    def __init__(self, cfg: ExperimentConfig, label: str) -> None:
        super().__init__(cfg)
        self._label = label

    def _build(self, sizes: list[int]) -> Partitioner:
        c = self._cfg
        return InnerDirichletPartitioner(
            partition_sizes=sizes, partition_by=self._label, alpha=c.alpha, seed=c.seed
        )
