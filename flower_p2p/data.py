"""Datasets, non-IID partitions (flwr-datasets) and the tensors a node trains on.

``dataset`` is one of:

* ``digits``: scikit-learn's bundled 8x8 digits as a ``datasets.Dataset`` (Image + ClassLabel),
  the offline default;
* ``glyphs``: the project's synthetic printed letters in digits' 8x8 format (``glyphs.py``), the
  offline pretraining source;
* a local folder: a ``save_to_disk`` folder, a folder of parquet files, or an imagefolder;
* any other string: a Hugging Face hub dataset, loaded through ``flwr_datasets.FederatedDataset``.

Labels are a ``ClassLabel``, integer class indices or strings (numbered in sorted order); see
``class_names``.

Every node evaluates on the same global test split: the dataset's ``test`` split, or, when it has
none, a stratified ``test-fraction`` of ``train`` split off with a fixed seed (0), so changing the
run's ``seed`` never changes the test set.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Image,
    Value,
    load_dataset,
    load_from_disk,
)
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import IidPartitioner
from flwr_datasets.preprocessor import Divider
from PIL import Image as PILImage
from torchvision import transforms

from flower_p2p.config import ExperimentConfig
from flower_p2p.feature_skew import Shift
from flower_p2p.glyphs import glyphs_dataset
from flower_p2p.partitioners import NATURAL_ID, NATURAL_ID_COLUMNS
from flower_p2p.partitioners import PARTITIONERS as PARTITIONERS  # re-exported: tests, validate
from flower_p2p.partitioning import node_rows
from flower_p2p.registry import ConfigError

IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "fine_label", "labels", "coarse_label")
# Per-node progress bars for tiny in-memory operations drown the round log.
datasets.disable_progress_bars()
# The test split of a dataset without one is fixed: it must not move with the run's seed.
TEST_SPLIT_SEED = 0


def check_dataset_spec(spec: str) -> None:
    """Refuse a dataset spec that is certainly wrong without touching the network."""
    if not spec or not spec.strip():
        raise ConfigError(
            "dataset", spec, "digits, glyphs, a local dataset folder or a hub dataset name"
        )
    if spec.startswith((".", "/", "~")) and not Path(spec).expanduser().exists():
        raise ConfigError("dataset", spec, "an existing local dataset folder")


def digits_dataset() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images) as a Dataset with Image/ClassLabel."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    # 0..16 intensities -> 0..255 grayscale images
    pixels = np.clip(raw.images * 16, 0, 255).astype(np.uint8)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    return Dataset.from_dict(
        {"image": [PILImage.fromarray(p, mode="L") for p in pixels], "label": raw.target.tolist()},
        features=features,
    )


# Datasets the project makes offline, by name; anything else is a local folder or a hub name.
BUILTIN_DATASETS = {"digits": digits_dataset, "glyphs": glyphs_dataset}


def _load_local(path: Path) -> DatasetDict:
    try:
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = load_from_disk(str(path))
        elif any(path.rglob("*.parquet")):
            loaded = load_dataset("parquet", data_dir=str(path))
        else:
            loaded = load_dataset("imagefolder", data_dir=str(path))
    except (OSError, ValueError) as err:  # empty or unreadable folder (EmptyDatasetError too)
        raise ConfigError(
            "dataset",
            str(path),
            "a readable dataset folder: save_to_disk output, parquet files or an imagefolder "
            f"({type(err).__name__}: {err})",
        ) from err
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})


def _split_off_test(train: Dataset, label_column: str, fraction: float) -> DatasetDict:
    stratify = label_column if isinstance(train.features[label_column], ClassLabel) else None
    return train.train_test_split(
        test_size=fraction, seed=TEST_SPLIT_SEED, stratify_by_column=stratify
    )


def pick_column(columns: list[str], wanted: str, candidates: tuple[str, ...], key: str) -> str:
    """The configured column, or the first common name present when ``wanted`` is 'auto'."""
    if wanted != "auto":
        if wanted not in columns:
            raise ConfigError(key, wanted, f"a column of the dataset: {', '.join(columns)}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise ConfigError(
        key,
        "auto",
        f"a column name; none of {', '.join(candidates)} is among the dataset's columns "
        f"({', '.join(columns)})",
    )


@dataclass(frozen=True)
class DataBundle:
    """A dataset split into per-node training partitions plus one global test split."""

    partitions: tuple[Dataset, ...]
    test: Dataset
    image_column: str
    label_column: str
    class_names: tuple[str, ...]
    # The fraction of `train` carved off as `test` (seed TEST_SPLIT_SEED); None: its own split.
    test_fraction: float | None = None
    # Node i holds the partitioner's partition placement[i] (placement.py); () : identity.
    placement: tuple[int, ...] = ()

    def partition_of(self, node: int) -> int:
        """The partitioner's index of the partition node ``node`` holds."""
        return self.placement[node] if self.placement else node

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def union(self) -> Dataset:
        """All nodes' training data together: what the centralized reference trains on."""
        from datasets import concatenate_datasets

        return concatenate_datasets(list(self.partitions))


