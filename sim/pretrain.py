"""``python -m sim pretrain``: train a backbone centrally on a source task, write a checkpoint.

The checkpoint is a timm state dict in ``.safetensors`` that ``pretrained=<path>`` loads through
timm's pretrained machinery (the head is reset for the downstream task), plus a JSON sidecar
``<checkpoint>.json`` with the model name, its architecture overrides, the source task and
dataset, the ``test-fraction`` carved off it (``source_test_fraction``), epochs and the accuracy
on the source task. ``create_model`` refuses a checkpoint whose sidecar names another
architecture, or the run's own dataset with another carve (its test images were trained on).

Source tasks (``source``):

* ``supervised`` (default): the source dataset's own labels.
* ``rotation``: self-supervised rotation prediction (0/90/180/270 degrees, 4 classes, Gidaris et
  al. 2018) on the images of the source dataset's ``train`` split. No label is used.

``source-dataset`` defaults to ``glyphs``: the project's synthetic printed letters in digits'
8x8 format (``flower_p2p/glyphs.py``), rendered offline from matplotlib's fonts. It shares no
image, no class and no label with the downstream digits: the backbone learns strokes at digits'
scale, the way an ImageNet backbone learns edges and textures for a downstream photo task. ``""``
means the downstream ``dataset`` itself; only its ``train`` split is ever read (for a dataset
without a ``test`` split that is the train pool the downstream run partitions, ``test-fraction``
carved with the fixed seed 0), so the downstream test images are never seen. ``source=rotation
source-dataset=""`` uses the downstream training images without labels; ``source=supervised
source-dataset=""`` puts the downstream labels into the backbone (a weaker claim for any
"learning the unseen" result) and is recorded as such in the sidecar. A ``holdout`` fraction of
the source pool (seeded) measures the source-task accuracy.

Training uses ``flower_p2p.training``'s loops and ``flower_p2p.models``' factory: nothing here
re-implements them. Architecture and optimizer keys (``model``, ``img-size``, ``patch-size``,
``depth``, ``window-size``, ``optimizer``, ``lr``, ``lr-schedule``, ``weight-decay``,
``batch-size``, ``seed``) are the run-config keys of the downstream experiment.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from flower_p2p.config import ExperimentConfig, _coerce
from flower_p2p.data import DataBundle, load_data, make_transform, to_tensors
from flower_p2p.models import architecture_overrides, create_model, data_config
from flower_p2p.registry import ConfigError, Registry
from flower_p2p.results import atomic_write_bytes, package_versions, write_json
from flower_p2p.training import (
    evaluate,
    lr_at_round,
    make_optimizer,
    pick_device,
    train_epochs,
)

SOURCES: Registry = Registry("source")


@dataclass(frozen=True)
class PretrainConfig:
    """The pretraining keys (``source-dataset`` <-> ``source_dataset``); the rest are run keys."""

    source: str = "supervised"
    source_dataset: str = "glyphs"  # "": the downstream `dataset`
    epochs: int = 20
    steps: int = 0  # > 0: exactly this many optimizer steps instead of `epochs` (quick checks)
    holdout: float = 0.1
    checkpoint: str = "checkpoints/pretrained.safetensors"

    @classmethod
    def keys(cls) -> list[str]:
        """Its keys, kebab-case."""
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def split(cls, values: dict[str, Any]) -> tuple[PretrainConfig, dict[str, Any]]:
        """Take this config's keys out of ``values``; return it (validated) and the rest."""
        mine = {f.name.replace("_", "-"): f for f in fields(cls)}
        kw = {
            mine[k].name: _coerce(k, v, type(getattr(cls(), mine[k].name)))
            for k, v in values.items()
            if k in mine
        }
        pc = cls(**kw)
        pc.validate()
        return pc, {k: v for k, v in values.items() if k not in mine}

    def validate(self) -> None:
        """Check every value; errors name the key, the value and what is allowed."""
        SOURCES.get(self.source)
        if self.epochs < 1:
            raise ConfigError("epochs", self.epochs, "an integer >= 1")
        if self.steps < 0:
            raise ConfigError("steps", self.steps, "an integer >= 0 (0: train for `epochs`)")
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError("holdout", self.holdout, "a fraction in (0, 1)")
        if not self.checkpoint.endswith(".safetensors"):
            raise ConfigError("checkpoint", self.checkpoint, "a path ending in .safetensors")


def sidecar_path(checkpoint: Path) -> Path:
    """Where the JSON description of ``checkpoint`` lives: ``<checkpoint>.json``."""
    return checkpoint.with_name(checkpoint.name + ".json")


