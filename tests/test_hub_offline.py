"""`pretrained=hub` and `dataset=<hub name>` offline, against a Hugging Face cache built here.

The cache holds what downloads from the hub leave (see ``hub_cache.py``): timm's hub repository of
a ViT-tiny with weights made from a fixed seed, and small image datasets published the way hub
datasets are. The project's own code (``create_model``, ``load_data``, the simulation engine) runs
unchanged against it with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
import pytest
import safetensors.torch
import timm
import torch
from datasets import ClassLabel, Dataset, Features, Image, Value
from hub_cache import prepare_like_online, publish_to_hub_cache, pushed_files, uploaded_files
from PIL import Image as PILImage
from sklearn.datasets import load_digits
from timm.models.vision_transformer import checkpoint_filter_fn

from flower_p2p import data
from flower_p2p.config import ExperimentConfig
from flower_p2p.data import load_data, make_transform, to_tensors
from flower_p2p.models import create_model
from flower_p2p.registry import ConfigError
from flower_p2p.results import read_jsonl
from flower_p2p.server_app import preflight
from sim.engine import run_experiment

MODEL = "vit_tiny_patch16_224"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PER_CLASS = 16  # 160 images of 8x8


def _point_at(mp: pytest.MonkeyPatch, home: Path) -> None:
    """All Hugging Face caches under ``home``, offline, for this process and Ray's workers."""
    paths = {"HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HF_DATASETS_CACHE": home / "datasets"}
    # Workers import the libraries afresh and read these; Ray starts them with this environment.
    for name, value in {**paths, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}.items():
        mp.setenv(name, str(value))
    # Here the libraries are imported already: they read the variables into constants at import.
    mp.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    mp.setattr(datasets.config, "HF_CACHE_HOME", str(home))
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    mp.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", home / "datasets" / "downloads")
    mp.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", home / "datasets/downloads/extracted")
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _digits() -> tuple[list[dict], list[int]]:
    """PER_CLASS of scikit-learn's digits per class, as PNG image cells and labels."""
    raw = load_digits()
    idx = np.concatenate([np.flatnonzero(raw.target == c)[:PER_CLASS] for c in range(10)])
    pixels = np.clip(raw.images[idx] * 16, 0, 255).astype(np.uint8)
    return [{"bytes": _png(p), "path": None} for p in pixels], raw.target[idx].tolist()


def _publish_datasets(hub: Path) -> set[int]:
    """Three repos, each also loaded once "online" as a user with internet would have.

    Returns the rows (``idx``) of the one published test split.
    """
    images, labels = _digits()
    idx = list(range(len(labels)))
    # 1. pushed with datasets: ClassLabel labels, an `img` column, train and test splits
    features = Features(
        {"img": Image(), "label": ClassLabel(names=list(WORDS)), "idx": Value("int64")}
    )
    pushed = Dataset.from_dict({"img": images, "label": labels, "idx": idx}, features=features)
    pushed = pushed.train_test_split(test_size=0.25, seed=0, stratify_by_column="label")
    repos = {"tester/digits-classlabel": pushed_files(pushed)}
    # 2./3. uploaded as plain parquet: integer or string labels, an `image` column, train only
    for kind, column in (("int", pa.array(labels)), ("str", pa.array([WORDS[y] for y in labels]))):
        table = pa.table({"image": images, "label": column, "idx": idx})
        label = Value("int64" if kind == "int" else "string")
        features = Features({"image": Image(), "label": label, "idx": Value("int64")})
        repos[f"tester/digits-{kind}"] = uploaded_files({"train": table}, features)
    for repo, files in repos.items():
        prepare_like_online(repo, *publish_to_hub_cache(hub, "dataset", repo, files))
    return set(pushed["test"]["idx"])


def _publish_weights(hub: Path) -> dict[str, torch.Tensor]:
    """timm's hub repository for MODEL holding weights made from a fixed seed (not cfg.seed)."""
    torch.manual_seed(1234)
    state = timm.create_model(MODEL, pretrained=False).state_dict()
    state = {k: v.contiguous() for k, v in state.items()}
    repo = timm.models.get_pretrained_cfg(MODEL).hf_hub_id
    assert repo == "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    publish_to_hub_cache(hub, "model", repo, {"model.safetensors": safetensors.torch.save(state)})
    return state


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-home")
    with pytest.MonkeyPatch.context() as mp:
        _point_at(mp, home)
        weights = _publish_weights(home / "hub")
        test_idx = _publish_datasets(home / "hub")
        yield SimpleNamespace(home=home, weights=weights, test_idx=test_idx)
    data._load_data_cached.cache_clear()  # its datasets live in this cache


