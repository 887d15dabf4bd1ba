"""Where each node's model looks: attention rollout (ViT, DeiT) or input-gradient saliency (Swin).

**Attention rollout** (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"): per
layer, average the attention over heads, add the identity (the residual connection) and
renormalise the rows; multiply the layers (the last on the left); the class token's row over the
patch tokens is how much each patch flows into the prediction. Our maps are renormalised to
**sum to 1 over the patches**: a distribution over the (H/p x W/p) grid, so that the maps of
different models are on the same scale.

**Swin** has no class token and attends inside (shifted) windows, so rollout does not apply. For
Swin, and any ViT that does not predict from a class token, the map is the **input-gradient
saliency** |d logit_pred / d x| (Simonyan et al. 2014), max over colour channels, at pixel
resolution, also summing to 1.

Node models are rebuilt from what the run saved (``final/node-<i>.safetensors``), never retrained.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from matplotlib.figure import Figure
from timm.layers import Attention
from torch import nn

from flower_p2p.config import ExperimentConfig
from flower_p2p.results import FINAL_DIR, node_params_path, read_params
from sim.runs import Run

ROLLOUT = "attention rollout (Abnar & Zuidema 2020): class token -> patches"
SALIENCY = "input-gradient saliency |d logit / d x| (no class token to roll out)"


def attention_rollout(attentions: list[torch.Tensor], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Rollout of per-layer attentions (B, heads, N, N), first layer first.

    Returns (B, N - num_prefix_tokens): the class token's rolled-out attention over the patch
    tokens, renormalised to sum to 1 per image.
    """
    rollout = None
    for attn in attentions:
        a = attn.float().mean(dim=1)
        a = a + torch.eye(a.shape[-1], device=a.device)  # the residual path
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    cls_to_patches = rollout[:, 0, num_prefix_tokens:]
    return cls_to_patches / cls_to_patches.sum(dim=-1, keepdim=True)


@contextmanager
def recorded_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect softmax(q k^T * scale) of every timm ``Attention`` during forward passes.

    timm's fused kernel never materialises the attention matrix, so the modules are switched to
    their explicit path for the duration; the matrix is what enters their ``attn_drop``.
    """
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    fused = [m.fused_attn for m in modules]
    store: list[torch.Tensor] = []
    hooks = [
        m.attn_drop.register_forward_hook(lambda _m, inp, _out: store.append(inp[0].detach()))
        for m in modules
    ]
    for m in modules:
        m.fused_attn = False
    try:
        yield store
    finally:
        for m, f in zip(modules, fused, strict=True):
            m.fused_attn = f
        for h in hooks:
            h.remove()


def input_saliency(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|d logit_pred / d x|, max over channels, summing to 1 per image (B, H, W); predictions."""
    x = images.clone().requires_grad_(True)
    logits = model(x)
    preds = logits.argmax(dim=1)
    logits.gather(1, preds[:, None]).sum().backward()
    sal = x.grad.abs().amax(dim=1)
    return sal / sal.sum(dim=(1, 2), keepdim=True), preds


def uses_rollout(model: nn.Module) -> bool:
    """Whether the model predicts from a class token through timm ``Attention`` (ViT, DeiT)."""
    return (
        getattr(model, "num_prefix_tokens", 0) >= 1
        and getattr(model, "global_pool", "") == "token"
        and any(isinstance(m, Attention) for m in model.modules())
    )


def explain(model: nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, str]:
    """One map per image (rollout on the patch grid, or saliency per pixel), predictions, method."""
    model.eval()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft (LoRA)
    if not uses_rollout(base):
        maps, preds = input_saliency(model, images)
        return maps.detach().numpy(), preds.numpy(), SALIENCY
    with torch.no_grad(), recorded_attention(model) as attentions:
        logits = model(images)
    maps = attention_rollout(attentions, base.num_prefix_tokens)
    maps = maps.reshape(len(images), *base.patch_embed.grid_size)
    return maps.numpy(), logits.argmax(dim=1).numpy(), ROLLOUT


def saved_nodes(run: Run) -> list[int]:
    """Nodes whose final parameters the run saved."""
    files = (run.dir / FINAL_DIR).glob("node-*.safetensors")
    return sorted(int(p.stem.removeprefix("node-")) for p in files)