LABELS_ALLOWED = "a ClassLabel column, integer class indices >= 0, or strings"


def class_names(label_column: str, *splits: Dataset) -> tuple[str, ...]:
    """The classes of ``label_column``, read from that column alone in all ``splits`` (train first).

    A node trains on the class index (``to_tensors`` takes the stored value as it), so:

    * a ``ClassLabel`` gives its names;
    * plain integers give '0' ... str(max label): every label is its own index, absent classes
      included (labels {3, 5, 7} are 8 classes, not 3, or label 7 would be out of range);
    * strings give their sorted distinct values, which ``encode_labels`` turns into indices.

    Negative, fractional or missing labels are refused.
    """
    feature = splits[0].features[label_column]
    if isinstance(feature, ClassLabel):
        return tuple(feature.names)
    # Arrow columns straight from the (memory-mapped) table: no image is decoded.
    columns = [s.with_format("arrow", columns=[label_column])[label_column] for s in splits]
    missing = sum(c.null_count for c in columns)
    if missing:
        raise ConfigError(
            "label-column", label_column, f"{LABELS_ALLOWED}, one per sample ({missing} have none)"
        )
    if all(pa.types.is_integer(c.type) for c in columns):
        present = [c for c in columns if len(c)]
        if not present:
            return ()
        low = min(pc.min(c).as_py() for c in present)
        if low < 0:
            raise ConfigError("label-column", label_column, f"{LABELS_ALLOWED} (it holds {low})")
        return tuple(str(i) for i in range(max(pc.max(c).as_py() for c in present) + 1))
    if all(pa.types.is_string(c.type) or pa.types.is_large_string(c.type) for c in columns):
        return tuple(sorted(set().union(*(c.unique().to_pylist() for c in columns))))
    raise ConfigError("label-column", label_column, f"{LABELS_ALLOWED} (it holds {feature})")


def encode_labels(splits: DatasetDict, label_column: str, names: tuple[str, ...]) -> DatasetDict:
    """String labels cast to a ClassLabel of ``names``: one index per class across all splits.

    (``DatasetDict.class_encode_column`` would number each split's own classes.) ClassLabel and
    integer columns are returned unchanged.
    """
    feature = next(iter(splits.values())).features[label_column]
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        return splits
    encoded = ClassLabel(names=list(names))
    return DatasetDict({k: ds.cast_column(label_column, encoded) for k, ds in splits.items()})


def data_key(cfg: ExperimentConfig) -> tuple:
    """The config keys that decide a run's data: equal keys, identical partitions and test split.

    Besides the partition keys: a user partition file's fingerprint (path, size, mtime), the
    edges placement used (they depend on topology, strategy, rounds, seed and graph keys), and
    the feature-skew keys (they change the tensors, and the prefix cache keys on this).
    """
    from flower_p2p.placement import placement_edges
    from flower_p2p.user_partition import fingerprint, is_user_spec

    placed = cfg.placement != "random" and cfg.strategy != "centralized"
    return (
        cfg.dataset, cfg.image_column, cfg.label_column, cfg.test_fraction, cfg.partitioner,
        cfg.alpha, cfg.classes_per_node, cfg.unseen_layout, cfg.num_nodes, cfg.seed,
        cfg.partition_by, cfg.shards_per_node, cfg.shard_size, cfg.node_sizes, cfg.sigma,
        cfg.preassigned_per_class, cfg.group_size, cfg.group_mode, cfg.strictness,
        fingerprint(cfg.partitioner) if is_user_spec(cfg.partitioner) else None,
        cfg.placement if placed else "random",
        tuple(placement_edges(cfg) or ()) if placed else None,
        cfg.feature_skew, cfg.skew_domains, cfg.skew_strength,
    )  # fmt: skip