ARCHITECTURES = {
    "full": dict(img_size=0, patch_size=0, depth=0),  # the hub model's own: 224 px, 16 px, 12
    "reduced": dict(img_size=32, patch_size=8, depth=4),  # the project's default
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hub_weights_load_from_the_cache(hub, arch):
    cfg = ExperimentConfig(pretrained="hub", **ARCHITECTURES[arch])
    loaded = create_model(cfg, num_classes=10).state_dict()
    assert loaded["head.weight"].shape == (10, 192)  # reset to the dataset's classes
    # timm adapts the hub tensors to the configured architecture (position embeddings and patch
    # projection resampled, later blocks dropped); online it gets the same bytes.
    kw = {k: v for k, v in ARCHITECTURES[arch].items() if v}
    expected = checkpoint_filter_fn(dict(hub.weights), timm.create_model(MODEL, **kw))
    body = [k for k in loaded if not k.startswith("head.")]
    assert all(torch.equal(loaded[k], expected[k]) for k in body)
    if arch == "full":
        assert set(loaded) == set(hub.weights)
        assert all(torch.equal(loaded[k], hub.weights[k]) for k in body)
    else:
        assert "blocks.3.mlp.fc2.weight" in loaded and "blocks.4.mlp.fc2.weight" not in loaded
        assert torch.equal(
            loaded["blocks.3.attn.qkv.weight"], hub.weights["blocks.3.attn.qkv.weight"]
        )


def test_hub_weights_missing_from_the_cache_are_refused_before_training(hub):
    cfg = ExperimentConfig(model="deit_tiny_patch16_224", pretrained="hub", depth=1)
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    assert str(err.value).startswith(
        "pretrained='hub' is not allowed: weights of model=deit_tiny_patch16_224 from the Hugging "
        "Face hub (timm/deit_tiny_patch16_224.fb_in1k): the hub is out of reach (HF_HUB_OFFLINE=1) "
        f"and the cache {hub.home / 'hub'} does not hold them"
    )
    with pytest.raises(ConfigError, match="timm has none for model=vit_base_patch16_gap_224"):
        preflight(cfg.replace(model="vit_base_patch16_gap_224"))


def _check_split(bundle, published_idx: set[int], test_size: int) -> None:
    """Every published row in exactly one node's partition or the test split."""
    train = [i for p in bundle.partitions for i in p["idx"]]
    test = list(bundle.test["idx"])
    assert len(test) == test_size and len(train) + len(test) == len(published_idx)
    assert set(train) | set(test) == published_idx


def test_hub_dataset_with_class_labels_and_a_test_split(hub):
    bundle = load_data(ExperimentConfig(dataset="tester/digits-classlabel", num_nodes=3))
    assert (bundle.image_column, bundle.label_column) == ("img", "label")
    assert bundle.class_names == WORDS
    _check_split(bundle, set(range(10 * PER_CLASS)), test_size=40)
    assert set(bundle.test["idx"]) == hub.test_idx  # the published test split, as published
    assert np.bincount(bundle.test["label"]).tolist() == [4] * 10
    assert isinstance(bundle.test[0]["img"], PILImage.Image)


@pytest.mark.parametrize("kind", ["int", "str"])
def test_hub_dataset_with_plain_labels_and_no_test_split(hub, kind):
    cfg = ExperimentConfig(dataset=f"tester/digits-{kind}", num_nodes=3, partitioner="iid")
    bundle = load_data(cfg)
    assert (bundle.image_column, bundle.label_column) == ("image", "label")
    # All ten classes, from the whole label column (a one-row probe once gave 1 class).
    assert bundle.num_classes == 10
    # Integers are their own class index; strings are numbered in sorted order.
    assert bundle.class_names == (
        tuple(map(str, range(10))) if kind == "int" else tuple(sorted(WORDS))
    )
    _check_split(bundle, set(range(10 * PER_CLASS)), test_size=32)  # test-fraction 0.2, carved
    _, truth = _digits()
    for part in (*bundle.partitions, bundle.test):
        got = [bundle.class_names[y] for y in part["label"]]
        assert got == [str(truth[i]) if kind == "int" else WORDS[truth[i]] for i in part["idx"]]
    images, labels = to_tensors(bundle.test, bundle, make_transform(32, (0.5,) * 3, (0.5,) * 3))
    assert images.shape == (32, 3, 32, 32) and int(labels.max()) < bundle.num_classes


def test_simulation_on_a_hub_dataset_with_hub_weights(hub, tmp_path):
    cfg = ExperimentConfig(
        dataset="tester/digits-int", pretrained="hub", num_nodes=3, num_rounds=1, depth=1,
        local_steps=1, eval_every=1, out_dir=str(tmp_path / "run"), overwrite=True,
    )  # fmt: skip
    out = run_experiment(cfg)  # Ray's workers load data and weights from the same cache
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_bytes_sent"] > 0
    metrics = read_jsonl(out / "metrics.jsonl")
    assert sorted((m["round"], m["node"]) for m in metrics) == [
        (r, n) for r in (0, 1) for n in range(3)
    ]
    # Round 0: every node holds the same hub model and the same 32-image test split.
    start = {m["accuracy"] for m in metrics if m["round"] == 0}
    assert len(start) == 1 and all(m["accuracy"] is not None for m in metrics)
