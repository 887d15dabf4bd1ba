"""Attention rollout (ViT, DeiT) and input-gradient saliency (Swin): shapes, normalisation, and
the rollout's algebra on hand-made attention matrices."""

import pytest
import torch

from flower_p2p.config import ExperimentConfig
from flower_p2p.models import apply_finetune, create_model
from sim.attention import (
    ROLLOUT,
    SALIENCY,
    attention_rollout,
    explain,
    recorded_attention,
)


def attending(rows: dict[int, int], n: int = 5) -> torch.Tensor:
    """(1, 1, n, n) attention: token i attends only to rows[i] (others to themselves)."""
    a = torch.eye(n)
    for i, j in rows.items():
        a[i] = 0
        a[i, j] = 1
    return a[None, None]


def test_rollout_of_one_layer_is_the_class_token_row_with_the_residual():
    # class token attends fully to patch 2 (token 3): with the identity added, half stays on
    # the class token, half goes to patch 2; over patches only, renormalised: all on patch 2
    maps = attention_rollout([attending({0: 3})])
    assert torch.allclose(maps, torch.tensor([[0.0, 0.0, 1.0, 0.0]]))


def test_rollout_multiplies_layers_last_on_the_left():
    # layer 1: class token -> patch 0; layer 2: class token -> patch 1.
    # R = A2_hat @ A1_hat: row 0 = 0.25 e_cls + 0.25 e_p0 + 0.5 e_p1 -> patches [1/3, 2/3, 0, 0]
    # (the reversed product would give [2/3, 1/3, 0, 0])
    maps = attention_rollout([attending({0: 1}), attending({0: 2})])
    assert torch.allclose(maps, torch.tensor([[1 / 3, 2 / 3, 0.0, 0.0]]))


def test_rollout_averages_heads_and_sums_to_one():
    two_heads = torch.cat([attending({0: 1}), attending({0: 4})], dim=1)  # (1, 2, 5, 5)
    maps = attention_rollout([two_heads])
    assert torch.allclose(maps, torch.tensor([[0.5, 0.0, 0.0, 0.5]]))
    random = torch.rand(3, 4, 17, 17).softmax(dim=-1)
    maps = attention_rollout([random, random.flip(0)], num_prefix_tokens=1)
    assert maps.shape == (3, 16) and (maps >= 0).all()
    assert torch.allclose(maps.sum(dim=1), torch.ones(3))


def small(model: str, **kw) -> ExperimentConfig:
    return ExperimentConfig(model=model, img_size=32, patch_size=8, depth=2, **kw)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_vit_and_deit_maps_are_rollouts_on_the_patch_grid(name):
    cfg = small(name)
    model, _ = apply_finetune(create_model(cfg, 10), cfg)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        with recorded_attention(model) as attentions:
            explicit = model(x)
    # one (B, heads, 1 + 16, 1 + 16) row-stochastic matrix per block, same output as fused
    assert len(attentions) == 2 and attentions[0].shape == (3, 3, 17, 17)
    assert torch.allclose(attentions[0].sum(dim=-1), torch.ones(3, 3, 17), atol=1e-5)
    assert torch.allclose(fused, explicit, atol=1e-5)
    maps, preds, method = explain(model, x)
    assert method == ROLLOUT and maps.shape == (3, 4, 4) and preds.shape == (3,)
    assert (maps >= 0).all() and maps.sum(axis=(1, 2)) == pytest.approx([1, 1, 1], abs=1e-5)
    with torch.no_grad(), recorded_attention(model) as again:
        model(x[:1])
    assert len(again) == 2 and len(attentions) == 2  # hooks removed: nothing recorded after


def test_lora_model_is_rolled_out_through_the_peft_wrapper():
    cfg = small("vit_tiny_patch16_224", finetune="lora")
    model, _ = apply_finetune(create_model(cfg, 10), cfg)
    maps, _, method = explain(model, torch.randn(2, 3, 32, 32))
    assert method == ROLLOUT and maps.shape == (2, 4, 4)


def test_swin_gets_an_input_gradient_saliency_map_per_pixel():
    cfg = ExperimentConfig(model="swin_tiny_patch4_window7_224", img_size=32, patch_size=2,
                           depth=2, window_size=4)  # fmt: skip
    model, _ = apply_finetune(create_model(cfg, 10), cfg)
    maps, preds, method = explain(model, torch.randn(2, 3, 32, 32))
    assert method == SALIENCY and maps.shape == (2, 32, 32) and preds.shape == (2,)
    assert (maps >= 0).all() and maps.sum(axis=(1, 2)) == pytest.approx([1, 1], abs=1e-5)
