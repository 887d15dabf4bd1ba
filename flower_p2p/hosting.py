"""Several graph nodes per SuperNode: fewer, larger Flower messages (``nodes-per-supernode``).

Flower's engine and Ray cost ~10 ms of CPU per message whatever it carries, while a head-only
node's own work costs ~2 ms: past a few hundred nodes a round is mostly that overhead. With
``nodes-per-supernode=k`` SuperNode ``g`` hosts graph nodes ``g*k .. g*k + k - 1`` (the last one
fewer), and each round's messages for them travel as one Flower message:

* ServerApp side, ``HostingGrid`` wraps the Grid the relay talks to. It offers one virtual node
  id per graph node, so the relay (``GossipStrategy``, ``AsyncGossipStrategy``) stays exactly as
  it is: still one message per graph node, addressed to it, with only its in-neighbours'
  messages. ``send_and_receive`` packs the messages for the nodes of one SuperNode into sections
  ``<node>|<key>`` of one message and unpacks the reply into one reply per graph node, an error
  where that node's call raised.
* ClientApp side, the mod ``host_nodes`` unpacks the sections and calls the app's handler once
  per hosted node, in node order, each with its own section and a ``Context`` of its own:
  ``partition-id`` is the graph node, and its ``state`` holds only that node's records (kept in
  the SuperNode's state under the same ``<node>|`` prefix). A node whose call raises keeps its
  state, and its error travels back in its section; the other nodes' results are kept.

A node computes exactly what it computes alone (its data, generators and state are its own), so
a run gives the same ``metrics.jsonl`` with any ``nodes-per-supernode`` (tested). What changes is
who can see what: the SuperNode's process holds the models of every node it hosts. That is a
simulation of several peers on one machine, not a deployment of mutually distrusting peers.
Messages without sections (``nodes-per-supernode=1``) pass through the mod untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

from flwr.app import ConfigRecord, Context, Error, Message, Metadata, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from flower_p2p.gossip_node import ask_partition_ids

HOSTED = "hosted"  # ConfigRecord of a packed message: the graph nodes it carries
SEP = "|"  # section separator: "<node>|<key>"
ERROR = "!error"  # a section's key for the error its node's call raised


def supernodes_needed(num_nodes: int, per_supernode: int) -> int:
    """SuperNodes that host ``num_nodes`` graph nodes, ``per_supernode`` each."""
    return -(-num_nodes // per_supernode)


def hosted_by(supernode: int, per_supernode: int, num_nodes: int) -> range:
    """The graph nodes SuperNode ``supernode`` (its partition-id) hosts."""
    return range(supernode * per_supernode, min((supernode + 1) * per_supernode, num_nodes))


def pack_sections(sections: dict[int, RecordDict], num_nodes: int) -> RecordDict:
    """One content of several nodes' contents: keys ``<node>|<key>``, plus ``hosted``."""
    packed = RecordDict({HOSTED: ConfigRecord({"nodes": sorted(sections),
                                               "num-nodes": num_nodes})})  # fmt: skip
    for node, content in sections.items():
        for key, record in content.items():
            packed[f"{node}{SEP}{key}"] = record
    return packed


def unpack_sections(packed: RecordDict) -> dict[int, RecordDict]:
    """Inverse of ``pack_sections``: each node's content, in node order."""
    nodes = [int(n) for n in packed.config_records[HOSTED]["nodes"]]
    sections: dict[int, RecordDict] = {n: RecordDict() for n in nodes}
    for key, record in packed.items():
        if key == HOSTED:
            continue
        node, _, inner = key.partition(SEP)
        sections[int(node)][inner] = record
    return sections


def _error_reason(exc: BaseException) -> str:
    # the format Flower gives a ClientApp's exception ("<class 'ValueError'>:<'...'>")
    return str(type(exc)) + ":<'" + str(exc) + "'>"


def host_nodes(msg: Message, context: Context, call_next: Callable) -> Message:
    """ClientApp mod: run the app's handler once per graph node a packed message carries."""
    if HOSTED not in msg.content.config_records:
        return call_next(msg, context)
    num_nodes = int(msg.content.config_records[HOSTED]["num-nodes"])
    replies: dict[int, RecordDict] = {}
    for node, content in unpack_sections(msg.content).items():
        prefix = f"{node}{SEP}"
        state = RecordDict({k[len(prefix):]: v for k, v in context.state.items()
                            if k.startswith(prefix)})  # fmt: skip
        own = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config={**context.node_config, "partition-id": node, "num-partitions": num_nodes},
            state=state,
            run_config=context.run_config,
        )
        try:
            reply = call_next(Message(metadata=copy.copy(msg.metadata), content=content), own)
        except Exception as exc:  # noqa: BLE001 -- one node's failure is reported, not fatal
            replies[node] = RecordDict({ERROR: ConfigRecord(
                {"code": ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                 "reason": _error_reason(exc)})})  # fmt: skip
            continue  # as Flower does for a node that raised: its state stays as it was
        for key in [k for k in context.state.keys() if k.startswith(prefix)]:
            context.state.pop(key)
        for key, record in own.state.items():
            context.state[prefix + key] = record
        if reply.has_error():
            replies[node] = RecordDict({ERROR: ConfigRecord(
                {"code": reply.error.code, "reason": reply.error.reason})})  # fmt: skip
        else:
            replies[node] = reply.content
    return Message(pack_sections(replies, num_nodes), reply_to=msg)


