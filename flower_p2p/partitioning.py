"""From a run config and a training split to the rows every node holds, checked and placed.

Every partitioner, named or the user's, partitions the training split with a row-id column added,
so that what it returns is read back as row indices: they must be one list per node, disjoint
and in range, and no node may be empty. Placement (``placement.py``) then decides which node
holds which partition. ``data.load_data`` selects the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import Partitioner

from flower_p2p.config import ExperimentConfig
from flower_p2p.partitioners import BY_POSITION, PARTITIONERS, size_weights
from flower_p2p.placement import check_graph, check_placement_strategy, place, placement_edges
from flower_p2p.registry import ConfigError
from flower_p2p.user_partition import (
    build_user_partitioner,
    is_user_spec,
    read_json_rows,
    split_spec,
)

ROW = "__flower_p2p_row__"  # the row-id column partitioners see; never in a node's data


@dataclass(frozen=True)
class NodeRows:
    """Training rows of each node (already placed) and the placement itself."""

    rows: tuple[tuple[int, ...], ...]
    placement: tuple[int, ...]  # node i holds partition placement[i]


def check_partition_keys(cfg: ExperimentConfig) -> None:
    """The config-only checks of the partition keys (``ExperimentConfig.validate`` calls this)."""
    from flower_p2p.feature_skew import check_feature_skew
    from flower_p2p.partitioners import GROUP_MODES

    if is_user_spec(cfg.partitioner):
        split_spec(cfg.partitioner)
    elif cfg.partitioner not in PARTITIONERS:
        raise ConfigError(
            "partitioner", cfg.partitioner,
            f"one of {', '.join(PARTITIONERS.names())}, or your own: path/to/file.py:ClassName "
            "or path/to/partition.json",
        )  # fmt: skip
    for key, minimum in (("shards-per-node", 1), ("shard-size", 0), ("group-size", 1),
                         ("preassigned-per-class", 0)):  # fmt: skip
        value = getattr(cfg, key.replace("-", "_"))
        if value < minimum:
            raise ConfigError(key, value, f"an integer >= {minimum}")
    if not cfg.sigma >= 0:
        raise ConfigError("sigma", cfg.sigma, "a log-normal sigma >= 0")
    size_weights(cfg.node_sizes, cfg.num_nodes, cfg.sigma, cfg.seed)
    if cfg.group_mode not in GROUP_MODES:
        raise ConfigError("group-mode", cfg.group_mode, f"one of {', '.join(GROUP_MODES)}")
    if not 0.0 <= cfg.strictness <= 1.0:
        raise ConfigError("strictness", cfg.strictness, "a value in [0, 1]")
    if not cfg.partition_by.strip():
        raise ConfigError("partition-by", cfg.partition_by, "auto or a column name")
    check_placement_strategy(cfg.placement, cfg.strategy, cfg.topology)
    check_feature_skew(cfg.feature_skew, cfg.skew_domains, cfg.skew_strength, cfg.num_nodes)


def node_rows(
    cfg: ExperimentConfig, train: Dataset, label_column: str, num_classes: int, by: str | None
) -> NodeRows:
    """Each node's training rows under ``cfg`` (partitioner, checks, placement)."""
    n, spec = cfg.num_nodes, cfg.partitioner
    if spec.endswith(".json"):
        rows = read_json_rows(spec, n)
    else:
        if is_user_spec(spec):
            partitioner = build_user_partitioner(spec, n, label_column, num_classes, cfg.seed)
        else:
            partitioner = PARTITIONERS.get(spec)(cfg, label_column, num_classes, by)
        source = train.add_column(ROW, list(range(len(train))))
        if spec in BY_POSITION:
            source = source.shuffle(seed=cfg.seed)
        partitioner.dataset = source
        rows = _rows_of(partitioner, cfg, by)
    check_rows(rows, len(train), spec)
    labels = np.asarray(train[label_column])
    hists = np.stack([np.bincount(labels[r], minlength=num_classes) for r in rows])
    perm = list(range(n))
    edges = placement_edges(cfg) if cfg.placement != "random" else None
    if edges is not None:
        check_graph(cfg.placement, edges, n, cfg.topology)
        perm = place(hists, edges, cfg.placement, cfg.seed)
    return NodeRows(tuple(tuple(rows[p]) for p in perm), tuple(perm))


def _rows_of(partitioner: Partitioner, cfg: ExperimentConfig, by: str | None) -> list[list[int]]:
    spec, n = cfg.partitioner, cfg.num_nodes
    user = is_user_spec(spec)
    try:
        count = partitioner.num_partitions
        if count != n:
            where = f" (distinct values of partition-by column {by!r})" if by else ""
            raise ConfigError(
                "num-nodes",
                n,
                f"{count}, the number of partitions partitioner={spec} makes of this "
                f"dataset{where}",
            )
        parts = [partitioner.load_partition(i) for i in range(n)]
    except ConfigError:
        raise
    except ValueError as err:  # flwr-datasets says why a partitioning is impossible
        raise ConfigError("partitioner", spec, f"a feasible partitioning: {err}") from err
    except Exception as err:
        if not user:
            raise
        raise ConfigError(
            "partitioner", spec,
            f"a partitioner that loads {n} partitions ({type(err).__name__}: {err})",
        ) from err  # fmt: skip
    missing = [i for i, p in enumerate(parts) if ROW not in p.column_names]
    if missing:
        raise ConfigError(
            "partitioner", spec,
            f"partitions selected from the partitioner's dataset (partition {missing[0]} is not)",
        )  # fmt: skip
    return [list(p[ROW]) for p in parts]


def check_rows(rows: list[list[int]], num_rows: int, spec: str) -> None:
    """One disjoint, in-range, non-empty list of rows per node; ConfigError naming the fault."""
    flat = np.fromiter((i for r in rows for i in r), dtype=np.int64)
    bad = flat[(flat < 0) | (flat >= num_rows)]
    if len(bad):
        raise ConfigError(
            "partitioner", spec,
            f"training-row indices in [0, {num_rows - 1}] (it holds {int(bad[0])})",
        )  # fmt: skip
    owner = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    order = np.argsort(flat, kind="stable")
    twice = np.flatnonzero(np.diff(flat[order]) == 0)
    if len(twice):
        a, b = owner[order[twice[0]]], owner[order[twice[0] + 1]]
        where = f"node {a} holds it twice" if a == b else f"nodes {a} and {b} share it"
        raise ConfigError(
            "partitioner", spec, f"disjoint partitions (row {int(flat[order[twice[0]]])}: {where})"
        )
    empty = [i for i, r in enumerate(rows) if len(r) == 0]
    if empty:
        raise ConfigError(
            "num-nodes", len(rows),
            f"a value that leaves no node without data (empty partitions: {empty}); "
            "use fewer nodes, a larger alpha or more classes-per-node",
        )  # fmt: skip
