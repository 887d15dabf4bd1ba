"""'Unseen classes': which node holds which classes, and accuracy on the classes a node never saw.

With ``partitioner=unseen`` every node holds exactly ``classes-per-node`` classes and every class
is held by some node, so a node can only learn the classes it lacks through the graph.
``unseen-layout`` places the classes along the node order (ring neighbours are ``i`` and
``i +- 1 mod n``):

* ``neighbours-share``: node ``i`` holds classes ``i, i+1, ..., i+k-1 (mod C)``, so consecutive
  nodes overlap in ``k - 1`` classes. This is exactly flwr-datasets' ``PathologicalPartitioner``
  with ``class_assignment_mode="deterministic"``, which does the split; it only covers every class
  when ``num-nodes + k - 1 >= C``, which is checked first (flwr-datasets only warns).
* ``disjoint-neighbours``: ring neighbours hold no class in common, found by a small search
  that tries the least-used classes first; where that is impossible, neighbours share as few
  classes as a greedy pass manages.
  flwr-datasets has no assignment mode for this and no way to pass an explicit one, so
  ``ClassAssignmentPartitioner`` splits the samples here.

Either way, the training samples of a class are split evenly (and disjointly) among the nodes
holding it, all of them used.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import datasets
import numpy as np
import torch
from flwr_datasets.partitioner import Partitioner, PathologicalPartitioner

from flower_p2p.registry import ConfigError, Registry

UNSEEN_LAYOUTS: Registry = Registry("unseen-layout")


@UNSEEN_LAYOUTS.register("neighbours-share")
def neighbours_share(num_nodes: int, num_classes: int, k: int) -> list[tuple[int, ...]]:
    """Node ``i`` holds ``i .. i+k-1 (mod C)``: consecutive nodes share ``k - 1`` classes."""
    if num_nodes + k - 1 < num_classes:
        raise ConfigError(
            "classes-per-node",
            k,
            f"at least {num_classes - num_nodes + 1} for unseen-layout=neighbours-share with "
            f"{num_nodes} nodes and {num_classes} classes (node i holds classes i..i+k-1, and "
            "every class must be held by some node), or unseen-layout=disjoint-neighbours",
        )
    return [tuple((i + j) % num_classes for j in range(k)) for i in range(num_nodes)]


@UNSEEN_LAYOUTS.register("disjoint-neighbours")
def disjoint_neighbours(num_nodes: int, num_classes: int, k: int) -> list[tuple[int, ...]]:
    """Ring neighbours hold no class in common where possible; every class is held by a node.

    A depth-first search over the nodes in ring order, trying first the least-used classes (so
    its first path is the greedy one); when it finds no such assignment within a fixed budget
    (e.g. a ring of 3 with k=4 of 10 classes: impossible), the greedy one that lets neighbours
    share the fewest classes.
    """
    budget = [SEARCH_BUDGET]

    def near(held: list[tuple[int, ...]]) -> set[int]:
        i = len(held)  # the previous node, and node 0 for the last one (it closes the ring)
        out = set(held[i - 1]) if i else set()
        return out | set(held[0]) if i == num_nodes - 1 and i > 1 else out

    def search(held: list[tuple[int, ...]], uses: np.ndarray) -> list[tuple[int, ...]] | None:
        if len(held) == num_nodes:
            return held
        if np.sum(uses == 0) > (num_nodes - len(held)) * k:
            return None  # the remaining nodes cannot cover the classes nobody holds yet
        blocked = near(held)
        free = sorted(set(range(num_classes)) - blocked, key=lambda c: (uses[c], c))
        for mine in itertools.combinations(free, k):
            budget[0] -= 1
            if budget[0] < 0:
                return None
            uses[list(mine)] += 1
            found = search([*held, tuple(sorted(mine))], uses)
            uses[list(mine)] -= 1
            if found:
                return found
        return None

    return search([], np.zeros(num_classes, dtype=int)) or _fewest_shared(num_nodes, num_classes, k)


SEARCH_BUDGET = 20_000  # class combinations tried before settling for the greedy assignment


def _fewest_shared(num_nodes: int, num_classes: int, k: int) -> list[tuple[int, ...]]:
    held: list[tuple[int, ...]] = []
    uses = np.zeros(num_classes, dtype=int)
    for i in range(num_nodes):
        near = set(held[i - 1]) if i else set()
        if i == num_nodes - 1 and i > 1:
            near |= set(held[0])
        # Unused classes first (coverage), then the least used; neighbours' classes last.
        order = sorted(range(num_classes), key=lambda c: (c in near, uses[c], c))
        mine = tuple(sorted(order[:k]))
        uses[list(mine)] += 1
        held.append(mine)
    return held


def class_assignment(
    num_nodes: int, num_classes: int, k: int, layout: str
) -> list[tuple[int, ...]]:
    """The classes each node holds; ConfigError when every class cannot be covered."""
    if not 1 <= k <= num_classes:
        raise ConfigError("classes-per-node", k, f"an integer in [1, {num_classes}] (classes)")
    if k * num_nodes < num_classes:
        raise ConfigError(
            "classes-per-node",
            k,
            f"at least {-(-num_classes // num_nodes)} for partitioner=unseen: {num_nodes} nodes "
            f"x {k} classes cannot cover all {num_classes} classes",
        )
    return UNSEEN_LAYOUTS.get(layout)(num_nodes, num_classes, k)


class ClassAssignmentPartitioner(Partitioner):
    """Node ``i`` gets exactly the classes ``held[i]``, each class split evenly among its holders.

    Each class's sample indices are shuffled (``seed``) and cut into as many contiguous parts as
    the class has holders, so the partitions are disjoint and together hold every sample of every
    held class.
    """

    def __init__(self, held: Sequence[Sequence[int]], partition_by: str, seed: int) -> None:
        super().__init__()
        self._held = [tuple(h) for h in held]
        self._partition_by = partition_by
        self._seed = seed
        self._indices: list[list[int]] | None = None

    @property
    def num_partitions(self) -> int:
        """Number of partitions (nodes)."""
        return len(self._held)

    def _assign(self) -> list[list[int]]:
        labels = np.asarray(self.dataset[self._partition_by])
        rng = np.random.default_rng(self._seed)
        out: list[list[int]] = [[] for _ in self._held]
        for c in sorted({c for h in self._held for c in h}):
            holders = [i for i, h in enumerate(self._held) if c in h]
            idx = rng.permutation(np.flatnonzero(labels == c))
            if len(idx) < len(holders):
                raise ValueError(
                    f"class {c} has {len(idx)} training samples for {len(holders)} nodes"
                )
            for node, part in zip(holders, np.array_split(idx, len(holders)), strict=True):
                out[node].extend(int(j) for j in part)
        return [sorted(o) for o in out]

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        """The samples of node ``partition_id``."""
        if self._indices is None:
            self._indices = self._assign()
        return self.dataset.select(self._indices[partition_id])


def unseen_partitioner(
    num_nodes: int, num_classes: int, k: int, layout: str, partition_by: str, seed: int
) -> Partitioner:
    """The partitioner behind ``partitioner=unseen`` (flwr-datasets' where it can express it)."""
    held = class_assignment(num_nodes, num_classes, k, layout)
    if layout == "neighbours-share":
        return PathologicalPartitioner(
            num_partitions=num_nodes,
            partition_by=partition_by,
            num_classes_per_partition=k,
            class_assignment_mode="deterministic",
            seed=seed,
        )
    return ClassAssignmentPartitioner(held, partition_by, seed)


def unseen_class_accuracy(
    preds: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    seen_classes: Sequence[int] | set[int] | torch.Tensor | np.ndarray,
) -> float | None:
    """Accuracy on the samples whose label is not in ``seen_classes``; None when there are none.

    ``seen_classes`` are the classes of the node's own training data: the rest it can only have
    learned from its neighbours.
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    seen = list(seen_classes) if isinstance(seen_classes, set) else np.asarray(seen_classes)
    unseen = ~np.isin(labels, seen)
    if not unseen.any():
        return None
    return float((preds[unseen] == labels[unseen]).mean())
