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

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

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
            record[name] = Array(np.ascontiguousarray(value))
    return record


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord into named numpy arrays."""
    return {name: array.numpy() for name, array in record.items()}


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
