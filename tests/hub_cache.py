"""A Hugging Face cache written on disk the way downloads from the hub leave it.

What the installed libraries read offline (``HF_HUB_OFFLINE=1``):

* ``huggingface_hub.hf_hub_download`` (timm's ``pretrained=True``) reads the hub cache
  ``$HF_HUB_CACHE/models--<org>--<name>/``: ``refs/main`` holds the commit, and
  ``snapshots/<commit>/<file>`` links to ``blobs/<etag>``.
* ``datasets.load_dataset("<user>/<name>")`` never reads the hub cache offline: it goes straight to
  ``CachedDatasetModuleFactory``, i.e. the Arrow files an earlier online load prepared in
  ``$HF_DATASETS_CACHE/<user>___<name>/<config>/<version>/<commit>/``. ``prepare_like_online``
  makes those with the builder an online load runs, over the files an online load downloads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from pathlib import Path
from unittest import mock

import datasets
import datasets.load
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import DatasetDict, DatasetInfo, SplitDict, SplitInfo
from datasets.info import DatasetInfosDict
from datasets.naming import camelcase_to_snakecase
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData

# Files the hub stores in LFS: their etag (and blob name) is the sha256 of the content.
LFS_SUFFIXES = (".parquet", ".safetensors", ".bin")


def publish_to_hub_cache(
    hub_cache: Path, repo_type: str, repo_id: str, files: dict[str, bytes]
) -> tuple[Path, str]:
    """Write ``files`` as a downloaded commit of ``repo_id``: (snapshot folder, commit hash)."""
    repo = Path(hub_cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    etags = {}
    for path, data in files.items():
        if path.endswith(LFS_SUFFIXES):
            etags[path] = hashlib.sha256(data).hexdigest()
        else:  # a git blob id, as the hub's ETag of a regular file
            etags[path] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    commit = hashlib.sha1(repr(sorted(etags.items())).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for path, data in files.items():
        blob = repo / "blobs" / etags[path]
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # no newline: the hub's own writes have none
    return snapshot, commit


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def pushed_files(splits: DatasetDict) -> dict[str, bytes]:
    """The files ``splits.push_to_hub(repo)`` commits: one parquet shard per split and a card.

    The shards carry the features in their schema metadata (``Dataset.to_parquet``), the card
    ``dataset_info`` (features, split sizes) and ``configs`` (split -> ``data/<split>-*``), built
    as ``datasets.arrow_dataset._get_updated_dataset_card`` builds them.
    """
    files: dict[str, bytes] = {}
    info = DatasetInfo(
        config_name="default",
        features=next(iter(splits.values())).features,
        splits=SplitDict(),
        download_size=0,
        dataset_size=0,
    )
    for split, ds in splits.items():
        ds = ds.flatten_indices()  # a split's own rows, not the table it was cut from
        buffer = io.BytesIO()
        ds.to_parquet(buffer)
        files[f"data/{split}-00000-of-00001.parquet"] = buffer.getvalue()
        info.splits.add(SplitInfo(name=split, num_bytes=ds.data.nbytes, num_examples=len(ds)))
        info.download_size += len(buffer.getvalue())
        info.dataset_size += ds.data.nbytes
    info.size_in_bytes = info.download_size + info.dataset_size
    card = DatasetCardData()
    DatasetInfosDict({"default": info}).to_dataset_card_data(card)
    data_files = [{"split": s, "path": f"data/{s}-*"} for s in splits]
    MetadataConfigs({"default": {"data_files": data_files}}).to_dataset_card_data(card)
    files["README.md"] = str(DatasetCard(f"---\n{card}\n---\n")).encode()
    return files


def uploaded_files(tables: dict[str, pa.Table], features: datasets.Features) -> dict[str, bytes]:
    """A repo uploaded without ``datasets``: plain parquet (no features in it), so the card's YAML
    declares them; splits follow from the file names (``data/train-00000-of-00001.parquet``)."""
    card = DatasetCardData()
    DatasetInfosDict({"default": DatasetInfo(features=features)}).to_dataset_card_data(card)
    files = {"README.md": str(DatasetCard(f"---\n{card}\n---\n")).encode()}
    for split, table in tables.items():
        files[f"data/{split}-00000-of-00001.parquet"] = _parquet_bytes(table)
    return files


def prepare_like_online(repo_id: str, snapshot: Path, commit: str) -> None:
    """What ``load_dataset(repo_id)`` online leaves in the datasets cache, for this commit.

    Online, ``HubDatasetModuleFactory`` reads the card and lists the data files of ``commit``,
    downloads them into the hub cache (``snapshot``) and runs the packaged builder it infers,
    named by ``repo_id`` with the commit as hash. ``LocalDatasetModuleFactory`` reads the same card
    and files from the snapshot the same way; given the online module's name and hash, the very
    same ``load_dataset`` prepares the same Arrow cache. Only the module lookup is replaced.
    """
    local = datasets.load.LocalDatasetModuleFactory(str(snapshot)).get_module()
    online = dataclasses.replace(
        local,
        hash=commit,
        builder_kwargs={
            "base_path": str(snapshot),
            "repo_id": repo_id,
            "dataset_name": camelcase_to_snakecase(repo_id.split("/")[-1]),
        },
    )
    with mock.patch.object(datasets.load, "dataset_module_factory", return_value=online):
        datasets.load_dataset(repo_id)
