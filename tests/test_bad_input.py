"""Bad input: a clear error naming key, value and what is allowed, before anything is written.

`python tests/test_bad_input.py` prints the README's "Bad input" table from the same cases.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flower_p2p.config import ExperimentConfig
from flower_p2p.models import architecture_overrides
from flower_p2p.registry import ConfigError
from sim.engine import run_experiment

F = "{files}"  # replaced by the folder of generated bad files

# (id, override, key, value as the message shows it (None: the override's value), allowed)
CASES = [
    # wrong types
    ("type-int", {"num-rounds": "ten"}, "num-rounds", None, "an integer"),
    ("type-float", {"lr": "fast"}, "lr", None, "a number"),
    ("type-bool", {"overwrite": "yes"}, "overwrite", None, "true or false"),
    ("type-str", {"dataset": 5}, "dataset", None, "a string"),
    ("type-fraction", {"batch-size": 2.5}, "batch-size", None, "an integer"),
    # out of range
    ("range-rounds", {"num-rounds": 0}, "num-rounds", None, "an integer >= 1"),
    ("range-alpha", {"alpha": 0.0}, "alpha", None, "a Dirichlet concentration > 0"),
    ("range-alpha-neg", {"alpha": -1}, "alpha", -1.0, "> 0"),
    ("range-lr", {"lr": -0.1}, "lr", None, "a learning rate > 0"),
    ("range-restricted-softmax", {"restricted-softmax": 1.5}, "restricted-softmax", None,
     "a scale in [0, 1]"),
    ("range-test-fraction", {"test-fraction": 1.5}, "test-fraction", None, "(0, 1)"),
    ("range-gamma", {"strategy": "choco", "gamma": 0.0}, "gamma", None, "(0, 1]"),
    ("range-edge-prob", {"topology": "erdos-renyi", "edge-prob": 1.5}, "edge-prob", None,
     "a probability in (0, 1]"),
    ("range-patch", {"patch-size": 5}, "patch-size", None, "a divisor of img-size=32"),
    ("range-last-k", {"finetune": "last-k", "last-k": 3}, "last-k", None, "[1, 1] (blocks)"),
    ("range-classes", {"partitioner": "pathological", "classes-per-node": 11},
     "classes-per-node", None, "an integer in [1, 10]"),
    ("range-degree", {"topology": "random-regular", "degree": 3, "num-nodes": 7}, "degree",
     None, "num-nodes * degree even"),
    ("range-torus", {"topology": "torus", "num-nodes": 7}, "topology", None,
     "a divisor >= 2 (got prime 7)"),
    ("range-unseen-cover", {"partitioner": "unseen", "classes-per-node": 1}, "classes-per-node",
     None, "8 nodes x 1 classes cannot cover all 10"),
    ("gossip-one-node", {"num-nodes": 1}, "num-nodes", None, "at least 2 for dsgd"),
    ("range-momentum", {"momentum": 1.0}, "momentum", None, "a momentum coefficient in [0, 1)"),
    ("range-memory-limit", {"memory-limit-gb": -1}, "memory-limit-gb", -1.0,
     "0 (what the machine has available) or a positive size in GiB"),
    # a run that would not fit in memory, refused with the estimate instead of killed mid-run
    ("memory-does-not-fit", {"model": "vit_small_patch16_224", "depth": 12, "num-nodes": 64,
                             "memory-limit-gb": 8}, "num-nodes", None,
     "a run that fits in memory: this one needs about"),
    # combinations that would compute garbage, refused with the reason
    ("choco-lost-messages", {"strategy": "choco", "link-drop": 0.1}, "link-drop", None,
     "0 with strategy=choco"),
    ("relay-sum-per-round", {"strategy": "relay-sum", "topology": "one-peer-exponential"},
     "topology", None, "a static undirected graph with strategy=relay-sum"),
    ("qg-dsgdm-adamw", {"strategy": "qg-dsgdm", "optimizer": "adamw"}, "optimizer", None,
     "sgd with strategy=qg-dsgdm"),
    ("async-choco", {"strategy": "choco", "mode": "async"}, "strategy", None,
     "one of dsgd, ad-psgd with mode=async"),
    ("async-straggler", {"mode": "async", "straggler": 0.1}, "straggler", None,
     "0 with mode=async"),
    ("ad-psgd-sync", {"strategy": "ad-psgd", "mode": "sync"}, "mode", None,
     "async with strategy=ad-psgd"),
    ("range-nodes-per-supernode", {"nodes-per-supernode": 9}, "nodes-per-supernode", None,
     "an integer in [1, num-nodes=8]"),
    # unknown names
    ("unknown-key", {"number-of-nodes": 8}, "number-of-nodes", None, "a known key: num-nodes"),
    ("unknown-strategy", {"strategy": "gossip"}, "strategy", None, "one of dsgd, local, choco"),
    ("unknown-topology", {"topology": "hypercube"}, "topology", None, "one of ring, torus"),
    ("unknown-mixing", {"mixing": "laplacian"}, "mixing", None, "metropolis-hastings"),
    ("unknown-model", {"model": "resnet18"}, "model", None, "starting with vit_, deit_, swin_"),
    ("unknown-timm-model", {"model": "vit_no_such_model"}, "model", None, "vit_, deit_, swin_"),
    ("unknown-partitioner", {"partitioner": "shards"}, "partitioner", None,
     "one of iid, dirichlet, pathological"),
    ("unknown-unseen-layout", {"unseen-layout": "ring"}, "unseen-layout", None,
     "neighbours-share, disjoint-neighbours"),
    ("unknown-compressor", {"strategy": "choco", "compressor": "zip"}, "compressor", None,
     "one of none, top-k, random-k, 8bit"),
    ("unknown-share", {"share": "heads"}, "share", None, "comma-separated groups of all, head"),
    ("unknown-finetune", {"finetune": "partial"}, "finetune", None, "one of full, head, last-k"),
    ("unknown-column", {"label-column": "target"}, "label-column", None,
     "a column of the dataset: image, label"),
    ("unknown-hub-dataset", {"dataset": "no-such-hub-dataset-xyz"}, "dataset", None,
     "hub dataset"),
    # unreadable files
    ("missing-dataset", {"dataset": "./no/such/folder"}, "dataset", None,
     "an existing local dataset folder"),
    ("empty-dataset", {"dataset": f"{F}/empty"}, "dataset", f"{F}/empty",
     "a readable dataset folder"),
    ("missing-checkpoint", {"pretrained": "/no/such/ckpt.safetensors"}, "pretrained", None,
     "an existing checkpoint file"),
    ("garbage-checkpoint", {"pretrained": f"{F}/garbage.safetensors"}, "pretrained", None,
     "a readable checkpoint"),
    ("missing-edge-list", {"topology": "./no/such/edges.txt"}, "topology", None,
     "an existing edge-list file"),
    ("binary-edge-list", {"topology": f"{F}/binary.txt", "num-nodes": 3}, "topology",
     f"{F}/binary.txt", "a readable UTF-8 edge-list file"),
    ("garbled-edge-list", {"topology": f"{F}/garbled.txt", "num-nodes": 3}, "topology",
     f"{F}/garbled.txt:1: 'zero one'", "lines of two integer node ids"),
    # edge lists
    ("self-loop", {"topology": f"{F}/self-loop.txt", "num-nodes": 3}, "topology",
     f"{F}/self-loop.txt:3: self-loop 2-2", "no self-loops"),
    ("unknown-node", {"topology": f"{F}/unknown-node.txt", "num-nodes": 3}, "topology",
     f"{F}/unknown-node.txt:3: edge 2-7", "node ids in [0, 2] (num-nodes)"),
    ("disconnected", {"topology": f"{F}/disconnected.txt", "num-nodes": 4}, "topology", None,
     "a connected graph (components: [[0, 1], [2, 3]])"),
    # checkpoints that do not match the model, or the run's test split
    ("checkpoint-shape", {"pretrained": f"{F}/wider.safetensors"}, "pretrained", None,
     "a checkpoint matching model=vit_tiny_patch16_224"),
    ("checkpoint-carve", {"pretrained": f"{F}/digits-carve-0.3.safetensors"}, "pretrained",
     None, "test-fraction=0.3 carved off, this run carves test-fraction=0.2"),
    # a results folder that overwrite=true must not wipe
    ("out-dir-foreign", {"out-dir": f"{F}/not-a-run", "overwrite": "true"}, "out-dir", None,
     "this one also holds notes.txt, which no run writes (nothing was deleted"),
    # datasets
    ("no-label-column", {"dataset": f"{F}/no-label"}, "label-column", "auto",
     "none of label, fine_label, labels, coarse_label is among the dataset's columns (image)"),
    ("more-nodes-than-samples", {"num-nodes": 1500}, "num-nodes", None,
     "at most 1437 (training samples of digits)"),
    ("more-nodes-than-samples-local", {"dataset": f"{F}/twenty", "num-nodes": 30}, "num-nodes",
     None, "at most 16 (training samples of"),
    # partitions: named partitioners' keys, the user's files, placement, feature skew
    ("unknown-placement", {"placement": "neighbours"}, "placement", None,
     "one of random, clustered, spread"),
    ("unknown-feature-skew", {"feature-skew": "blur"}, "feature-skew", None,
     "one of none, rotation, contrast, noise, invert, mixed"),
    ("unknown-group-mode", {"partitioner": "grouped-natural-id", "group-mode": "loose"},
     "group-mode", None, "one of allow-smaller, allow-bigger, drop-reminder, strict"),
    ("range-strictness", {"partitioner": "continuous", "strictness": 1.5}, "strictness", None,
     "a value in [0, 1]"),
    ("range-shards", {"partitioner": "shard", "shards-per-node": 0}, "shards-per-node", None,
     "an integer >= 1"),
    ("range-node-sizes", {"partitioner": "size", "node-sizes": "1,2,3"}, "node-sizes", None,
     "8 comma-separated positive weights"),
    ("range-sigma", {"partitioner": "size", "sigma": -1}, "sigma", -1.0, "a log-normal sigma >= 0"),
    ("range-skew-domains", {"feature-skew": "rotation", "skew-domains": 9}, "skew-domains", None,
     "an integer in [0, 8]"),
    ("range-skew-strength", {"feature-skew": "noise", "skew-strength": 0}, "skew-strength", 0.0,
     "a scale in (0, 1]"),
    ("range-distribution-nodes", {"partitioner": "distribution"}, "num-nodes", 8,
     "a multiple of the 10 classes for partitioner=distribution"),
    ("range-exponential", {"partitioner": "exponential"}, "partitioner", None,
     "a feasible partitioning"),
    ("range-natural-id-nodes", {"partitioner": "natural-id", "partition-by": "label"},
     "num-nodes", 8, "10, the number of partitions partitioner=natural-id makes"),
    ("no-natural-id-column", {"partitioner": "natural-id"}, "partition-by", "auto",
     "is among the dataset's columns (image, label)"),
    ("unknown-partition-by", {"partitioner": "natural-id", "partition-by": "writer_id"},
     "partition-by", None, "a column of the dataset: image, label"),
    ("placement-complete", {"placement": "clustered", "topology": "complete"}, "placement", None,
     "every node neighbours every other"),
    ("placement-fedavg", {"placement": "spread", "strategy": "fedavg"}, "placement", None,
     "random with strategy=fedavg"),
    ("placement-random-matching",
     {"placement": "clustered", "topology": "random-matching", "num-rounds": 10},
     "placement", None, "random with topology=random-matching"),
    ("missing-partition-file", {"partitioner": "./no/such/partition.json"}, "partitioner", None,
     "naming an existing file"),
    ("partition-json-overlap", {"partitioner": f"{F}/overlap.json"}, "partitioner", None,
     "disjoint partitions"),
    ("partition-json-range", {"partitioner": f"{F}/out-of-range.json"}, "partitioner", None,
     "training-row indices in [0, 1436]"),
    ("partition-json-count", {"partitioner": f"{F}/three-nodes.json"}, "partitioner", None,
     "num-nodes=8 lists (it holds 3)"),
    ("partition-class-missing", {"partitioner": f"{F}/parts.py:NoSuchClass"}, "partitioner",
     None, "its Partitioner subclasses: Halves"),
    ("partition-class-type", {"partitioner": f"{F}/parts.py:NotAPartitioner"}, "partitioner",
     None, "a subclass of flwr_datasets.partitioner.Partitioner"),
    ("partition-class-count", {"partitioner": f"{F}/parts.py:Halves"}, "partitioner", None,
     "a partitioner of num-nodes=8 partitions (it has 2)"),
]  # fmt: skip

BASE = {"num-rounds": 1, "depth": 1}  # anything wrongly accepted would stay short


def make_bad_files(folder: Path) -> Path:
    """Unreadable, garbled and mismatching files and datasets for the cases above."""
    import datasets
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty").mkdir(exist_ok=True)
    (folder / "garbage.safetensors").write_bytes(b"\x7f" * 64)
    (folder / "binary.txt").write_bytes(b"\x00\xff\xfe\x01")
    (folder / "garbled.txt").write_text("zero one\n")
    (folder / "self-loop.txt").write_text("0 1\n1 2\n2 2\n2 0\n")
    (folder / "unknown-node.txt").write_text("0 1\n1 2\n2 7\n")
    (folder / "disconnected.txt").write_text("0 1\n2 3\n")
    # a checkpoint of a wider ViT (embed dim 384 instead of ViT-tiny's 192)
    import timm

    wider = timm.create_model(
        "vit_small_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10
    )
    state = {k: v.contiguous() for k, v in wider.state_dict().items()}
    save_file(state, str(folder / "wider.safetensors"))
    # the run's own architecture, as `sim pretrain` leaves it after pretraining on digits with
    # test-fraction=0.3 (the runs here carve the default 0.2)
    cfg = ExperimentConfig.from_run_config(BASE)
    model = timm.create_model(cfg.model, num_classes=4, **architecture_overrides(cfg))
    carve = folder / "digits-carve-0.3.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(carve))
    sidecar = {"model": cfg.model, "overrides": architecture_overrides(cfg), "num_classes": 4,
               "source_dataset": "digits", "source_test_fraction": 0.3}  # fmt: skip
    carve.with_name(carve.name + ".json").write_text(json.dumps(sidecar))
    # a run's folder into which someone put their own file
    (folder / "not-a-run").mkdir(exist_ok=True)
    (folder / "not-a-run" / "config.json").write_text("{}")
    (folder / "not-a-run" / "notes.txt").write_text("mine")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in range(20)]
    image = datasets.Image()
    no_label = datasets.Dataset.from_dict({"image": images}).cast_column("image", image)
    no_label.save_to_disk(str(folder / "no-label"))
    twenty = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(20)]})
    twenty.cast_column("image", image).save_to_disk(str(folder / "twenty"))
    # partition files: rows shared by two nodes, a row past the 1437 training rows, 3 nodes' lists
    eight = [[i] for i in range(8)]
    (folder / "overlap.json").write_text(json.dumps([[0, 1], [1], *eight[2:]]))
    (folder / "out-of-range.json").write_text(json.dumps([*eight[:7], [1437]]))
    (folder / "three-nodes.json").write_text(json.dumps(eight[:3]))
    (folder / "parts.py").write_text(
        "from flwr_datasets.partitioner import Partitioner\n\n\n"
        "class Halves(Partitioner):\n"
        "    num_partitions = 2\n\n"
        "    def load_partition(self, partition_id):\n"
        "        return self.dataset.shard(2, partition_id)\n\n\n"
        "class NotAPartitioner:\n"
        "    pass\n"
    )
    return folder


def _fill(value, files: Path):
    return value.replace(F, str(files)) if isinstance(value, str) else value


def refuse(override: dict, files: Path, out: Path) -> ConfigError:
    """Parse, validate and run ``override`` the way `python -m sim run` does; the error."""
    run_config = {**BASE, **{k: _fill(v, files) for k, v in override.items()}}
    run_config = {"out-dir": str(out), "overwrite": True, **run_config}
    with pytest.raises(ConfigError) as err:
        run_experiment(ExperimentConfig.from_run_config(run_config))
    return err.value


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return make_bad_files(tmp_path_factory.mktemp("bad-files"))


@pytest.mark.parametrize(("override", "key", "value", "allowed"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_config_is_refused_before_anything_is_written(
    override, key, value, allowed, bad_files, tmp_path
):
    # Even with overwrite=true, an existing results folder is not touched by a refused run.
    out = tmp_path / "results"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    err = refuse(override, bad_files, out)
    shown = _fill(value, bad_files) if value is not None else _fill(override[key], bad_files)
    assert str(err).startswith(f"{key}={shown!r} is not allowed: "), str(err)
    assert allowed in err.allowed, str(err)
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == "precious\n"


def test_cases_span_the_kinds_of_bad_input():
    kinds = {c[0].split("-")[0] for c in CASES}
    assert len(CASES) >= 20
    assert {"type", "range", "unknown", "self", "checkpoint", "no", "more"} <= kinds


def test_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    cfg = ExperimentConfig(num_nodes=1500, out_dir=str(out))
    with pytest.raises(ConfigError):
        run_experiment(cfg)
    assert not out.exists()


def test_existing_results_are_not_overwritten(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("precious\n")
    with pytest.raises(ConfigError, match=r"out-dir=.*overwrite=true"):
        run_experiment(ExperimentConfig(out_dir=str(tmp_path), num_rounds=1, depth=1))
    assert (tmp_path / "metrics.jsonl").read_text() == "precious\n"


def markdown_table(files: Path) -> str:
    """The README's "Bad input" table: key, example bad value, the message the code prints."""
    import tempfile

    rows = ["| key | bad value | message |", "|---|---|---|"]
    for _, override, key, _, _ in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            with pytest.raises(ConfigError) as err:
                run_config = {**BASE, **{k: _fill(v, files) for k, v in override.items()}}
                run_config.setdefault("out-dir", str(Path(tmp) / "out"))
                run_experiment(ExperimentConfig.from_run_config(run_config))
        others = " ".join(f"{k}={v}" for k, v in override.items() if k != key)
        shown = json.dumps(override[key]) if key in override else "(auto)"
        shown = (shown + (f" with {others}" if others else "")).replace(F, "<dir>")
        message = str(err.value).replace(str(files), "<dir>").replace("|", "\\|")
        rows.append(f"| `{key}` | `{shown}` | {message} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import os
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        print(markdown_table(make_bad_files(Path(tmp) / "files")))
