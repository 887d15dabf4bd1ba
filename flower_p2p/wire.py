"""What travels: numpy parameter dicts <-> Flower records, and the message layout.

Server -> node ``train``/``evaluate`` message content:
  ``config``      ConfigRecord: round, evaluate (bool), steps-fraction (< 1 for a straggler)
  ``in:<j>``      ArrayRecord: the message neighbour j sent last round (one per arrived neighbour)
Node -> server reply content:
  ``out``         ArrayRecord: what this node sends to its neighbours (empty: nothing to send)
  ``out:<k>``     ArrayRecord, instead of ``out`` for an algorithm that sends each receiver its own
                  message (RelaySum): the message for node k
  ``metrics``     MetricRecord: accuracy/loss (when evaluated), train_loss, payload_bytes, timings
  ``monitor``     ArrayRecord, only when the node evaluated: the shared parameters of the model it
                  evaluated, for the relay's consensus distance (monitoring, not traffic; never
                  relayed to any node)
Server -> node ``query.checkpoint`` / ``query.restore``: ``config`` ConfigRecord with the
checkpoint folder ``path`` the node writes its state to / reads it from.
Server -> node ``query.configure``: ``config`` ConfigRecord with the experiment's run config and
an ``experiment`` id; a node moving on to a new experiment starts from a clean state.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

# Flower's own serialisation of an ndarray (``Array(ndarray)``): ``np.save`` bytes.
NUMPY_STYPE = "numpy.ndarray"

INBOX_PREFIX = "in:"
OUTBOX_PREFIX = "out:"
MONITOR = "monitor"


def to_record(
    params: dict[str, np.ndarray],
    reuse: tuple[dict[str, np.ndarray], ArrayRecord] | None = None,
) -> ArrayRecord:
    """Pack named numpy arrays into an ArrayRecord (order preserved).

    ``reuse=(arrays, record)``: an array that *is* ``arrays[name]`` takes the already packed
    ``record[name]`` instead of being serialised again (a DSGD message is the kept model).
    """
    record = ArrayRecord()
    for name, value in params.items():
        if reuse is not None and reuse[0].get(name) is value:
            record[name] = reuse[1][name]
        else:
            record[name] = to_array(value)
    return record


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord into named numpy arrays."""
    return {name: from_array(array) for name, array in record.items()}


def to_array(value: np.ndarray) -> Array:
    """``Array(value)``, byte for byte, without formatting the same ``.npy`` header each time.

    Flower's ``Array(ndarray)`` runs ``np.save``, which builds and writes a header for every
    array; a node packs a dozen small arrays several times a round, and at hundreds of nodes
    the headers cost more than the numbers. The header depends on dtype and shape only.
    """
    value = np.ascontiguousarray(value)
    header = _npy_header(value.dtype.str, value.shape)
    if header is None or value.dtype.hasobject:
        return Array(value)
    return Array(dtype=str(value.dtype), shape=tuple(int(d) for d in value.shape),
                 stype=NUMPY_STYPE, data=header + value.tobytes())  # fmt: skip


def from_array(array: Array) -> np.ndarray:
    """``array.numpy()``: a writable array, read past the header ``to_array`` (or np.save) wrote.

    ``np.load`` parses the header with ``ast.literal_eval`` each time; dtype and shape are already
    in the Array's fields. Anything else (Fortran order, another serialisation, a 0-d array,
    whose Array shape is (1,)) goes to Flower.
    """
    dtype = np.dtype(array.dtype) if array.stype == NUMPY_STYPE else None
    if dtype is None or dtype.hasobject:
        return array.numpy()
    count = int(np.prod(array.shape, dtype=np.int64))
    start = len(array.data) - count * dtype.itemsize
    if start <= 0 or array.data[:start] != _npy_header(dtype.str, tuple(array.shape)):
        return array.numpy()
    return np.frombuffer(array.data, dtype, count, start).reshape(array.shape).copy()


@lru_cache(maxsize=4096)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes | None:
    # What np.save writes before the data of a C-ordered array of this dtype and shape (format
    # 1.0; None where that cannot hold the header). A zero-strided view carries dtype and shape
    # without allocating the array (as_strided cannot make a 0-d view).
    like = (
        np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * len(shape))
        if shape
        else np.zeros((), dtype)
    )
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(like))
    except ValueError:
        return None
    return buf.getvalue()


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of a serialised payload: array buffers (with their npy headers) plus keys."""
    return record.count_bytes()


def pack_inbox(content: RecordDict, inbox: dict[int, ArrayRecord]) -> None:
    """Put neighbours' messages into a message's content, keyed by sender id."""
    for sender, record in sorted(inbox.items()):
        content[f"{INBOX_PREFIX}{sender}"] = record


def unpack_inbox(content: RecordDict) -> dict[int, dict[str, np.ndarray]]:
    """Neighbours' messages from a message's content, keyed by sender id."""
    return {
        int(key[len(INBOX_PREFIX) :]): from_record(record)
        for key, record in content.array_records.items()
        if key.startswith(INBOX_PREFIX)
    }


def pack_outbox(content: RecordDict, outbox: dict[int, ArrayRecord]) -> None:
    """Per-receiver messages into a reply's content, keyed by receiver id."""
    for receiver, record in sorted(outbox.items()):
        content[f"{OUTBOX_PREFIX}{receiver}"] = record


def unpack_outbox(content: RecordDict) -> dict[int, ArrayRecord]:
    """Per-receiver messages from a reply's content, keyed by receiver id."""
    return {
        int(key[len(OUTBOX_PREFIX) :]): record
        for key, record in content.array_records.items()
        if key.startswith(OUTBOX_PREFIX)
    }