def load_data(cfg: ExperimentConfig) -> DataBundle:
    """Partitions and test split for ``cfg``; cached per process (nodes share a process in sims)."""
    return _load_data_cached(data_key(cfg), cfg)


@functools.lru_cache(maxsize=4)
def _load_data_cached(key: tuple, cfg: ExperimentConfig) -> DataBundle:
    spec = cfg.dataset
    local = Path(spec).expanduser()
    if spec in BUILTIN_DATASETS or local.exists():
        splits = (
            DatasetDict({"train": BUILTIN_DATASETS[spec]()})
            if spec in BUILTIN_DATASETS
            else _load_local(local)
        )
        if "train" not in splits:
            raise ConfigError(
                "dataset", spec, f"a dataset with a 'train' split (has {list(splits)})"
            )
        columns = splits["train"].column_names
        image_col = pick_column(columns, cfg.image_column, IMAGE_COLUMNS, "image-column")
        label_col = pick_column(columns, cfg.label_column, LABEL_COLUMNS, "label-column")
        names = class_names(
            label_col, splits["train"], *(v for k, v in splits.items() if k != "train")
        )
        splits = encode_labels(splits, label_col, names)
        carved = None if "test" in splits else cfg.test_fraction
        if carved is not None:
            splits = _split_off_test(splits["train"], label_col, carved)
        train, test = splits["train"], splits["test"]
    else:
        train, test, image_col, label_col, names, carved = _load_hub(cfg)
    _check_node_count(cfg, len(train))
    by = partition_by_column(cfg, train.column_names, label_col)
    placed = node_rows(cfg, train, label_col, len(names), by)
    partitions = tuple(train.select(r) for r in placed.rows)
    return DataBundle(partitions, test, image_col, label_col, names, carved, placed.placement)


def partition_by_column(cfg: ExperimentConfig, columns: list[str], label: str) -> str | None:
    """The ``partition-by`` column of a partitioner that reads one (None: the label column).

    ``natural-id`` and ``grouped-natural-id`` need a column naming each sample's owner (``auto``
    looks for common names); ``continuous`` takes any numeric column (``auto``: the label).
    """
    if cfg.partitioner in NATURAL_ID:
        return pick_column(columns, cfg.partition_by, NATURAL_ID_COLUMNS, "partition-by")
    if cfg.partitioner == "continuous" and cfg.partition_by != "auto":
        return pick_column(columns, cfg.partition_by, (), "partition-by")
    return None


def _check_node_count(cfg: ExperimentConfig, num_train: int) -> None:
    if cfg.num_nodes > num_train:
        raise ConfigError(
            "num-nodes", cfg.num_nodes, f"at most {num_train} (training samples of {cfg.dataset})"
        )