def _test_images(
    cfg: ExperimentConfig, count: int
) -> tuple[nn.Module, torch.Tensor, np.ndarray, np.ndarray]:
    """The model skeleton of ``cfg`` and its first test images of distinct classes.

    Returns the model, the images as the model sees them, as grey levels to show, and labels.
    """
    from flower_p2p.data import load_data, make_transform, to_tensors
    from flower_p2p.models import apply_finetune, create_model, data_config

    bundle = load_data(cfg)
    model, _ = apply_finetune(create_model(cfg, bundle.num_classes), cfg)
    labels = bundle.test[bundle.label_column]
    first = {}
    for i, y in enumerate(labels):
        first.setdefault(y, i)
        if len(first) == count:
            break
    transform = make_transform(cfg.img_size or 224, *data_config(model))
    x, y = to_tensors(bundle.test.select(sorted(first.values())), bundle, transform)
    mean, std = (torch.tensor(v)[:, None, None] for v in data_config(model))
    shown = (x * std + mean).mean(dim=1).clamp(0, 1).numpy()  # what the eye sees: grey levels
    return model, x, shown, y.numpy()


def _maps_of(
    run: Run, nodes: list[int], count: int
) -> tuple[dict[int, tuple[np.ndarray, np.ndarray, str]], np.ndarray, np.ndarray]:
    """``explain`` of each saved node model of ``run`` on the same test images; images; labels."""
    from flower_p2p.models import set_params

    model, x, shown, labels = _test_images(ExperimentConfig.from_run_config(run.config), count)
    out = {}
    for node in nodes:
        set_params(model, read_params(node_params_path(run.dir / FINAL_DIR, node)))
        out[node] = explain(model, x)
    return out, shown, labels


def attention_figure(
    run: Run, reference: Run | None = None, num_images: int = 4, max_nodes: int = 8
) -> Figure | None:
    """Rows: test images; columns: the image, the centralized model's map, each node's map.

    None when the run saved no final parameters (runs from before they were saved).
    """
    import matplotlib.pyplot as plt

    from sim.plots import suptitle

    nodes = saved_nodes(run)
    if not nodes:
        return None
    shown_nodes = nodes[:max_nodes]
    maps, shown, labels = _maps_of(run, shown_nodes, num_images)
    columns = [(f"node {n}", maps[n]) for n in shown_nodes]
    has_reference = reference is not None and bool(saved_nodes(reference))
    if has_reference:
        ref_maps, _, _ = _maps_of(reference, saved_nodes(reference)[:1], num_images)
        columns.insert(0, ("centralized", next(iter(ref_maps.values()))))
    method = columns[0][1][2]
    rows = len(labels)
    fig, axes = plt.subplots(rows, len(columns) + 1, figsize=(1.5 * (len(columns) + 1), 1.6 * rows),
                             squeeze=False, layout="constrained")  # fmt: skip
    h, w = shown.shape[1:]
    for i in range(rows):
        axes[i][0].imshow(shown[i], cmap="gray", vmin=0, vmax=1)
        axes[i][0].set_xlabel(f"label {labels[i]}", fontsize=8)
        for j, (_, (m, preds, _)) in enumerate(columns, start=1):
            ax = axes[i][j]
            ax.imshow(m[i], cmap="inferno", extent=(0, w, h, 0), interpolation="nearest",
                      vmin=0, vmax=m[i].max())  # fmt: skip
            # the digit's outline on top, so the map reads against the image
            ax.contour(np.arange(w) + 0.5, np.arange(h) + 0.5, shown[i], levels=[0.5],
                       colors="cyan", linewidths=0.7)  # fmt: skip
            ok = preds[i] == labels[i]
            ax.set_xlabel(f"pred {preds[i]}", fontsize=8, color="tab:green" if ok else "tab:red")
    for j, (name, _) in enumerate([("input", None), *columns]):
        axes[0][j].set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    notes = [method, "bright = large share of the map (each sums to 1); cyan: the image's outline"]
    if not has_reference:
        notes.append("no centralized model in this folder: nodes only")
    if len(nodes) > len(shown_nodes):
        notes.append(f"nodes {shown_nodes[0]}-{shown_nodes[-1]} of {len(nodes)}")
    suptitle(fig, f"{run.config['model']}, {run.config['strategy']}", *notes)
    return fig
