"""Feature skew: each node's images shifted by its own "domain" (``feature-skew``).

Label skew changes *which* classes a node holds; feature skew changes *how its images look*.
Partitions are grouped into ``skew-domains`` domains (0: one per partition; k: partitions
``j * k // num-nodes``, i.e. consecutive partitions share a domain), and every image of a
partition, in training and in its node's own evaluation copy of the test set, goes through the
domain's shift (``skew-strength`` in (0, 1] scales it). A domain's amount ``t = d / (k - 1)``
runs from 0 (domain 0: unshifted) to 1 (with one domain, ``t = 1``):

* ``rotation``: rotated by ``t x 180 x strength`` degrees (corners filled with black);
* ``contrast``: contrast lowered by a factor ``0.25 ** (t x strength)``, from 1 to 1/4;
* ``noise``: additive Gaussian noise of std ``0.5 x t x strength`` (pixels in [0, 1]), drawn
  per image from a stream seeded by (seed, domain, split): the same every time;
* ``invert``: intensities inverted (``1 - x``) for the domains with ``t >= 0.5`` (strength does
  not apply: an image is inverted or not);
* ``mixed``: domain ``d`` gets rotation, contrast, noise or invert in turn (``d mod 4``), each at
  amount ``strength`` (so domain 0 is rotated too).

The shift follows the *partition* (placement moves a partition with its domain), so the
centralized reference, which trains on the union of the partitions in their own order, sees
the same shifted images whatever the placement. The global test set is never shifted: it stays
the headline ``accuracy``; ``domain_accuracy`` is a node's accuracy on its own domain's copy of
it (None without feature skew, and for the centralized reference, which holds every domain).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import functional as tvf

from flower_p2p.registry import ConfigError, Registry

FEATURE_SKEWS: Registry = Registry("feature-skew")
for _name in ("none", "rotation", "contrast", "noise", "invert", "mixed"):
    FEATURE_SKEWS.register(_name)(lambda: None)
MIXED = ("rotation", "contrast", "noise", "invert")
SPLITS = {"train": 0, "test": 1}  # noise streams: training images and the evaluation copy


@dataclass(frozen=True)
class Shift:
    """One domain's shift of [0, 1] image tensors (C, H, W)."""

    kind: str
    amount: float  # t x strength: 0 is no shift
    domain: int
    seed: int

    def transform(self, split: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """A fresh per-image transform; its noise stream restarts with every call."""
        entropy = [self.seed, self.domain, SPLITS[split]]
        gen = torch.Generator().manual_seed(
            int(np.random.SeedSequence(entropy).generate_state(1)[0])
        )

        def apply(x: torch.Tensor) -> torch.Tensor:
            if self.kind == "rotation":
                return tvf.rotate(x, 180.0 * self.amount, fill=0.0)
            if self.kind == "contrast":
                return tvf.adjust_contrast(x, 0.25**self.amount)
            if self.kind == "noise":
                noise = torch.randn(x.shape, generator=gen)  # drawn even at 0: one stream length
                return (x + 0.5 * self.amount * noise).clamp(0.0, 1.0)
            if self.kind == "invert":
                return 1.0 - x if self.amount >= 0.5 else x
            raise AssertionError(self.kind)  # validate() allows no other kind

        return apply


def check_feature_skew(kind: str, domains: int, strength: float, num_nodes: int) -> None:
    """Refuse an unknown kind, a domain count past the nodes, a strength outside (0, 1]."""
    FEATURE_SKEWS.get(kind)
    if not 0 <= domains <= num_nodes:
        raise ConfigError(
            "skew-domains", domains, f"an integer in [0, {num_nodes}] (0: one per node)"
        )
    if not 0.0 < strength <= 1.0:
        raise ConfigError("skew-strength", strength, "a scale in (0, 1]")


def domain_of(partition: int, num_nodes: int, domains: int) -> int:
    """The domain of a partition: consecutive partitions share one (0 domains: one each)."""
    return partition if domains == 0 else partition * domains // num_nodes


def shift_for(cfg, partition: int) -> Shift | None:  # cfg: ExperimentConfig
    """The shift of ``partition``'s images under ``cfg`` (None without feature skew)."""
    if cfg.feature_skew == "none":
        return None
    k = cfg.skew_domains or cfg.num_nodes
    d = domain_of(partition, cfg.num_nodes, cfg.skew_domains)
    if cfg.feature_skew == "mixed":
        kind = MIXED[d % len(MIXED)]
        return Shift(kind, 1.0 if kind == "invert" else cfg.skew_strength, d, cfg.seed)
    t = d / (k - 1) if k > 1 else 1.0
    amount = t if cfg.feature_skew == "invert" else t * cfg.skew_strength
    return Shift(cfg.feature_skew, amount, d, cfg.seed)


def describe(shift: Shift | None) -> str:
    """A shift in words (plots, logs)."""
    if shift is None or (shift.amount == 0 and shift.kind != "invert"):
        return "unshifted"
    if shift.kind == "rotation":
        return f"rotated {180 * shift.amount:.0f}°"
    if shift.kind == "contrast":
        return f"contrast x{0.25**shift.amount:.2f}"
    if shift.kind == "noise":
        return f"noise std {0.5 * shift.amount:.2f}"
    return "inverted" if shift.amount >= 0.5 else "unshifted"