def _load_hub(
    cfg: ExperimentConfig,
) -> tuple[Dataset, Dataset, str, str, tuple[str, ...], float | None]:
    from datasets import get_dataset_split_names

    try:
        split_names = get_dataset_split_names(cfg.dataset)
    except Exception as err:  # offline, unknown name, private repo: all end here
        raise ConfigError(
            "dataset",
            cfg.dataset,
            "digits, glyphs, an existing local dataset folder, or a Hugging Face hub dataset "
            f"reachable from here ({type(err).__name__}: {err})",
        ) from err
    if "train" not in split_names:
        raise ConfigError(
            "dataset", cfg.dataset, f"a dataset with a 'train' split (has {split_names})"
        )
    # The whole label column decides the classes, not a sample of rows (a one-row probe of plain
    # integer labels gave 1 class). Loading prepares the dataset once; FederatedDataset reuses it.
    order = ["train", *(s for s in split_names if s != "train")]
    loaded = [load_dataset(cfg.dataset, split=s) for s in order]
    columns = loaded[0].column_names
    image_col = pick_column(columns, cfg.image_column, IMAGE_COLUMNS, "image-column")
    label_col = pick_column(columns, cfg.label_column, LABEL_COLUMNS, "label-column")
    names = class_names(label_col, *loaded)
    divider = None
    if "test" not in split_names:
        divider = Divider(
            divide_config={"train": 1.0 - cfg.test_fraction, "test": cfg.test_fraction},
            divide_split="train",
        )

    def prepare(splits: DatasetDict) -> DatasetDict:
        splits = encode_labels(splits, label_col, names)
        return divider(splits) if divider else splits

    # FederatedDataset prepares (shuffles, divides) the splits; node_rows partitions `train`.
    fds = FederatedDataset(
        dataset=cfg.dataset,
        partitioners={"train": IidPartitioner(num_partitions=cfg.num_nodes)},
        preprocessor=prepare,
        seed=TEST_SPLIT_SEED,
    )
    carved = None if "test" in split_names else cfg.test_fraction
    return fds.load_split("train"), fds.load_split("test"), image_col, label_col, names, carved


def make_transform(
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    shift: Shift | None = None,
    split: str = "train",
):
    """Deterministic preprocessing: RGB, resize to the model input, (domain shift,) normalise.

    A feature-skew ``shift`` acts on the [0, 1] image before normalisation; its noise stream
    (``split``: train or test) starts afresh with every transform made here.
    """
    steps = [
        transforms.Lambda(lambda im: im.convert("RGB")),
        transforms.Resize((img_size, img_size), antialias=True),
        transforms.ToTensor(),
    ]
    if shift is not None:
        steps.append(shift.transform(split))
    return transforms.Compose([*steps, transforms.Normalize(mean, std)])


def to_tensors(ds: Dataset, bundle: DataBundle, transform) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of ``ds`` preprocessed into one (N, 3, H, W) tensor, plus labels (N,)."""
    images = torch.stack([transform(im) for im in ds[bundle.image_column]])
    labels = torch.as_tensor(ds[bundle.label_column], dtype=torch.long)
    return images, labels


def label_histogram(ds: Dataset, bundle: DataBundle) -> np.ndarray:
    """Samples per class in ``ds``."""
    return np.bincount(np.asarray(ds[bundle.label_column]), minlength=bundle.num_classes)


def data_summary(cfg: ExperimentConfig) -> dict:
    """summary.json's ``heterogeneity`` and ``partition`` objects for ``cfg``'s data.

    ``heterogeneity``: the label figures of ``heterogeneity.py`` over the placed partitions and
    the run's graph (edge figures None for the centralized reference), plus each node's feature
    domain when feature skew is on. ``partition``: what was used, so the run can be repeated (a
    user file's SHA-256, the placement).
    """
    from flower_p2p.feature_skew import describe, shift_for
    from flower_p2p.heterogeneity import heterogeneity
    from flower_p2p.placement import placement_edges
    from flower_p2p.user_partition import file_sha256, is_user_spec

    bundle = load_data(cfg)
    hists = np.stack([label_histogram(p, bundle) for p in bundle.partitions])
    edges = placement_edges(cfg)
    out = heterogeneity(hists, edges)
    if cfg.feature_skew != "none":
        shifts = [shift_for(cfg, bundle.partition_of(i)) for i in range(cfg.num_nodes)]
        out["domain"] = [s.domain for s in shifts]
        out["domain_shift"] = [describe(s) for s in shifts]
        if edges:
            out["edge_domain_differs"] = float(
                np.mean([shifts[u].domain != shifts[v].domain for u, v in edges])
            )
    partition = {
        "partitioner": cfg.partitioner,
        "sha256": file_sha256(cfg.partitioner) if is_user_spec(cfg.partitioner) else None,
        "placement": cfg.placement if cfg.strategy != "centralized" else "random",
        "node_partition": [bundle.partition_of(i) for i in range(cfg.num_nodes)],
    }
    return {"heterogeneity": out, "partition": partition}
