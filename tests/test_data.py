import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

from flower_p2p.config import ExperimentConfig
from flower_p2p.data import (
    PARTITIONERS,
    class_names,
    digits_dataset,
    encode_labels,
    load_data,
    pick_column,
)
from flower_p2p.registry import ConfigError


@pytest.fixture(scope="module")
def digits():
    ds = digits_dataset()
    return ds.add_column("idx", list(range(len(ds))))


def _partition_ids(digits, **cfg):
    cfg = ExperimentConfig().replace(**cfg)
    partitioner = PARTITIONERS.get(cfg.partitioner)(cfg, "label", 10)
    partitioner.dataset = digits
    return [partitioner.load_partition(i) for i in range(cfg.num_nodes)]


def test_digits_is_an_image_dataset_with_class_labels(digits):
    assert len(digits) == 1797
    assert isinstance(digits.features["image"], Image)
    assert isinstance(digits.features["label"], ClassLabel)
    assert digits.features["label"].num_classes == 10


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_complete(digits, partitioner):
    parts = _partition_ids(digits, partitioner=partitioner, num_nodes=8, alpha=0.3)
    ids = [set(p["idx"]) for p in parts]
    assert sum(len(s) for s in ids) == len(digits)
    assert set().union(*ids) == set(range(len(digits)))


def test_pathological_partitions_are_disjoint_with_exactly_k_classes(digits):
    parts = _partition_ids(digits, partitioner="pathological", num_nodes=8, classes_per_node=3)
    ids = [set(p["idx"]) for p in parts]
    assert sum(len(s) for s in ids) == len(set().union(*ids))
    assert all(len(set(p["label"])) == 3 for p in parts)


def _label_skew(parts):
    """Mean total-variation distance between each node's label distribution and the global."""
    hists = np.array([np.bincount(p["label"], minlength=10) for p in parts], dtype=float)
    glob = hists.sum(0) / hists.sum()
    local = hists / hists.sum(1, keepdims=True)
    return float(np.mean(0.5 * np.abs(local - glob).sum(1)))


def test_label_skew_grows_as_alpha_shrinks(digits):
    skews = [_label_skew(_partition_ids(digits, alpha=a, num_nodes=8)) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.5


def test_load_data_gives_a_fixed_stratified_test_split_and_node_partitions():
    bundle = load_data(ExperimentConfig(num_nodes=4))
    assert len(bundle.test) == 360 and sum(len(p) for p in bundle.partitions) == 1437
    other_seed = load_data(ExperimentConfig(num_nodes=4, seed=7))
    assert bundle.test["label"] == other_seed.test["label"]  # test set never moves with the seed
    assert [len(p) for p in bundle.partitions] != [len(p) for p in other_seed.partitions]


def test_local_save_to_disk_folder_with_other_column_names(tmp_path):
    src = (
        digits_dataset().select(range(200)).rename_columns({"image": "img", "label": "fine_label"})
    )
    src.save_to_disk(str(tmp_path / "ds"))
    bundle = load_data(
        ExperimentConfig(dataset=str(tmp_path / "ds"), num_nodes=2, partitioner="iid")
    )
    assert (bundle.image_column, bundle.label_column) == ("img", "fine_label")
    assert bundle.num_classes == 10 and len(bundle.test) == 40


def test_column_detection_errors_name_the_columns():
    with pytest.raises(ConfigError, match=r"label-column='auto'.*none of label, fine_label"):
        pick_column(["image", "target"], "auto", ("label", "fine_label"), "label-column")
    with pytest.raises(ConfigError, match=r"image-column='photo'.*image, target"):
        pick_column(["image", "target"], "photo", ("image",), "image-column")


def test_dataset_without_label_column_is_refused(tmp_path):
    ds = Dataset.from_dict(
        {"image": digits_dataset()["image"][:50], "target": [0] * 50},
        features=Features({"image": Image(), "target": Value("int64")}),
    )
    ds.save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(ConfigError, match="label-column"):
        load_data(ExperimentConfig(dataset=str(tmp_path / "nolabel"), num_nodes=2))


def test_more_nodes_than_samples_is_refused():
    with pytest.raises(ConfigError, match=r"num-nodes=2000 .*at most 1437"):
        load_data(ExperimentConfig(num_nodes=2000))


def _labelled(labels: list, tmp_path) -> str:
    """A local save_to_disk dataset of 8x8 images with these labels (one per image)."""
    images = digits_dataset()["image"][: len(labels)]
    ds = Dataset.from_dict({"image": images, "label": labels}).cast_column("image", Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    return str(tmp_path / "ds")


def test_plain_integer_labels_are_their_own_class_index(tmp_path):
    # {3, 5, 7} are classes 0..7 (8 classes): by their count (3), label 7 would be out of range.
    bundle = load_data(ExperimentConfig(dataset=_labelled([3, 5, 7] * 20, tmp_path), num_nodes=2))
    assert bundle.class_names == tuple(str(i) for i in range(8))
    labels = [y for part in (*bundle.partitions, bundle.test) for y in part["label"]]
    assert max(labels) == 7 < bundle.num_classes  # to_tensors takes a label as its class index
    assert class_names("label", Dataset.from_dict({"label": [2, 0, 9, 2]})) == tuple(
        map(str, range(10))
    )


def test_string_labels_are_encoded_in_sorted_order_across_splits(tmp_path):
    labels = ["dog", "cat", "owl"] * 20
    bundle = load_data(ExperimentConfig(dataset=_labelled(labels, tmp_path), num_nodes=2))
    assert bundle.class_names == ("cat", "dog", "owl")
    assert bundle.test.features["label"] == ClassLabel(names=["cat", "dog", "owl"])
    # the carved test split is stratified, as for any ClassLabel column
    assert np.bincount(bundle.test["label"]).tolist() == [4, 4, 4]
    # a class seen in one split only still gets one index in both
    train, test = Dataset.from_dict({"label": ["b", "a"]}), Dataset.from_dict({"label": ["c"]})
    names = class_names("label", train, test)
    encoded = encode_labels(DatasetDict(train=train, test=test), "label", names)
    assert names == ("a", "b", "c") and encoded["test"]["label"][:] == [2]


@pytest.mark.parametrize(
    ("labels", "holds"),
    [([0, -1, 2], "(it holds -1)"), ([0.0, 1.5], "(it holds Value('float64'))"),
     ([0, None, 1], ", one per sample (10 have none)")],
)  # fmt: skip
def test_labels_that_are_not_class_indices_are_refused(tmp_path, labels, holds):
    with pytest.raises(ConfigError) as err:
        load_data(ExperimentConfig(dataset=_labelled(labels * 10, tmp_path), num_nodes=2))
    assert str(err.value).startswith(
        "label-column='label' is not allowed: a ClassLabel column, integer class indices >= 0, "
        "or strings"
    )
    assert str(err.value).endswith(holds)
