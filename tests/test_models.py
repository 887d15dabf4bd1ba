import pytest
import torch
from safetensors.torch import save_file

from flower_p2p.config import ExperimentConfig
from flower_p2p.models import apply_finetune, create_model, get_params, set_params
from flower_p2p.registry import ConfigError
from flower_p2p.training import make_optimizer, train_epochs

SMALL = {
    "vit_tiny_patch16_224": dict(img_size=32, patch_size=8, depth=2),
    "deit_tiny_patch16_224": dict(img_size=32, patch_size=8, depth=2),
    "swin_tiny_patch4_window7_224": dict(img_size=32, patch_size=2, depth=2, window_size=4),
}


@pytest.mark.parametrize("name", SMALL)
def test_small_vit_deit_swin_build_and_train_a_step(name):
    cfg = ExperimentConfig(model=name, **SMALL[name])
    model = create_model(cfg, num_classes=10)
    apply_finetune(model, cfg)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    assert model(x).shape == (8, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, "adamw", 1e-3, 0.0)
    loss = train_epochs(
        model, x, y, opt, 1, 8, torch.Generator().manual_seed(0), torch.device("cpu")
    )
    assert loss > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "one optimizer step changed no weight"


@pytest.mark.parametrize("name", SMALL)
def test_trainable_set_per_finetune_mode(name):
    cfg = ExperimentConfig(model=name, **SMALL[name])
    model = create_model(cfg, 10)
    all_names = [n for n, _ in model.named_parameters()]
    assert apply_finetune(model, cfg) == all_names
    head = apply_finetune(model, cfg.replace(finetune="head"))
    assert head and all(n.startswith("head.") for n in head)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(head)
    assert sum(p.numel() for n, p in model.named_parameters() if n in head) == 10 * (
        model.num_features + 1
    )


def test_same_seed_same_initial_weights_other_seed_different():
    cfg = ExperimentConfig(depth=1)
    a, b, c = create_model(cfg, 10), create_model(cfg, 10), create_model(cfg.replace(seed=1), 10)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


@pytest.fixture()
def checkpoint(tmp_path):
    """A 'pretrained' 7-class model saved the way `sim pretrain` will: a safetensors state dict."""
    cfg = ExperimentConfig(depth=2, seed=11)
    src = create_model(cfg, num_classes=7)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    return src, path


def test_local_checkpoint_loads_backbone_and_resets_head(checkpoint):
    src, path = checkpoint
    cfg = ExperimentConfig(depth=2, pretrained=str(path))
    model = create_model(cfg, num_classes=10)
    src_state, state = src.state_dict(), model.state_dict()
    backbone = [k for k in state if not k.startswith("head.")]
    assert all(torch.equal(state[k], src_state[k]) for k in backbone)
    assert model.head.weight.shape == (10, model.num_features)
    # same class count: the head is still reset, not carried over
    same = create_model(cfg, num_classes=7)
    assert not torch.equal(same.head.weight, src_state["head.weight"])
    assert torch.equal(same.blocks[1].mlp.fc1.weight, src_state["blocks.1.mlp.fc1.weight"])


def test_checkpoint_of_the_wrong_shape_is_refused(checkpoint, tmp_path):
    _, path = checkpoint
    with pytest.raises(ConfigError, match=r"pretrained=.*ckpt.safetensors.*matching model"):
        create_model(ExperimentConfig(depth=3, pretrained=str(path)), num_classes=10)


def test_params_roundtrip_only_trainable():
    cfg = ExperimentConfig(depth=1, finetune="head")
    model = create_model(cfg, 10)
    names = apply_finetune(model, cfg)
    params = get_params(model, names)
    assert set(params) == {"head.weight", "head.bias"}
    set_params(model, {k: v + 1 for k, v in params.items()})
    assert torch.allclose(model.head.bias, torch.from_numpy(params["head.bias"]) + 1)
