"""timm vision transformers: factory with CPU-sized overrides, pretrained loading, fine-tune modes.

``model`` is any timm name of the ViT family (``vit_*``, ``deit_*``, ``swin_*``). ``pretrained`` is
``none``, ``hub`` (timm's own download) or a local checkpoint file loaded through timm's pretrained
machinery (``pretrained_cfg_overlay=dict(file=...)``); the classifier is always reset to the
dataset's classes. Only parameters that the ``finetune`` mode makes trainable ever leave a node.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import timm
import torch
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from torch import nn

from flower_p2p.config import ExperimentConfig
from flower_p2p.registry import ConfigError, Registry

FAMILIES = ("vit_", "deit_", "swin_")
FINETUNE_MODES: Registry = Registry("finetune")
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def check_model_name(name: str) -> None:
    """Refuse names that are not timm ViT/DeiT/Swin models."""
    if not name.startswith(FAMILIES) or name not in timm.list_models(name):
        examples = ", ".join(
            n
            for n in (
                "vit_tiny_patch16_224",
                "deit_tiny_patch16_224",
                "swin_tiny_patch4_window7_224",
            )
        )
        raise ConfigError(
            "model",
            name,
            f"a timm model name starting with {', '.join(FAMILIES)} (e.g. {examples})",
        )


def _swin_stage_args(name: str, stages: int) -> dict:
    """Depths/heads of the first ``stages`` Swin stages, read off a meta-device instance."""
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
    depths = tuple(len(layer.blocks) for layer in ref.layers)
    heads = tuple(layer.blocks[0].attn.num_heads for layer in ref.layers)
    if not 1 <= stages <= len(depths):
        raise ConfigError("depth", stages, f"a number of Swin stages in [1, {len(depths)}]")
    return {"depths": depths[:stages], "num_heads": heads[:stages]}


def architecture_overrides(cfg: ExperimentConfig) -> dict:
    """Constructor overrides that shrink the model (0 keeps the architecture's own value)."""
    kw: dict = {}
    if cfg.img_size:
        kw["img_size"] = cfg.img_size
    if cfg.patch_size:
        kw["patch_size"] = cfg.patch_size
    if cfg.model.startswith("swin_"):
        kw["window_size"] = cfg.window_size
        if cfg.depth:
            kw.update(_swin_stage_args(cfg.model, cfg.depth))
    elif cfg.depth:
        kw["depth"] = cfg.depth
    return kw


def checkpoint_num_classes(path: Path, classifier: str | tuple[str, ...]) -> int:
    """Rows of the classifier weight stored in a checkpoint (what timm must expect to load it)."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path))
    except Exception as err:
        raise ConfigError("pretrained", str(path), f"a readable checkpoint ({err})") from err
    head = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    key = f"{head}.weight"
    if key not in state:
        raise ConfigError("pretrained", str(path), f"a checkpoint of this model (no '{key}' in it)")
    return int(state[key].shape[0])


def _first_problem(err: Exception) -> str:
    """The first tensor mismatch and a count: torch lists every one, which buries the point."""
    lines = [ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()]
    if not lines:
        return str(err)
    more = f"; {len(lines) - 1} more" if len(lines) > 1 else ""
    return lines[0].rstrip(".") + more


def check_checkpoint_architecture(path: Path, cfg: ExperimentConfig) -> None:
    """Refuse a checkpoint whose sidecar names another architecture than ``cfg``'s.

    ``sim pretrain`` writes the sidecar ``<checkpoint>.json``. Without this check timm would
    resample position embeddings and patch projections to fit, and fine-tune another model.
    """
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file():
        return  # a foreign checkpoint: the strict load below checks the shapes
    meta = json.loads(sidecar.read_text())
    mine = json.loads(json.dumps(architecture_overrides(cfg)))  # tuples -> lists, as stored
    if meta.get("model") != cfg.model or meta.get("overrides") != mine:
        raise ConfigError(
            "pretrained",
            str(path),
            f"a checkpoint of model={cfg.model} {mine}; it was trained as "
            f"model={meta.get('model')} {meta.get('overrides')} (see {sidecar.name})",
        )


def check_hub_weights(name: str) -> None:
    """Refuse ``pretrained=hub`` for a timm model that has no published weights."""
    source = timm.models.get_pretrained_cfg(name)
    if source is None or not (source.hf_hub_id or source.url):
        raise ConfigError(
            "pretrained", "hub", f"a model with published weights; timm has none for model={name}"
        )


def hub_unavailable(name: str, err: Exception) -> str:
    """Why ``pretrained=hub`` weights could not be had, in words: the repo, the hub, the cache."""
    from huggingface_hub import constants

    source = timm.models.get_pretrained_cfg(name)
    why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else type(err).__name__
    return (
        f"weights of model={name} from the Hugging Face hub ({source.hf_hub_id or source.url}): "
        f"the hub is out of reach ({why}) and the cache {constants.HF_HUB_CACHE} does not hold "
        "them; download them once online, or pass a local checkpoint file"
    )


def check_checkpoint_source(path: Path, cfg: ExperimentConfig) -> None:
    """Refuse a checkpoint pretrained on ``cfg``'s dataset with another test split carved off.

    ``sim pretrain`` on a dataset without a test split reads the train pool left by its
    ``test-fraction``; a run on that dataset with another fraction would test on images the
    backbone trained on. Sidecars from before the fraction was recorded are refused likewise.
    """
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file():
        return  # a foreign checkpoint: nothing says what it was trained on
    meta = json.loads(sidecar.read_text())
    source = meta.get("source_dataset")
    if not isinstance(source, str) or not _same_dataset(source, cfg.dataset):
        return
    if "source_test_fraction" not in meta:
        raise ConfigError(
            "pretrained", str(path), f"a checkpoint whose sidecar records the test-fraction "
            f"its pretraining carved off dataset={source}; {sidecar.name} does not (written "
            "before sim pretrain recorded it), so the backbone may have trained on this run's "
            f"test images: pretrain again (python -m sim pretrain source-dataset={source} "
            f"test-fraction={cfg.test_fraction} ...), or use another checkpoint",
        )  # fmt: skip
    carved = meta["source_test_fraction"]
    if carved is not None and carved != cfg.test_fraction:
        raise ConfigError(
            "pretrained", str(path), f"a checkpoint pretrained with this run's test split held "
            f"out; it was pretrained on dataset={source} with test-fraction={carved} carved off, "
            f"this run carves test-fraction={cfg.test_fraction}, so its test split holds images "
            f"the backbone trained on: use test-fraction={carved}, or pretrain again with "
            f"test-fraction={cfg.test_fraction}",
        )  # fmt: skip


def _same_dataset(a: str, b: str) -> bool:
    # A local folder may be spelled differently (relative, ~); names compare as they are.
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def create_model(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    """Build the model for ``cfg`` with a freshly initialised ``num_classes`` head.

    The same ``seed`` gives every node the same initial weights (standard for gossip SGD).
    """
    torch.manual_seed(cfg.seed)
    kw = architecture_overrides(cfg)
    try:
        if cfg.pretrained == "none":
            model = timm.create_model(cfg.model, pretrained=False, num_classes=num_classes, **kw)
        elif cfg.pretrained == "hub":
            check_hub_weights(cfg.model)
            try:
                # A shortened depth drops blocks of the hub checkpoint on purpose: load the rest.
                model = timm.create_model(
                    cfg.model,
                    pretrained=True,
                    num_classes=num_classes,
                    pretrained_strict=not (cfg.depth and not cfg.model.startswith("swin_")),
                    **kw,
                )
            # Not in the cache, and the hub offline, unreachable or refusing (gated, missing repo).
            except (EntryNotFoundError, HfHubHTTPError, ConnectionError) as err:
                raise ConfigError("pretrained", "hub", hub_unavailable(cfg.model, err)) from err
        else:
            path = Path(cfg.pretrained).expanduser()
            if not path.is_file():
                raise ConfigError("pretrained", cfg.pretrained, "an existing checkpoint file")
            check_checkpoint_architecture(path, cfg)
            check_checkpoint_source(path, cfg)
            classifier = timm.models.get_pretrained_cfg(cfg.model).classifier
            # Build with the checkpoint's own head size so timm loads strictly (a differing
            # num_classes makes timm drop the head *and* silently accept missing blocks).
            ckpt_classes = checkpoint_num_classes(path, classifier)
            model = timm.create_model(
                cfg.model,
                pretrained=True,
                pretrained_cfg_overlay=dict(file=str(path), num_classes=ckpt_classes),
                num_classes=ckpt_classes,
                **kw,
            )
    except RuntimeError as err:  # size mismatches from load_state_dict
        raise ConfigError(
            "pretrained",
            cfg.pretrained,
            f"a checkpoint matching model={cfg.model} {kw} ({_first_problem(err)})",
        ) from err
    if cfg.pretrained != "none":
        torch.manual_seed(cfg.seed)
        model.reset_classifier(num_classes)
    return model


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = model.pretrained_cfg.get("classifier", "head")
    return tuple(classifier) if isinstance(classifier, (tuple, list)) else (classifier,)


@FINETUNE_MODES.register("full")
def _full(model: nn.Module, cfg: ExperimentConfig) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@FINETUNE_MODES.register("head")
def _head(model: nn.Module, cfg: ExperimentConfig) -> nn.Module:
    prefixes = tuple(p + "." for p in _classifier_prefixes(model))
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(prefixes))
    return model


def _blocks(model: nn.Module) -> list[str]:
    """Transformer blocks in forward order: ViT/DeiT ``blocks.i``, Swin ``layers.s.blocks.i``."""
    return [n for n, _ in model.named_modules() if re.fullmatch(r"(.*\.)?blocks\.\d+", n)]


@FINETUNE_MODES.register("last-k")
def _last_k(model: nn.Module, cfg: ExperimentConfig) -> nn.Module:
    blocks = _blocks(model)
    if not 1 <= cfg.last_k <= len(blocks):
        raise ConfigError("last-k", cfg.last_k, f"an integer in [1, {len(blocks)}] (blocks)")
    # The last k blocks, everything after them (final norm, head): the trainable suffix.
    first = blocks[-cfg.last_k] + "."
    names = [n for n, _ in model.named_parameters()]
    start = next(i for i, n in enumerate(names) if n.startswith(first))
    trainable = set(names[start:])
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    return model


# LoRA adapters go on the attention's fused qkv projection in all three families.
LORA_TARGETS = {"vit_": ["qkv"], "deit_": ["qkv"], "swin_": ["qkv"]}


@FINETUNE_MODES.register("lora")
def _lora(model: nn.Module, cfg: ExperimentConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = next(t for prefix, t in LORA_TARGETS.items() if cfg.model.startswith(prefix))
    heads = list(_classifier_prefixes(model))
    torch.manual_seed(cfg.seed)  # adapter init is random: the same on every node
    config = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets, modules_to_save=heads
    )
    return get_peft_model(model, config)


def apply_finetune(model: nn.Module, cfg: ExperimentConfig) -> tuple[nn.Module, list[str]]:
    """Freeze what the ``finetune`` mode does not train.

    Returns the (for LoRA: wrapped) model and the names of its trainable parameters in model
    order: exactly what travels between nodes.
    """
    model = FINETUNE_MODES.get(cfg.finetune)(model, cfg)
    return model, [n for n, p in model.named_parameters() if p.requires_grad]


# What ``share`` can name: "all" or groups of trainable parameters, by their place in the model.
PARAM_GROUPS = ("all", "head", "attn", "mlp", "norm", "embed", "other")


def param_group(name: str) -> str:
    """The group of a parameter name (works through peft's wrappers: ``...attn.qkv.lora_A...``)."""
    parts = name.split(".")
    if "head" in parts or "head_dist" in parts:
        return "head"
    if "attn" in parts:
        return "attn"
    if "mlp" in parts:
        return "mlp"
    if any(p.startswith("norm") for p in parts):
        return "norm"
    if any(
        p in ("patch_embed", "pos_embed", "cls_token", "dist_token", "reg_token") for p in parts
    ):
        return "embed"
    return "other"


def shared_names(trainable: list[str], cfg: ExperimentConfig) -> list[str]:
    """The trainable parameters that ``share`` mixes with neighbours (the rest stay local)."""
    groups = {g.strip() for g in cfg.share.split(",")}
    names = list(trainable) if "all" in groups else [
        n for n in trainable if param_group(n) in groups]  # fmt: skip
    if not names:
        present = sorted({param_group(n) for n in trainable})
        raise ConfigError(
            "share", cfg.share, f"groups with trainable parameters under finetune={cfg.finetune}: "
            f"{', '.join(present)}",
        )  # fmt: skip
    return names


def get_params(
    model: nn.Module | Mapping[str, torch.Tensor], names: list[str]
) -> dict[str, np.ndarray]:
    """Copies of the named parameters as numpy arrays (what travels between nodes).

    ``model`` may be the module or its ``dict(named_parameters())``: a caller that reads and
    writes the same model every round keeps the dict, since walking a ViT's module tree for it
    costs more than copying a head's parameters.
    """
    params = model if isinstance(model, Mapping) else dict(model.named_parameters())
    return {n: params[n].detach().cpu().numpy().copy() for n in names}


def set_params(
    model: nn.Module | Mapping[str, torch.Tensor], values: dict[str, np.ndarray]
) -> None:
    """Overwrite the named parameters in place (``model`` as in ``get_params``)."""
    params = model if isinstance(model, Mapping) else dict(model.named_parameters())
    with torch.no_grad():
        for n, v in values.items():
            params[n].copy_(torch.from_numpy(np.ascontiguousarray(v)))


def data_config(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std normalisation the model's pretrained config expects."""
    cfg = timm.data.resolve_data_config({}, model=model)
    return tuple(cfg["mean"]), tuple(cfg["std"])
