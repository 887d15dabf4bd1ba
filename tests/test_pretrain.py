"""``sim pretrain``: a checkpoint timm loads bit-identically, refused when it does not fit."""

import json

import pytest
import torch
from safetensors.torch import load_file

from flower_p2p.config import ExperimentConfig
from flower_p2p.models import create_model
from flower_p2p.registry import ConfigError
from sim.cli import main
from sim.pretrain import PretrainConfig, sidecar_path

ARCH = ["depth=1", "img-size=16", "patch-size=8"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrain") / "rot.safetensors"
    assert main(["pretrain", *ARCH, "steps=3", "holdout=0.05", f"checkpoint={path}"]) == 0
    return path


def test_pretrain_writes_a_checkpoint_and_its_sidecar(checkpoint):
    meta = json.loads(sidecar_path(checkpoint).read_text())
    assert meta["model"] == "vit_tiny_patch16_224" and meta["source"] == "rotation"
    assert meta["overrides"] == {"img_size": 16, "patch_size": 8, "depth": 1}
    assert meta["num_classes"] == 4 and meta["downstream_labels_used"] is False
    assert 0.0 <= meta["source_accuracy"] <= 1.0 and meta["steps"] == 3
    # only the digits train pool (1437 images), 4 rotations each, minus the 5 % holdout
    assert meta["source_train_samples"] + meta["source_holdout_samples"] == 4 * 1437
    assert load_file(str(checkpoint))["head.weight"].shape[0] == 4


def test_pretrained_path_loads_the_trained_backbone_bit_identically(checkpoint):
    saved = load_file(str(checkpoint))
    cfg = ExperimentConfig(depth=1, img_size=16, patch_size=8, pretrained=str(checkpoint))
    state = create_model(cfg, num_classes=10).state_dict()
    backbone = [k for k in state if not k.startswith("head.")]
    assert backbone and all(torch.equal(state[k], saved[k]) for k in backbone)
    assert state["head.weight"].shape == (10, 192)  # reset for the downstream classes
    scratch = create_model(cfg.replace(pretrained="none"), num_classes=10).state_dict()
    assert not torch.equal(scratch["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"])


OTHER_ARCHS = [
    {"depth": 2},
    {"img_size": 32},
    {"patch_size": 4},
    {"model": "deit_small_patch16_224"},
]


@pytest.mark.parametrize("change", OTHER_ARCHS)
def test_checkpoint_of_another_architecture_is_refused(checkpoint, change):
    cfg = ExperimentConfig(depth=1, img_size=16, patch_size=8, pretrained=str(checkpoint))
    with pytest.raises(ConfigError, match=r"pretrained=.*rot.safetensors.*it was trained as"):
        create_model(cfg.replace(**change), num_classes=10)


def test_existing_checkpoint_is_not_overwritten_and_bad_keys_are_refused(checkpoint, capsys):
    before = checkpoint.read_bytes()
    assert main(["pretrain", *ARCH, "steps=1", f"checkpoint={checkpoint}"]) == 2
    assert "overwrite=true" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before
    with pytest.raises(ConfigError, match=r"source='jigsaw'.*rotation, supervised"):
        PretrainConfig.split({"source": "jigsaw"})
    with pytest.raises(ConfigError, match=r"checkpoint='x.pt'.*\.safetensors"):
        PretrainConfig.split({"checkpoint": "x.pt"})
    with pytest.raises(ConfigError, match="epochs"):
        PretrainConfig.split({"epochs": 0})