Examples = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SourceTask:
    """A source task: its number of classes and how (images, labels) become its examples."""

    num_classes: int
    examples: Examples


def _rotate(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Every image four times, rotated by 0/90/180/270 degrees; the label is the rotation.
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    return rotated, torch.arange(4).repeat_interleave(len(x))


@SOURCES.register("rotation")
def _rotation(bundle: DataBundle) -> SourceTask:
    return SourceTask(4, _rotate)


@SOURCES.register("supervised")
def _supervised(bundle: DataBundle) -> SourceTask:
    return SourceTask(bundle.num_classes, lambda x, y: (x, y))


def source_pool(cfg: ExperimentConfig, pc: PretrainConfig) -> DataBundle:
    """The source dataset's ``train`` split as one partition (its test split is never read)."""
    spec = pc.source_dataset or cfg.dataset
    # one partition: the downstream run's partition, placement and feature-skew keys do not apply
    one = cfg.replace(dataset=spec, strategy="centralized", partitioner="iid", num_nodes=1,
                      node_sizes="equal", placement="random", feature_skew="none",
                      skew_domains=0)  # fmt: skip
    return load_data(one)


def pretrain(cfg: ExperimentConfig, pc: PretrainConfig, overwrite: bool = False) -> Path:
    """Train ``cfg``'s architecture on ``pc.source``; write the checkpoint, then its sidecar.

    Both atomically and fsynced; an earlier sidecar at that path is removed first.
    """
    path = Path(pc.checkpoint).expanduser().resolve()
    if (path.exists() or sidecar_path(path).exists()) and not overwrite:
        raise ConfigError("checkpoint", str(path), "a new file, or overwrite=true to replace it")
    bundle = source_pool(cfg, pc)
    pool = bundle.partitions[0].train_test_split(test_size=pc.holdout, seed=cfg.seed)
    task = SOURCES.get(pc.source)(bundle)
    num_classes = task.num_classes
    model = create_model(cfg, num_classes)  # pretrained=... continues from a checkpoint
    device = pick_device()
    model.to(device)
    transform = make_transform(cfg.img_size or 224, *data_config(model))
    x, y = task.examples(*to_tensors(pool["train"], bundle, transform))
    hx, hy = task.examples(*to_tensors(pool["test"], bundle, transform))
    opt = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    passes = 1 if pc.steps else pc.epochs
    for epoch in range(1, passes + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at_round(cfg.lr, cfg.lr_schedule, epoch, passes)
        loss = train_epochs(model, x, y, opt, 1, cfg.batch_size, gen, device, steps=pc.steps)
        acc, _, _ = evaluate(model, hx, hy, 256, device)
        print(f"pretrain epoch {epoch}/{passes}: loss {loss:.3f}, {pc.source} accuracy "
              f"{100 * acc:.1f}% on {len(hy)} held-out samples", flush=True)  # fmt: skip
    spec = pc.source_dataset or cfg.dataset
    # The checkpoint first, then its description: a crash in between leaves a checkpoint with no
    # sidecar (checked by its shapes alone), never a sidecar describing other weights.
    sidecar_path(path).unlink(missing_ok=True)
    _save_atomic(model, path)
    write_json(
        sidecar_path(path),
        {
            "model": cfg.model,
            "overrides": architecture_overrides(cfg),
            "num_classes": num_classes,
            "source": pc.source,
            "source_dataset": spec,
            "source_split": "train",
            # What this run carved off `train` as the test split (None: the dataset's own):
            # a downstream run on the same dataset must carve the same, or it tests on images
            # this backbone trained on (models.check_checkpoint_source).
            "source_test_fraction": bundle.test_fraction,
            "downstream_labels_used": pc.source == "supervised" and spec == cfg.dataset,
            "epochs": passes,
            "steps": pc.steps,
            "source_train_samples": len(y),
            "source_accuracy": acc,
            "source_holdout_samples": len(hy),
            "optimizer": {"name": cfg.optimizer, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule,
                          "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size},
            "seed": cfg.seed,
            "train_s": time.perf_counter() - start,
            "versions": package_versions(),
        },
    )  # fmt: skip
    return path


def _save_atomic(model: torch.nn.Module, path: Path) -> None:
    """``model``'s state dict as safetensors: fsynced, renamed into place, folder fsynced."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={"format": "pt"}))


def pretrain_from_args(values: dict[str, Any]) -> Path:
    """``python -m sim pretrain key=value ...``: pretraining keys plus run-config keys."""
    from sim.cli import defaults

    pc, rest = PretrainConfig.split(values)
    cfg = ExperimentConfig.from_run_config({**defaults(), **rest})
    return pretrain(cfg, pc, overwrite=cfg.overwrite)
