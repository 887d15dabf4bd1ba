"""Local training and evaluation loops (plain torch, no Flower)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def pick_device() -> torch.device:
    """CUDA when present, else CPU; nothing requires a GPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lr_at_round(lr: float, schedule: str, rnd: int, num_rounds: int) -> float:
    """Learning rate of round ``rnd`` (1-based): constant, or cosine-decayed to 0 over the run."""
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * (rnd - 1) / num_rounds))
    return lr


def make_optimizer(
    model: nn.Module | list[torch.Tensor],
    name: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """AdamW or SGD (heavy-ball ``momentum``) over the trainable parameters only.

    ``model`` may be the module or the list of its trainable parameters in module order (kept
    by a caller that builds an optimizer every round); the order numbers the saved state.
    """
    if isinstance(model, nn.Module):
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = list(model)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def optimizer_state(opt: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """Per-parameter optimizer state (e.g. AdamW's step and moments) as named arrays.

    Names are ``"<param index>.<key>"``; the state stays on the node between rounds, never sent.
    Plain arrays, not ``torch.save`` bytes: packing them into the node's Flower state costs one
    buffer copy instead of a pickle. The hyperparameters are not stored: every round rebuilds
    them from the config (``NodeRuntime.optimizer``).
    """
    out: dict[str, np.ndarray] = {}
    for idx, entries in opt.state_dict()["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                out[f"{idx}.{key}"] = value.detach().cpu().numpy()
            elif value is not None:
                out[f"{idx}.{key}"] = np.asarray(value)
    return out


def load_optimizer_state(opt: torch.optim.Optimizer, arrays: dict[str, np.ndarray]) -> None:
    """Restore state saved by ``optimizer_state`` into a freshly built optimizer."""
    state: dict[int, dict] = {}
    for name, value in arrays.items():
        idx, key = name.split(".", 1)
        tensor = torch.tensor(value)  # a writable copy
        # Flower's Array stores a 0-d array as shape (1,); Adam's step counter is 0-d.
        state.setdefault(int(idx), {})[key] = tensor.reshape(()) if key == "step" else tensor
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def minibatches(n: int, batch_size: int, generator: torch.Generator, epochs: int, steps: int):
    """Index batches: ``epochs`` shuffled passes, or exactly ``steps`` batches when steps > 0.

    Steps draw from fresh shuffled passes as needed, so a node with little data still takes
    ``steps`` full batches (the same number of optimizer steps everywhere).
    """
    taken = 0
    for _ in range(epochs if steps <= 0 else 1 << 30):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            if 0 < steps <= taken:
                return
            yield order[start : start + batch_size]
            taken += 1


def train_epochs(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    steps: int = 0,
    logit_scale: torch.Tensor | None = None,
    correction: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    mean_gradient: list[torch.Tensor] | None = None,
) -> float:
    """Minibatch training for ``epochs`` passes (or ``steps`` batches); returns the mean loss.

    ``logit_scale`` (one factor per class) multiplies the logits before the cross-entropy:
    ``restricted_softmax_scale`` builds it for a node that lacks some classes. ``correction``
    pairs (parameter, u): after every optimizer step, parameter <- parameter - lr * u (a gossip
    algorithm's ``local_correction``: K-GT's tracker, QG-DSGDm's momentum). Given
    ``mean_gradient`` (an empty list), u is instead added to the parameter's gradient before
    every step, and the list receives, per pair, the mean corrected gradient over the steps
    (K-GT-grad's D_i).
    """
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    scale = None if logit_scale is None else logit_scale.to(device)
    total, seen, taken = 0.0, 0, 0
    in_gradient = mean_gradient is not None
    sums = [torch.zeros_like(param) for param, _ in correction or []] if in_gradient else []
    for idx in minibatches(len(labels), batch_size, generator, epochs, steps):
        x, y = images[idx].to(device), labels[idx].to(device)
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = loss_fn(logits if scale is None else logits * scale, y)
        loss.backward()
        if in_gradient:
            with torch.no_grad():
                for (param, u), acc in zip(correction or [], sums, strict=True):
                    if param.grad is None:  # no gradient this step (unused): the correction alone
                        param.grad = u.clone()
                    else:
                        param.grad.add_(u)
                    acc.add_(param.grad)
        optimizer.step()
        taken += 1
        if correction and not in_gradient:
            with torch.no_grad():
                lr = optimizer.param_groups[0]["lr"]
                for param, u in correction:
                    param.sub_(u, alpha=lr)
        total += loss.item() * len(idx)
        seen += len(idx)
    if in_gradient:
        mean_gradient[:] = [acc / max(taken, 1) for acc in sums]
    return total / max(seen, 1)


def restricted_softmax_scale(
    num_classes: int, seen: torch.Tensor, alpha: float
) -> torch.Tensor | None:
    """FedRS's restricted softmax (Li & Zhan, KDD 2021): missing classes' logits scaled by alpha.

    Trained on its own classes only, a node's cross-entropy pushes every other class's logit
    down, so its local steps undo what mixing brought in about classes it never holds. Scaling
    the logits of the classes not in ``seen`` (the class ids the node holds) by ``alpha`` in the
    local loss damps that; 1 is plain cross-entropy (None: nothing to scale). Evaluation always
    uses the plain logits.

    0 gives the missing classes' head rows (weight and bias) a zero gradient. With
    ``weight-decay=0`` local training then leaves them bit-identical (only mixing moves them);
    weight decay still shrinks them towards 0: AdamW multiplies them by ``1 - lr * wd`` every
    step (its moments for those rows stay 0, so the Adam step adds nothing), SGD adds
    ``wd * w`` to their zero gradient (through momentum).
    """
    if alpha >= 1.0 or len(seen) >= num_classes:
        return None
    scale = torch.full((num_classes,), float(alpha))
    scale[seen.long()] = 1.0
    return scale


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> tuple[float, float, torch.Tensor]:
    """Accuracy, mean cross-entropy and the predicted labels on (images, labels)."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, preds = 0.0, []
    for start in range(0, len(labels), batch_size):
        x, y = images[start : start + batch_size].to(device), labels[start : start + batch_size]
        logits = model(x).cpu()
        total_loss += loss_fn(logits, y).item()
        preds.append(logits.argmax(dim=1))
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    acc = float((pred == labels).float().mean()) if len(labels) else 0.0
    return acc, total_loss / max(len(labels), 1), pred