class HostingGrid(Grid):
    """The relay's Grid with one virtual node per graph node, hosted ``per_supernode`` a SuperNode.

    ``grid``: the Grid of the Flower run; ``num_nodes`` graph nodes ``0 .. num_nodes - 1``.
    Virtual node ``i + 1`` is graph node ``i`` (0 is not a Flower node id).
    """

    def __init__(self, grid: Grid, num_nodes: int, per_supernode: int) -> None:
        self.grid, self.num_nodes, self.per_supernode = grid, num_nodes, per_supernode
        self._host: dict[int, int] = {}  # graph node -> Flower node id of its SuperNode

    # Grid's run bookkeeping belongs to the wrapped Grid.
    @property
    def run(self):  # noqa: ANN201 -- flwr's Run
        """The Flower run of the wrapped Grid."""
        return self.grid.run

    def set_run(self, run_id: int) -> None:
        """Delegated to the wrapped Grid."""
        self.grid.set_run(run_id)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:  # fmt: skip
        """A message to a graph node's virtual id (``Message(...)`` works as well)."""
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)  # fmt: skip

    def get_node_ids(self) -> Iterable[int]:
        """One virtual id per graph node whose SuperNode is connected."""
        if len(self._host) < self.num_nodes:
            self._discover()
        return [node + 1 for node in sorted(self._host)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Not offered: the relay uses ``send_and_receive``, which packs and unpacks in one go."""
        raise NotImplementedError("HostingGrid relays with send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Not offered (see ``push_messages``)."""
        raise NotImplementedError("HostingGrid relays with send_and_receive only")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Pack the messages per SuperNode, send them, and unpack one reply per graph node."""
        messages = list(messages)
        if not messages:
            return []
        if len(self._host) < self.num_nodes:
            self._discover()
        groups: dict[tuple[int, str], dict[int, Message]] = {}
        for m in messages:
            node = m.metadata.dst_node_id - 1
            if node not in self._host:
                raise ValueError(f"no graph node {node} behind virtual node id "
                                 f"{m.metadata.dst_node_id}")  # fmt: skip
            key = (self._host[node], m.metadata.message_type)
            if node in groups.setdefault(key, {}):
                raise ValueError(f"two messages for graph node {node} in one send_and_receive")
            groups[key][node] = m
        packed, sent = [], {}
        for (host, kind), by_node in groups.items():
            first = by_node[min(by_node)]
            content = pack_sections({n: m.content for n, m in by_node.items()}, self.num_nodes)
            packed.append(Message(content, dst_node_id=host, message_type=kind,
                                  group_id=first.metadata.group_id))  # fmt: skip
            sent[(host, kind)] = by_node
        replies = []
        for reply in self.grid.send_and_receive(packed, timeout=timeout):
            by_node = sent[(reply.metadata.src_node_id, reply.metadata.message_type)]
            if reply.has_error():  # the whole SuperNode's call failed: every node it carried
                replies += [_reply(by_node[n], error=reply.error) for n in sorted(by_node)]
                continue
            for node, content in unpack_sections(reply.content).items():
                if ERROR in content.config_records:
                    err = content.config_records[ERROR]
                    replies.append(_reply(by_node[node], error=Error(
                        code=int(err["code"]), reason=str(err["reason"]))))  # fmt: skip
                else:
                    replies.append(_reply(by_node[node], content=content))
        return replies

    def _discover(self) -> None:
        """Ask every connected SuperNode its partition-id; map graph nodes to their hosts."""
        self._host = {node: nid for pid, nid in ask_partition_ids(self.grid).items()
                      for node in hosted_by(pid, self.per_supernode, self.num_nodes)}  # fmt: skip


def _reply(request: Message, content: RecordDict | None = None, error: Error | None = None
           ) -> Message:  # fmt: skip
    """The reply graph node ``request`` was sent to would have sent on its own."""
    meta = request.metadata
    metadata = Metadata(
        run_id=meta.run_id,
        message_id="",
        src_node_id=meta.dst_node_id,
        dst_node_id=meta.src_node_id,
        reply_to_message_id=meta.message_id,
        group_id=meta.group_id,
        created_at=meta.created_at,
        ttl=meta.ttl,
        message_type=meta.message_type,
    )
    if error is not None:
        return Message(metadata=metadata, error=error)
    return Message(metadata=metadata, content=content)


__all__ = ["HostingGrid", "host_nodes", "hosted_by", "pack_sections", "supernodes_needed",
           "unpack_sections"]  # fmt: skip
