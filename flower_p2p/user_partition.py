"""Bring your own partition: ``partitioner=path/to/file.py:ClassName`` or ``path/to/file.json``.

* ``file.py:ClassName``: a subclass of flwr-datasets' ``Partitioner``, defined in that file. Its
  ``__init__`` is called with those of ``num_partitions`` (num-nodes), ``partition_by`` (the label
  column), ``num_classes`` and ``seed`` that it names; any other required parameter is refused.
  It must report ``num_partitions == num-nodes`` and return partitions selected from its
  ``dataset``.
* ``file.json``: one list of training-row indices per node (``[[0, 5, 9], [1, 2], ...]``), rows of
  the training split as ``load_data`` builds it (for a dataset without a ``test`` split: after
  the ``test-fraction`` carve-off, which is fixed by seed 0, whatever the run's seed).

Either way the partitions must be disjoint, in range and one per node (``data.check_rows``), and
the file's SHA-256 goes into ``summary.json`` so that a run can be repeated with the same file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path

from flwr_datasets.partitioner import Partitioner

from flower_p2p.registry import ConfigError

ALLOWED = "a partitioner name, path/to/file.py:ClassName or path/to/partition.json"
# The constructor arguments a user's class may ask for, by name.
OFFERED = ("num_partitions", "partition_by", "num_classes", "seed")


def is_user_spec(spec: str) -> bool:
    """True when ``partitioner`` names a file rather than a registered partitioner."""
    return spec.endswith(".json") or ".py:" in spec


def split_spec(spec: str) -> tuple[Path, str | None]:
    """(file, class name or None for a .json file); ConfigError for a missing file or bad name."""
    if spec.endswith(".json"):
        path, cls = spec, None
    else:
        path, _, cls = spec.rpartition(":")
        if not cls.isidentifier():
            raise ConfigError("partitioner", spec, f"{ALLOWED} (ClassName: a Python identifier)")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError("partitioner", spec, f"{ALLOWED}, naming an existing file")
    return file, cls


def file_sha256(spec: str) -> str:
    """SHA-256 of the file a user spec names (recorded in summary.json)."""
    return hashlib.sha256(split_spec(spec)[0].read_bytes()).hexdigest()


def fingerprint(spec: str) -> tuple:
    """What identifies a user file for caches: path, size and modification time."""
    file = split_spec(spec)[0].resolve()
    st = file.stat()
    return (str(file), st.st_size, st.st_mtime_ns)


def load_user_class(spec: str) -> type[Partitioner]:
    """The ``Partitioner`` subclass ``ClassName`` defined in ``file.py``."""
    file, name = split_spec(spec)
    digest = hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]
    module_name = f"flower_p2p_user_partitioner_{digest}"
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, file)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up here
        module_spec.loader.exec_module(module)
    except Exception as err:  # whatever the user's file raises on import
        sys.modules.pop(module_name, None)
        raise ConfigError(
            "partitioner", spec, f"an importable Python file ({type(err).__name__}: {err})"
        ) from err
    cls = getattr(module, name, None)
    if cls is None:
        found = sorted(k for k, v in vars(module).items() if inspect.isclass(v)
                       and issubclass(v, Partitioner) and v is not Partitioner)  # fmt: skip
        raise ConfigError(
            "partitioner",
            spec,
            f"a class of {file.name} (its Partitioner subclasses: {', '.join(found) or 'none'})",
        )
    if not (inspect.isclass(cls) and issubclass(cls, Partitioner)):
        raise ConfigError(
            "partitioner", spec, "a subclass of flwr_datasets.partitioner.Partitioner"
        )
    return cls


def build_user_partitioner(
    spec: str, num_nodes: int, label_column: str, num_classes: int, seed: int
) -> Partitioner:
    """An instance of the user's class, given the arguments its ``__init__`` names."""
    cls = load_user_class(spec)
    offered = dict(zip(OFFERED, (num_nodes, label_column, num_classes, seed), strict=True))
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    required = [p.name for p in params if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]  # fmt: skip
    unknown = [p for p in required if p not in offered]
    if unknown:
        raise ConfigError(
            "partitioner",
            spec,
            f"a class whose __init__ needs only {', '.join(OFFERED)} "
            f"(it also requires {', '.join(unknown)})",
        )
    named = {p.name for p in params}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params)
    kwargs = {k: v for k, v in offered.items() if takes_any or k in named}
    try:
        partitioner = cls(**kwargs)
    except Exception as err:
        raise ConfigError(
            "partitioner", spec, f"a class built from {kwargs} ({type(err).__name__}: {err})"
        ) from err
    try:
        count = partitioner.num_partitions
    except Exception:  # many report it only once they have a dataset; checked after loading
        count = num_nodes
    if count != num_nodes:
        raise ConfigError(
            "partitioner", spec,
            f"a partitioner of num-nodes={num_nodes} partitions (it has {count})",
        )  # fmt: skip
    return partitioner


def read_json_rows(spec: str, num_nodes: int) -> list[list[int]]:
    """The per-node row lists of a ``.json`` partition file (shape checked, not range)."""
    file, _ = split_spec(spec)
    try:
        rows = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError("partitioner", spec, f"a readable JSON file ({err})") from err
    shape = "a JSON list of one list of training-row indices (integers) per node"
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise ConfigError("partitioner", spec, shape)
    if not all(isinstance(i, int) and not isinstance(i, bool) for r in rows for i in r):
        raise ConfigError("partitioner", spec, shape)
    if len(rows) != num_nodes:
        raise ConfigError(
            "partitioner", spec, f"{shape}: num-nodes={num_nodes} lists (it holds {len(rows)})"
        )
    return rows
