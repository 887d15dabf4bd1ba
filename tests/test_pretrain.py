"""``sim pretrain``: a checkpoint timm loads bit-identically, refused when it does not fit."""

import json

import pytest
import torch
from safetensors.torch import load_file

from flower_p2p.config import ExperimentConfig
from flower_p2p.models import create_model
from flower_p2p.registry import ConfigError
from flower_p2p.server_app import preflight
from sim.cli import main
from sim.pretrain import PretrainConfig, sidecar_path

ARCH = ["depth=1", "img-size=16", "patch-size=8"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrain") / "rot.safetensors"
    args = ["source=rotation", "source-dataset=digits", "steps=3", "holdout=0.05"]
    assert main(["pretrain", *ARCH, *args, f"checkpoint={path}"]) == 0
    return path


def test_default_source_is_supervised_glyphs_sharing_nothing_with_digits(tmp_path):
    path = tmp_path / "glyphs.safetensors"
    assert main(["pretrain", *ARCH, "steps=2", f"checkpoint={path}"]) == 0
    meta = json.loads(sidecar_path(path).read_text())
    assert (meta["source"], meta["source_dataset"]) == ("supervised", "glyphs")
    assert meta["num_classes"] == 42 and meta["downstream_labels_used"] is False
    # only the glyphs train pool (80 % of 42 x 300), split 90/10 into train / holdout
    assert meta["source_train_samples"] + meta["source_holdout_samples"] == 10080
    cfg = ExperimentConfig(depth=1, img_size=16, patch_size=8, pretrained=str(path))
    assert create_model(cfg, num_classes=10).state_dict()["head.weight"].shape == (10, 192)


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


def _downstream(checkpoint, **changes) -> ExperimentConfig:
    """A downstream run on digits (the checkpoint's own source) from ``checkpoint``."""
    return ExperimentConfig(depth=1, img_size=16, patch_size=8, num_nodes=2,
                            pretrained=str(checkpoint), **changes)  # fmt: skip


def test_pretrain_records_the_test_fraction_it_carved(checkpoint):
    meta = json.loads(sidecar_path(checkpoint).read_text())
    # digits has no test split: pretraining read the train pool left by test-fraction=0.2
    assert meta["source_dataset"] == "digits" and meta["source_test_fraction"] == 0.2


def test_a_run_on_the_source_dataset_with_another_carve_is_refused(checkpoint):
    # test-fraction=0.3 moves images the backbone trained on into this run's test split
    with pytest.raises(ConfigError, match=r"pretrained=.*test-fraction=0\.2.*test-fraction=0\.3"):
        preflight(_downstream(checkpoint, test_fraction=0.3))
    preflight(_downstream(checkpoint, test_fraction=0.2))  # the same carve: no test image seen


def test_an_old_sidecar_without_the_carve_is_refused_on_its_source_dataset(checkpoint, tmp_path):
    old = tmp_path / "old.safetensors"
    old.write_bytes(checkpoint.read_bytes())
    meta = json.loads(sidecar_path(checkpoint).read_text())
    del meta["source_test_fraction"]
    sidecar_path(old).write_text(json.dumps(meta))
    advice = r"old\.safetensors\.json does not.*sim pretrain.*test-fraction=0\.2"
    with pytest.raises(ConfigError, match=advice):
        preflight(_downstream(old))


def test_pretrain_writes_the_checkpoint_before_its_sidecar(tmp_path, monkeypatch):
    import sim.pretrain

    path = tmp_path / "order.safetensors"
    sidecar_path(path).write_text("{}")  # a stale sidecar of an earlier checkpoint
    order = []
    real_bytes, real_json = sim.pretrain.atomic_write_bytes, sim.pretrain.write_json

    def write_bytes(p, data):
        order.append((p.name, sidecar_path(path).exists()))
        real_bytes(p, data)

    def write_json(p, obj):
        order.append((p.name, path.exists()))
        real_json(p, obj)

    monkeypatch.setattr(sim.pretrain, "atomic_write_bytes", write_bytes)
    monkeypatch.setattr(sim.pretrain, "write_json", write_json)
    args = ["source=rotation", "source-dataset=digits", "steps=1", "overwrite=true"]
    assert main(["pretrain", *ARCH, *args, f"checkpoint={path}"]) == 0
    # the stale sidecar went first, so no moment pairs the new weights with the old description
    assert order == [(path.name, False), (sidecar_path(path).name, True)]


def test_glyph_pretraining_gives_digits_a_better_linear_probe_than_random_init(tmp_path):
    # The point of the glyphs source: a backbone that never saw a digit is worth freezing for
    # digits. 150 steps of depth 2 (~30 s here) already lift the probe ~15 points (45 vs 30 %
    # on the 2-core dev machine); the full default run lifts it ~50 (README, Pretraining).
    from sim.loop import run_plain

    path = tmp_path / "glyphs.safetensors"
    arch = ["depth=2", "batch-size=64", "steps=150"]
    assert main(["pretrain", *arch, f"checkpoint={path}"]) == 0
    probe = ExperimentConfig(strategy="centralized", depth=2, num_rounds=15, eval_every=15,
                             finetune="head")  # fmt: skip
    pretrained = run_plain(probe.replace(pretrained=str(path)))["final_mean"]
    random_init = run_plain(probe)["final_mean"]
    assert pretrained >= random_init + 0.08, (pretrained, random_init)
