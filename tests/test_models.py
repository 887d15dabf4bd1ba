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
    model, _ = apply_finetune(create_model(cfg, num_classes=10), cfg)
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
    assert apply_finetune(model, cfg)[1] == all_names
    model, head = apply_finetune(model, cfg.replace(finetune="head"))
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
    model, names = apply_finetune(model, cfg)
    params = get_params(model, names)
    assert set(params) == {"head.weight", "head.bias"}
    set_params(model, {k: v + 1 for k, v in params.items()})
    assert torch.allclose(model.head.bias, torch.from_numpy(params["head.bias"]) + 1)


@pytest.mark.parametrize(("name", "k", "first"), [
    ("vit_tiny_patch16_224", 1, "blocks.1."),
    ("vit_tiny_patch16_224", 2, "blocks.0."),
    ("swin_tiny_patch4_window7_224", 1, "layers.1.blocks.1."),
])  # fmt: skip
def test_last_k_trains_the_last_blocks_norm_and_head(name, k, first):
    cfg = ExperimentConfig(model=name, finetune="last-k", last_k=k, **SMALL[name])
    model, names = apply_finetune(create_model(cfg, 10), cfg)
    all_names = [n for n, _ in model.named_parameters()]
    start = all_names.index(next(n for n in all_names if n.startswith(first)))
    assert names == all_names[start:]
    assert any(n.startswith("norm.") for n in names) and names[-1].startswith("head.")


def test_last_k_beyond_the_depth_is_refused():
    cfg = ExperimentConfig(depth=2, finetune="last-k", last_k=3)
    with pytest.raises(ConfigError, match=r"last-k=3 .*\[1, 2\]"):
        apply_finetune(create_model(cfg, 10), cfg)


@pytest.mark.parametrize("name", SMALL)
def test_lora_trains_only_adapters_and_head_and_keeps_the_backbone(name):
    cfg = ExperimentConfig(model=name, finetune="lora", **SMALL[name])
    base = create_model(cfg, 10)
    frozen_before = {n: p.detach().clone() for n, p in base.named_parameters()
                     if not n.startswith("head")}  # fmt: skip
    model, names = apply_finetune(base, cfg)
    assert names and all(("lora_" in n) or ("modules_to_save" in n) for n in names)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    opt = make_optimizer(model, "adamw", 1e-2, 0.0)
    train_epochs(model, x, y, opt, 2, 4, torch.Generator().manual_seed(0), torch.device("cpu"))
    after = dict(base.named_parameters())  # peft wraps the base model in place
    for n, before in frozen_before.items():
        key = n.replace("qkv.", "qkv.base_layer.") if "qkv." in n else n
        assert torch.equal(after[key], before), n
    full = sum(p.numel() for p in create_model(cfg, 10).parameters())
    sent = sum(p.numel() for n, p in model.named_parameters() if n in names)
    assert sent < 0.05 * full if name.startswith("vit") else sent < 0.1 * full
