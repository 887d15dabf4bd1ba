"""Frozen-prefix cache: same training as without it, invalidation, the memory bound."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flower_p2p.config import ExperimentConfig
from flower_p2p.models import apply_finetune, create_model
from flower_p2p.node import node_runtime
from flower_p2p.prefix_cache import cache_key, find_split
from flower_p2p.registry import ConfigError
from flower_p2p.server_app import preflight
from sim.loop import run_plain

RUN = dict(num_nodes=3, num_rounds=3, depth=2, local_steps=3, eval_every=1, alpha=1.0)
SMALL = {
    "vit_tiny_patch16_224": dict(depth=2),
    "deit_tiny_distilled_patch16_224": dict(depth=2),
    "swin_tiny_patch4_window7_224": dict(depth=2, patch_size=4, window_size=4),
}


@pytest.mark.parametrize(("finetune", "last_k"), [("head", 1), ("last-k", 1)])
def test_cached_and_uncached_training_give_the_same_parameters(finetune, last_k):
    base = ExperimentConfig(finetune=finetune, last_k=last_k, **RUN)
    cached = run_plain(base.replace(prefix_cache="on"))
    plain = run_plain(base.replace(prefix_cache="off"))
    assert node_runtime(base.replace(prefix_cache="on"), 0).cache.on
    assert not node_runtime(base.replace(prefix_cache="off"), 0).cache.on
    for node, params in plain["params"].items():
        assert set(params) == set(cached["params"][node])
        initial = node_runtime(base.replace(prefix_cache="off"), node).initial_params
        for name, value in params.items():
            assert not np.array_equal(value, initial[name])  # it trained
            np.testing.assert_allclose(cached["params"][node][name], value, atol=2e-5, rtol=1e-4)
    for rnd, accs in plain["accuracy"].items():  # at most one test image of 360 flips
        np.testing.assert_allclose(cached["accuracy"][rnd], accs, atol=1 / 360 + 1e-9)


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize(("finetune", "last_k"), [("head", 1), ("last-k", 1), ("last-k", 3)])
def test_suffix_of_prefix_is_the_model(name, finetune, last_k):
    cfg = ExperimentConfig(model=name, finetune=finetune, last_k=min(last_k, 2), **SMALL[name])
    model, trainable = apply_finetune(create_model(cfg, 10), cfg)
    split = find_split(model, cfg, trainable)
    if isinstance(split, str):  # distilled DeiT head-only: said why, nothing cached
        assert name.startswith("deit") and finetune == "head" and "distilled" in split
        return
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(split.suffix(split.prefix(x)), model(x))


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_modes_without_a_frozen_prefix_say_why_and_refuse_on(finetune):
    cfg = ExperimentConfig(depth=1, finetune=finetune)
    assert node_runtime(cfg, 0).cache.reason.startswith("off: finetune=")
    with pytest.raises(ConfigError, match="prefix-cache"):
        preflight(cfg.replace(prefix_cache="on"))


def test_frozen_prefix_runs_in_eval_mode_while_training():
    # Swin's default drop-path is 0.1: in train mode the frozen blocks would be random.
    cfg = ExperimentConfig(finetune="last-k", last_k=1, prefix_cache="off",
                           **SMALL["swin_tiny_patch4_window7_224"],
                           model="swin_tiny_patch4_window7_224")  # fmt: skip
    rt = node_runtime(cfg, 0)
    rt.net.train()
    modes = {n: m.training for n, m in rt.model.named_modules()}
    assert not modes["patch_embed"] and not modes["layers.0"] and not modes["layers.1.blocks.0"]
    assert modes["layers.1.blocks.1"] and modes["head"]
    torch.manual_seed(1)
    a = rt.cache.split.prefix(rt.train_x[:4])
    torch.manual_seed(2)
    torch.testing.assert_close(a, rt.cache.split.prefix(rt.train_x[:4]))


def test_frozen_prefix_returns_to_eval_after_the_whole_model_was_put_in_train_mode():
    # SplitNet skips the walk over the frozen modules while the model is already in eval mode;
    # a model.train() elsewhere (the memory estimate's forward pass) must not leave them training.
    cfg = ExperimentConfig(finetune="last-k", last_k=1, prefix_cache="off",
                           **SMALL["swin_tiny_patch4_window7_224"],
                           model="swin_tiny_patch4_window7_224")  # fmt: skip
    rt = node_runtime(cfg, 0)
    for before in (rt.model.train, rt.net.eval, rt.net.train, rt.model.eval):
        before()
        rt.net.train()
        modes = {n: m.training for n, m in rt.model.named_modules()}
        assert not modes["patch_embed"] and not modes["layers.1.blocks.0"], before
        assert modes["layers.1.blocks.1"] and modes["head"], before
    rt.net.eval()
    assert not any(m.training for m in rt.model.modules())


def test_cache_is_invalidated_when_the_checkpoint_or_preprocessing_changes(tmp_path):
    cfg0 = ExperimentConfig(depth=1, finetune="head")
    model = create_model(cfg0, 10)
    ckpt = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    cfg = cfg0.replace(pretrained=str(ckpt))
    norm = ((0.5,) * 3, (0.5,) * 3)
    key = cache_key(cfg, *norm, part="test")
    first = node_runtime(cfg, 0)
    assert first.cache.on and node_runtime(cfg, 0) is first  # built once per process

    # Same path, new weights: a new runtime with activations of the new weights.
    state = {k: (v + 0.5).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(ckpt))
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))
    assert cache_key(cfg, *norm, part="test") != key
    second = node_runtime(cfg, 0)
    assert second is not first
    assert not torch.allclose(second.train_x, first.train_x)
    assert not torch.allclose(second.test_x, first.test_x)
    fresh = node_runtime(cfg.replace(prefix_cache="off"), 0)
    fresh.model.eval()
    expected = fresh.cache.split.prefix(fresh.train_x)
    torch.testing.assert_close(second.train_x, expected)

    # Preprocessing (image size, normalisation) and the fine-tune cut are part of the key.
    assert cache_key(cfg.replace(img_size=16), *norm, part="test") != key
    assert cache_key(cfg, (0.4,) * 3, (0.5,) * 3, part="test") != key
    assert cache_key(cfg.replace(finetune="last-k"), *norm, part="test") != key


def test_memory_bound_falls_back_under_auto_and_is_refused_under_on():
    # last-k on the default model: 17 tokens x 192 floats = 13 KB per image, ~8 MB per node.
    cfg = ExperimentConfig(depth=2, finetune="last-k", cache_max_mb=1)
    rt = node_runtime(cfg, 0)
    assert not rt.cache.on and "exceed cache-max-mb=1" in rt.cache.reason
    assert rt.train_x.shape[1:] == (3, 32, 32)  # trains on images, as without the cache
    with pytest.raises(ConfigError, match="cache-max-mb=1 is not allowed: at least 8"):
        preflight(cfg.replace(prefix_cache="on"))
    assert node_runtime(cfg.replace(cache_max_mb=64), 0).cache.on


def test_bad_prefix_cache_values_are_refused():
    with pytest.raises(ConfigError, match="prefix-cache='yes'"):
        ExperimentConfig(prefix_cache="yes").validate()
    with pytest.raises(ConfigError, match="cache-max-mb=0"):
        ExperimentConfig(cache_max_mb=0).validate()
