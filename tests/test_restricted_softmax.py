"""``restricted-softmax`` (FedRS): local steps give no gradient to a node's missing classes."""

import pytest
import torch

from flower_p2p.config import ExperimentConfig
from flower_p2p.models import apply_finetune, create_model
from flower_p2p.node import NodeRuntime
from flower_p2p.registry import ConfigError
from flower_p2p.training import make_optimizer, restricted_softmax_scale, train_epochs


def test_scale_is_alpha_on_missing_classes_and_none_when_nothing_to_scale():
    scale = restricted_softmax_scale(5, torch.tensor([1, 3]), 0.25)
    assert scale.tolist() == [0.25, 1.0, 0.25, 1.0, 0.25]
    assert restricted_softmax_scale(5, torch.tensor([1, 3]), 1.0) is None  # plain cross-entropy
    assert restricted_softmax_scale(3, torch.tensor([0, 1, 2]), 0.0) is None  # saw every class


def _train_head(
    alpha: float, optimizer: str = "sgd", lr: float = 0.1, wd: float = 0.0, steps: int = 4
) -> tuple[torch.Tensor, torch.nn.Module]:
    """(head weight before, model after) ``steps`` local steps of a node holding classes 0, 1."""
    cfg = ExperimentConfig(depth=1, img_size=16)
    model, _ = apply_finetune(create_model(cfg, 6), cfg)
    before = model.head.weight.detach().clone()
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 2, (64,))  # holds classes 0 and 1 only
    opt = make_optimizer(model, optimizer, lr, wd)
    scale = restricted_softmax_scale(6, torch.tensor([0, 1]), alpha)
    gen = torch.Generator().manual_seed(0)
    train_epochs(model, x, y, opt, 1, 16, gen, torch.device("cpu"), steps=steps, logit_scale=scale)
    return before, model


def _head_after_training(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    # SGD without weight decay: a row that gets no gradient does not move at all.
    before, model = _train_head(alpha)
    moved = (model.head.weight.detach() - before).abs().amax(dim=1)
    bias_moved = model.head.bias.detach().abs()  # timm zero-initialises the head's bias
    return moved, bias_moved


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_alpha_zero_without_weight_decay_leaves_missing_rows_bit_identical(optimizer):
    before, model = _train_head(0.0, optimizer, lr=1e-2, wd=0.0)
    after = model.head.weight.detach()
    assert torch.equal(after[2:], before[2:])
    assert not torch.equal(after[:2], before[:2])


def test_alpha_zero_with_adamw_decay_shrinks_missing_rows_by_one_minus_lr_wd_per_step():
    # AdamW decays decoupled from the gradient: p <- p * (1 - lr * wd), then the Adam step,
    # which is exactly 0 for a row whose moments stayed 0 (0 / (0 + eps)).
    lr, wd, steps = 1e-2, 0.5, 4
    before, model = _train_head(0.0, "adamw", lr=lr, wd=wd, steps=steps)
    expected = before[2:].clone()
    for _ in range(steps):
        expected.mul_(1 - lr * wd)
    assert torch.equal(model.head.weight.detach()[2:], expected)
    assert not torch.equal(expected, before[2:])


def test_alpha_zero_leaves_missing_class_rows_to_mixing_alone():
    moved, bias = _head_after_training(0.0)
    assert (moved[:2] > 0).all() and (bias[:2] > 0).all()  # its own classes train
    assert (moved[2:] == 0).all() and (bias[2:] == 0).all()  # the missing ones do not move


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_alpha_above_zero_still_pushes_missing_classes_down(alpha):
    moved, bias = _head_after_training(alpha)
    assert (moved[2:] > 0).all() and (bias[2:] > 0).all()


def test_node_gets_its_scale_from_its_own_partition():
    cfg = ExperimentConfig(
        partitioner="unseen", classes_per_node=2, num_nodes=5, depth=1, img_size=16,
        unseen_layout="disjoint-neighbours",
        restricted_softmax=0.0,
    )  # fmt: skip
    rt = NodeRuntime(cfg, 1)
    held = set(rt.seen_classes.tolist())
    assert len(held) == 2
    assert [c for c in range(10) if rt.logit_scale[c] == 1.0] == sorted(held)
    assert NodeRuntime(cfg.replace(restricted_softmax=1.0), 1).logit_scale is None
    central = NodeRuntime(cfg.replace(strategy="centralized"), 0)
    assert central.logit_scale is None  # the centralized reference holds every class


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_out_of_range_alpha_is_refused(bad):
    with pytest.raises(ConfigError, match=r"restricted-softmax=.*in \[0, 1\]"):
        ExperimentConfig.from_run_config({"restricted-softmax": bad})
