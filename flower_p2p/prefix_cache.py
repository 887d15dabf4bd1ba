"""Frozen-prefix activation cache: run the frozen part of a model once per image, not per step.

When ``finetune`` trains only a suffix of the model (``head``: the classifier; ``last-k``: the
last k blocks, the final norm and the head), every forward pass through the frozen prefix gives
the same output for the same image, because preprocessing is deterministic and the prefix runs
in eval mode. A node therefore computes the prefix's output for each of its images once and
trains the suffix on those activations from then on.

* ``head``: the cache holds the pooled pre-logits features (``forward_head(..., pre_logits=True)``,
  ``num_features`` floats per image), for ViT, DeiT and Swin.
* ``last-k``: the tokens entering the first trainable block (ViT/DeiT: ``blocks[:depth-k]``;
  Swin: up to the block inside its stage).
* ``lora``: not applicable. The adapters sit in the attention of *every* block, so the only
  frozen prefix is the patch embedding (one convolution): caching it saves nothing worth the
  memory. ``full`` has no frozen prefix. Distilled DeiT's head-only mode (two heads reading two
  tokens) is not split either; its ``last-k`` is.

The frozen prefix runs in eval mode during training whether the cache is on or off (dropout and
drop-path there would otherwise make the cached and uncached runs differ), so both give the same
parameters within float tolerance (``tests/test_prefix_cache.py``).

Bound (``cache-max-mb``, per node: its training activations plus the test-set activations it
evaluates on; the test-set activations are shared by all nodes of a process). Past it,
``prefix-cache=auto`` trains without the cache and says so; ``prefix-cache=on`` is refused
before training. The cache lives in memory only: nothing is written to disk.

Invalidation: a node's cache belongs to its ``NodeRuntime``, which is rebuilt when the config
(model, overrides, pretrained, finetune, last-k, image size, data, seed) or the checkpoint file
(path, size, modification time) changes; the shared test-set activations are keyed by a hash of
all of these plus the normalisation (``cache_key``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from flower_p2p.config import ExperimentConfig
from flower_p2p.registry import ConfigError

MODES = ("auto", "on", "off")
# Activations are computed in chunks of this many images (memory of the prefix's forward pass).
CHUNK = 256


@dataclass
class PrefixSplit:
    """A model cut into a frozen ``prefix`` and a trainable ``suffix``: suffix(prefix(x)) = f(x)."""

    model: nn.Module
    prefix: Callable[[torch.Tensor], torch.Tensor]
    suffix: Callable[[torch.Tensor], torch.Tensor]
    suffix_modules: list[nn.Module]
    cached: str  # what the cache holds, in words


class SplitNet(nn.Module):
    """The model as training sees it: frozen prefix in eval mode, suffix in the requested mode.

    ``from_images=True`` runs prefix then suffix (uncached); ``False`` takes cached activations.
    The model is held, not registered, so this wrapper owns no parameters of its own.
    """

    def __init__(self, split: PrefixSplit, from_images: bool) -> None:
        super().__init__()
        self._split, self.from_images = split, from_images

    def train(self, mode: bool = True) -> SplitNet:
        """Frozen prefix always in eval mode; only the suffix follows ``mode``."""
        self.training = mode
        if self._split.model.training:  # walking a ViT's modules costs ~1 ms: once is enough
            self._split.model.eval()
        for module in self._split.suffix_modules:
            module.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from images (uncached) or from the prefix's activations (cached)."""
        if self.from_images:
            with torch.no_grad():
                x = self._split.prefix(x)
        return self._split.suffix(x)


def _param_names(modules: list[nn.Module], model: nn.Module) -> set[str]:
    ids = {id(p) for m in modules for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _head_split(model: nn.Module) -> PrefixSplit | None:
    classifier = model.get_classifier()
    if not isinstance(classifier, nn.Module):  # distilled DeiT: (head, head_dist)
        return None

    def prefix(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True)

    return PrefixSplit(model, prefix, classifier, [classifier], "pooled pre-logits features")


def _vit_last_k(model: nn.Module, k: int) -> PrefixSplit:
    cut = len(model.blocks) - k

    def prefix(x: torch.Tensor) -> torch.Tensor:
        # timm's VisionTransformer.forward_features up to the first trainable block
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        return model.blocks[:cut](x)

    def suffix(z: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.norm(model.blocks[cut:](z)))

    tail = [model.blocks[cut:], model.norm, model.fc_norm, model.head_drop, model.head]
    for extra in ("attn_pool", "head_dist"):  # present in some variants (distilled DeiT)
        if getattr(model, extra, None) is not None:
            tail.append(getattr(model, extra))
    return PrefixSplit(model, prefix, suffix, tail, f"tokens entering blocks.{cut}")


def _swin_last_k(model: nn.Module, k: int) -> PrefixSplit:
    blocks = [(s, j) for s, stage in enumerate(model.layers) for j in range(len(stage.blocks))]
    s, j = blocks[-k]
    stage = model.layers[s]

    def prefix(x: torch.Tensor) -> torch.Tensor:
        x = model.layers[:s](model.patch_embed(x))
        return stage.blocks[:j](stage.downsample(x))

    def suffix(z: torch.Tensor) -> torch.Tensor:
        z = model.layers[s + 1 :](stage.blocks[j:](z))
        return model.forward_head(model.norm(z))

    tail = [stage.blocks[j:], model.layers[s + 1 :], model.norm, model.head]
    return PrefixSplit(model, prefix, suffix, tail, f"tokens entering layers.{s}.blocks.{j}")


def find_split(model: nn.Module, cfg: ExperimentConfig, trainable: list[str]) -> PrefixSplit | str:
    """The prefix/suffix split of ``model`` under ``cfg.finetune``, or why there is none."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if cfg.finetune == "full":
        return "finetune=full trains every layer: there is no frozen prefix"
    if cfg.finetune == "lora":
        return (
            "finetune=lora puts adapters in every block's attention: the only frozen prefix is "
            "the patch embedding, not worth caching"
        )
    if cfg.finetune == "head" and type(model).__name__ == "VisionTransformerDistilled":
        return "distilled DeiT's two heads read two tokens: its head-only split is not built"
    if cfg.finetune == "head":
        split = _head_split(model)
    elif isinstance(model, VisionTransformer):
        split = _vit_last_k(model, cfg.last_k)
    elif isinstance(model, SwinTransformer):
        split = _swin_last_k(model, cfg.last_k)
    else:
        split = None
    if split is None:
        return f"no frozen-prefix split for {type(model).__name__} under finetune={cfg.finetune}"
    # Safety net: the suffix must hold exactly the trainable parameters, or the cut is wrong.
    if _param_names(split.suffix_modules, model) != set(trainable):
        return f"the trainable set of finetune={cfg.finetune} is not a suffix of {cfg.model}"
    return split


def checkpoint_fingerprint(cfg: ExperimentConfig) -> tuple:
    """What identifies the pretrained weights: a checkpoint file's path, size and mtime."""
    if cfg.pretrained in ("none", "hub"):
        return (cfg.pretrained,)
    path = Path(cfg.pretrained).expanduser().resolve()
    try:
        st = path.stat()
    except OSError:
        return (str(path), None)
    return (str(path), st.st_size, st.st_mtime_ns)


def cache_key(cfg: ExperimentConfig, mean: tuple, std: tuple, part: str) -> str:
    """Hash of everything the cached activations depend on (``part``: e.g. 'test', 'node-3')."""
    from flower_p2p.data import data_key
    from flower_p2p.models import architecture_overrides

    fields = {
        "model": cfg.model,
        "overrides": architecture_overrides(cfg),
        "checkpoint": checkpoint_fingerprint(cfg),
        "seed": cfg.seed,  # the frozen weights themselves when training from scratch
        "finetune": cfg.finetune,
        "last_k": cfg.last_k if cfg.finetune == "last-k" else None,
        "preprocessing": {"img_size": cfg.img_size, "mean": list(mean), "std": list(std)},
        "data": list(data_key(cfg)),
        "part": part,
        "timm": timm.__version__,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def activations(split: PrefixSplit, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The frozen prefix's output for every image (eval mode, chunked), on ``device``."""
    was_training = split.model.training
    split.model.eval()
    out = [split.prefix(images[i : i + CHUNK].to(device)) for i in range(0, len(images), CHUNK)]
    split.model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def bytes_per_image(split: PrefixSplit, image_shape: tuple[int, ...], device: torch.device) -> int:
    """Size of one image's cached activations, from one probe forward pass."""
    probe = activations(split, torch.zeros(1, *image_shape), device)
    return probe[0].numel() * probe.element_size()


@dataclass
class CachePlan:
    """Whether a node trains on cached activations, and why (logged and written to summary)."""

    split: PrefixSplit | None
    on: bool
    reason: str
    bytes_per_image: int = 0  # of the cached activations, when on

    def network(self, model: nn.Module) -> nn.Module:
        """The module that training and evaluation call (see ``SplitNet``)."""
        if self.split is None:
            return model
        return SplitNet(self.split, from_images=not self.on)


def plan(
    cfg: ExperimentConfig,
    model: nn.Module,
    trainable: list[str],
    num_train: int,
    num_test: int,
    image_shape: tuple[int, ...],
    device: torch.device,
) -> CachePlan:
    """Decide the cache for a node with ``num_train`` training and ``num_test`` test images.

    ``prefix-cache=on`` that cannot be honoured raises ConfigError (call this before training).
    """
    split = find_split(model, cfg, trainable)
    if isinstance(split, str):
        if cfg.prefix_cache == "on":
            raise ConfigError("prefix-cache", "on", f"auto or off here: {split}")
        return CachePlan(None, False, f"off: {split}")
    if cfg.prefix_cache == "off":
        return CachePlan(split, False, "off: prefix-cache=off")
    per_image = bytes_per_image(split, image_shape, device)
    need_mb = per_image * (num_train + num_test) / 2**20
    if need_mb > cfg.cache_max_mb:
        why = (
            f"{need_mb:.1f} MB of activations ({num_train} + {num_test} images x "
            f"{per_image} B) exceed cache-max-mb={cfg.cache_max_mb}"
        )
        if cfg.prefix_cache == "on":
            raise ConfigError(
                "cache-max-mb", cfg.cache_max_mb, f"at least {need_mb:.0f} here ({why})"
            )
        return CachePlan(split, False, f"off: {why}")
    return CachePlan(
        split,
        True,
        f"on: {split.cached} ({per_image} B per image, {need_mb:.1f} MB per node)",
        per_image,
    )


def shared_activations(
    key: str, split: PrefixSplit, images: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Activations shared by every node of a process (the test set), computed once per ``key``.

    The key alone identifies them (``cache_key``); the split and images of the first caller are
    used to compute them.
    """
    return _shared_by_key(key, lambda: activations(split, images, device))


_SHARED: dict[str, torch.Tensor] = {}


def _shared_by_key(key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    if key not in _SHARED:
        if len(_SHARED) >= 2:  # a process rarely runs more than one config at a time
            _SHARED.pop(next(iter(_SHARED)))
        _SHARED[key] = compute()
    return _SHARED[key]


def check_mode(value: str) -> None:
    """Refuse an unknown ``prefix-cache`` value."""
    if value not in MODES:
        raise ConfigError("prefix-cache", value, f"one of {', '.join(MODES)}")
