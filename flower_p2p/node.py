"""One node's work in one round, independent of how messages travel.

``NodeRuntime`` holds what a node rebuilds rather than sends (the process's model, preprocessed
data); ``run_round`` is the whole round: combine with the inbox, evaluate, train locally, produce
the outgoing message. The ClientApp and any plain single-process loop call the same function.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from flower_p2p import prefix_cache
from flower_p2p.config import ExperimentConfig
from flower_p2p.data import DataBundle, data_key, load_data, make_transform, to_tensors
from flower_p2p.faults import check_injected_failure, local_steps, round_steps
from flower_p2p.feature_skew import shift_for
from flower_p2p.models import (
    apply_finetune,
    create_model,
    data_config,
    get_params,
    set_params,
    shared_names,
)
from flower_p2p.network import CENTRALIZED_NODE, Network
from flower_p2p.schedules import topology_at
from flower_p2p.training import (
    evaluate,
    load_optimizer_state,
    lr_at_round,
    make_optimizer,
    optimizer_state,
    pick_device,
    restricted_softmax_scale,
    train_epochs,
)
from flower_p2p.unseen import unseen_class_accuracy
from strategies import GossipAlgorithm, Params, State

__all__ = ["CENTRALIZED_NODE", "NodeRuntime", "RoundResult", "algorithm_for", "mixing_inputs",
           "node_runtime", "run_round"]  # fmt: skip


class NodeRuntime:
    """The model a node computes with and its preprocessed tensors (centralized: all data).

    ``model`` is shared by the nodes of a process (see ``node_model``): a node's own parameters
    are written into it at the start of every round.

    ``net`` is what training and evaluation call; with the frozen-prefix cache on it takes the
    prefix's activations, and ``train_x``/``test_x`` hold those activations instead of images.
    """

    def __init__(self, cfg: ExperimentConfig, node: int) -> None:
        self.cfg, self.node = cfg, node
        self.device = pick_device()
        bundle = load_data(cfg)
        self.num_classes = bundle.num_classes
        self.model, self.trainable, self.initial_params = node_model(
            cfg, bundle.num_classes, self.device
        )
        self.shared = shared_names(self.trainable, cfg)
        # Looked up every round; walking the model's module tree for them costs more than a
        # head-only node's training step (the model is shared, the dict and list are per node).
        self.param_table = dict(self.model.named_parameters())
        self.train_params = [p for p in self.model.parameters() if p.requires_grad]
        norm = data_config(self.model)
        self.train_x, self.train_y = _train_tensors(cfg, bundle, node, norm)
        # The classes this node trains on; test samples of the others are its "unseen" ones.
        self.seen_classes = torch.unique(self.train_y)
        self.logit_scale = restricted_softmax_scale(
            self.num_classes, self.seen_classes, cfg.restricted_softmax
        )
        self.test_x, self.test_y = _test_tensors(data_key(cfg), cfg.img_size or 224, norm, bundle)
        # Feature skew: the node's own domain's copy of the test set (domain_accuracy).
        shift = None if cfg.strategy == "centralized" else shift_for(cfg, bundle.partition_of(node))
        self.domain_test_x = None
        if shift is not None:
            transform = make_transform(cfg.img_size or 224, *norm, shift=shift, split="test")
            self.domain_test_x = to_tensors(bundle.test, bundle, transform)[0]
        self.cache = prefix_cache.plan(
            cfg, self.model, self.trainable, len(self.train_y), eval_copies(cfg) * len(self.test_y),
            tuple(self.train_x.shape[1:]), self.device,
        )  # fmt: skip
        self.net = self.cache.network(self.model)
        if self.cache.on:
            split = self.cache.split
            self.train_x = prefix_cache.activations(split, self.train_x, self.device)
            key = prefix_cache.cache_key(cfg, *norm, part="test")
            self.test_x = prefix_cache.shared_activations(key, split, self.test_x, self.device)
            if self.domain_test_x is not None:  # this node's alone, like its training images
                self.domain_test_x = prefix_cache.activations(split, self.domain_test_x,
                                                              self.device)  # fmt: skip

    def nbytes(self) -> int:
        """Bytes this node holds alone: its data (the test set and model are the process's)."""
        own = [self.train_x, self.train_y, self.domain_test_x]
        return sum(t.untyped_storage().nbytes() for t in own if t is not None)

    def optimizer(self, saved: Params | None, rnd: int) -> torch.optim.Optimizer:
        """An optimizer over the trainable parameters at round ``rnd``'s learning rate.

        Its state (e.g. AdamW moments) stays on the node between rounds and is never sent.
        """
        cfg = self.cfg
        # QG-DSGDm's quasi-global buffer replaces SGD's own momentum
        momentum = 0.0 if cfg.strategy == "qg-dsgdm" else cfg.momentum
        opt = make_optimizer(self.train_params, cfg.optimizer, cfg.lr, cfg.weight_decay, momentum)
        if saved:
            load_optimizer_state(opt, saved)
        for group in opt.param_groups:
            group["lr"] = lr_at_round(cfg.lr, cfg.lr_schedule, rnd, cfg.num_rounds)
        return opt


_TEMPLATES: dict[tuple, tuple[torch.nn.Module, list[str], Params]] = {}


def node_model(
    cfg: ExperimentConfig, num_classes: int, device: torch.device
) -> tuple[torch.nn.Module, list[str], Params]:
    """The model a node of this process computes with, its trainable names and their start values.

    Nodes that run one after another in a process share one model: ``run_round`` writes a node's
    own trainable parameters into it before it combines, evaluates or trains, and reads them back
    after, so what a node learns lives in its state (``Context.state``), never in the model. A
    process that serves 100 nodes therefore holds one model and one set of gradients, not 100
    (``python -m bench --only 5`` measures what a node still costs). Every node starts from the
    same weights (same seed or checkpoint), returned as the third item, copied when the model is
    built so that no node's training can change them. A model whose forward pass in training
    changes state outside its parameters (BatchNorm's running statistics) gets a copy per node,
    its frozen weights still shared.
    """
    key = (cfg, num_classes, prefix_cache.checkpoint_fingerprint(cfg), str(device))
    if key not in _TEMPLATES:
        _TEMPLATES.clear()  # one config at a time per process
        model, trainable = apply_finetune(create_model(cfg, num_classes), cfg)
        model = model.to(device)
        _TEMPLATES[key] = (model, trainable, get_params(model, trainable))
    template, trainable, initial = _TEMPLATES[key]
    if not _trains_buffers(template):
        return template, list(trainable), initial
    # the template itself never trains on this path, so a copy starts at the start values
    frozen = {id(p): p for p in template.parameters() if not p.requires_grad}
    return copy.deepcopy(template, memo=dict(frozen)), list(trainable), initial


def _trains_buffers(model: torch.nn.Module) -> bool:
    """True when training mode updates buffers (running statistics), which no state carries."""
    return any(
        isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
        for m in model.modules()
    )


def _train_tensors(
    cfg: ExperimentConfig, bundle: DataBundle, node: int, norm: tuple
) -> tuple[torch.Tensor, torch.Tensor]:
    """A node's training tensors, each partition's images through its domain's shift.

    The centralized reference trains on every partition, in the partitioner's order.
    """
    size = cfg.img_size or 224
    if cfg.strategy != "centralized":
        shift = shift_for(cfg, bundle.partition_of(node))
        return to_tensors(bundle.partitions[node], bundle, make_transform(size, *norm, shift=shift))
    if cfg.feature_skew == "none":
        return to_tensors(bundle.union(), bundle, make_transform(size, *norm))
    parts = [to_tensors(p, bundle, make_transform(size, *norm, shift=shift_for(cfg, j)))
             for j, p in enumerate(bundle.partitions)]  # fmt: skip
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def eval_copies(cfg: ExperimentConfig) -> int:
    """Test sets a node evaluates on: the global one, and its domain's copy with feature skew."""
    return 1 if cfg.feature_skew == "none" or cfg.strategy == "centralized" else 2


_TEST_TENSORS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _test_tensors(
    data_key: tuple, img_size: int, norm: tuple, bundle: DataBundle
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global test split, preprocessed once per process.

    Every node evaluates on it, so 64 nodes in one process hold one copy, not 64.
    """
    key = (data_key, img_size, norm)
    if key not in _TEST_TENSORS:
        _TEST_TENSORS.clear()  # one config at a time per process; drop the previous one
        _TEST_TENSORS[key] = to_tensors(bundle.test, bundle, make_transform(img_size, *norm))
    return _TEST_TENSORS[key]


# What a process keeps of the nodes it served: their preprocessed data. Ray hands any node to any
# actor, so an actor serves every node in turn; a bound by count (an LRU of 128 runtimes) rebuilt
# every node every round past 128 nodes per actor. A bound by bytes keeps every node of a
# head-only run of 1,024 nodes (kilobytes each) and still caps 224-pixel images.
RUNTIME_CACHE_BYTES = 1 << 30


class RuntimeCache:
    """Node runtimes of a process, the least recently used dropped past ``max_bytes`` of data."""

    def __init__(self, max_bytes: int = RUNTIME_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, tuple[NodeRuntime, int]] = OrderedDict()
        self.total_bytes = 0
        self.built = 0  # runtimes built: more than the nodes served means the cache thrashes

    def get(self, key: tuple, build: Callable[[], NodeRuntime]) -> NodeRuntime:
        """The runtime cached under ``key``, built (and cached) if absent."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key][0]
        rt = build()
        self.built += 1
        size = rt.nbytes()
        self._items[key] = (rt, size)
        self.total_bytes += size
        while self.total_bytes > self.max_bytes and len(self._items) > 1:
            _, (_, dropped) = self._items.popitem(last=False)
            self.total_bytes -= dropped
        return rt

    def clear(self) -> None:
        """Forget every runtime."""
        self._items.clear()
        self.total_bytes = self.built = 0

    def __len__(self) -> int:
        return len(self._items)


RUNTIMES = RuntimeCache()


def node_runtime(cfg: ExperimentConfig, node: int) -> NodeRuntime:
    """Per-process cache: a node's model and data are built once, not every round.

    A checkpoint file that changes on disk (size or mtime) gives a fresh runtime.
    """
    key = (cfg, node, prefix_cache.checkpoint_fingerprint(cfg))
    return RUNTIMES.get(key, lambda: NodeRuntime(cfg, node))


@dataclass
class RoundResult:
    """Everything a round produces at one node."""

    params: Params
    # the shared parameters after combining: the model the node evaluates (and consensus measures)
    combined: Params
    message: Params
    state: State
    optimizer: Params
    train_loss: float
    accuracy: float | None = None
    loss: float | None = None
    # accuracy on test classes absent from the node's training data (None: it has them all)
    unseen_accuracy: float | None = None
    # accuracy on the node's own domain's copy of the test set (None without feature skew)
    domain_accuracy: float | None = None
    train_s: float = 0.0
    eval_s: float = 0.0


def mixing_inputs(
    cfg: ExperimentConfig, algo: GossipAlgorithm, node: int, rnd: int
) -> tuple[dict[int, float], dict]:
    """Node's weights for round ``rnd``'s combine, and extra combine arguments.

    The inbox of round ``rnd`` holds what was sent in round ``rnd - 1``, over that round's graph,
    so its weights come from that graph; push-sum also needs how many nodes it sends to now.
    """
    if cfg.strategy == "centralized":
        return {node: 1.0}, {}
    weights = topology_at(cfg, rnd - 1).row(node)
    extra = {}
    if algo.needs_out_degree:
        extra["out_degree"] = len(topology_at(cfg, rnd).out_neighbours[node])
    return weights, extra


def round_generator(seed: int, node: int, rnd: int) -> torch.Generator:
    """Shuffling RNG that depends only on (seed, node, round): any process, same batches."""
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, node, rnd]).generate_state(1)[0])
    )


def run_round(
    rt: NodeRuntime,
    algo: GossipAlgorithm,
    params: Params | None,
    state: State | None,
    optimizer: Params | None,
    inbox: dict[int, Params],
    weights: dict[int, float],
    rnd: int,
    do_eval: bool,
    train: bool = True,
    combine_kwargs: dict | None = None,
    steps_fraction: float = 1.0,
    activation: int | None = None,
) -> RoundResult:
    """Combine -> (evaluate) -> train -> message, for round ``rnd`` (1-based) at ``rt.node``.

    Evaluation happens on the combined model, i.e. the node's model after ``rnd - 1`` full rounds.
    With ``train=False`` (the final evaluation) no training happens and nothing is sent. A
    straggler gets ``steps_fraction < 1`` and takes that fraction of its local steps.
    ``activation``: in ``mode=async``, the node's activation count, which seeds its minibatch
    order (``rnd`` only sets the learning rate there, and several activations share one).
    """
    if params is None:  # a copy: the start values are shared by every node of the process
        params = {k: v.copy() for k, v in rt.initial_params.items()}
    # Only the shared groups go through the algorithm; the others never leave the node.
    shared = {k: params[k] for k in rt.shared}
    if state is None:
        state = algo.init_state(shared)
    kwargs = dict(combine_kwargs or {})
    if algo.needs_num_examples:
        kwargs["num_examples"] = len(rt.train_y)
    if algo.needs_step_size:  # the sum of the learning rates of the steps about to be taken
        steps = round_steps(rt.cfg, len(rt.train_y), steps_fraction) if train else 0
        kwargs["step_size"] = steps * lr_at_round(rt.cfg.lr, rt.cfg.lr_schedule, rnd,
                                                  rt.cfg.num_rounds)  # fmt: skip
    shared = algo.combine(shared, state, inbox, weights, rt.node, **kwargs)
    params = {**params, **shared}
    set_params(rt.param_table, params)
    result = RoundResult(params=params, combined=shared, message={}, state=state,
                         optimizer=optimizer or {}, train_loss=float("nan"))  # fmt: skip
    if do_eval:
        t0 = time.perf_counter()
        acc, loss, pred = evaluate(rt.net, rt.test_x, rt.test_y, 256, rt.device)
        result.accuracy, result.loss, result.eval_s = acc, loss, time.perf_counter() - t0
        result.unseen_accuracy = unseen_class_accuracy(pred, rt.test_y, rt.seen_classes)
        if rt.domain_test_x is not None:
            result.domain_accuracy = evaluate(rt.net, rt.domain_test_x, rt.test_y, 256,
                                              rt.device)[0]  # fmt: skip
    if not train:  # AD-PSGD's pair exchange still replies with the model it left
        result.message = algo.resting_message(state)
        return result
    cfg = rt.cfg
    check_injected_failure(cfg, rt.node, rnd if activation is None else activation)
    t0 = time.perf_counter()
    opt = rt.optimizer(optimizer, rnd)
    gen = round_generator(cfg.seed, rt.node, rnd if activation is None else activation)
    steps = local_steps(cfg, len(rt.train_y), steps_fraction)
    names, correction = _correction(rt, algo, state)
    mean_gradient: list[torch.Tensor] | None = [] if algo.corrects_gradient else None
    result.train_loss = train_epochs(
        rt.net, rt.train_x, rt.train_y, opt, cfg.local_epochs, cfg.batch_size, gen, rt.device,
        steps=steps, logit_scale=rt.logit_scale, correction=correction,
        mean_gradient=mean_gradient,
    )  # fmt: skip
    if mean_gradient is not None:
        algo.observe_gradient(state, {k: g.cpu().numpy() for k, g in
                                      zip(names, mean_gradient, strict=True)})  # fmt: skip
    result.train_s = time.perf_counter() - t0
    result.params = get_params(rt.param_table, rt.trainable)
    result.optimizer = optimizer_state(opt)
    trained = {k: result.params[k] for k in rt.shared}
    if algo.per_receiver_messages:  # one message per receiver (RelaySum)
        receivers = Network(cfg, algo).receivers(rt.node, rnd)
        result.message = algo.message(trained, state, receivers)
    else:
        result.message = algo.message(trained, state)
    return result


def _correction(
    rt: NodeRuntime, algo: GossipAlgorithm, state: State
) -> tuple[list[str], list[tuple[torch.Tensor, torch.Tensor]] | None]:
    """The algorithm's per-step correction: parameter names, (model parameter, tensor) pairs."""
    corr = algo.local_correction(state)
    if not corr:
        return [], None
    params = rt.param_table
    return list(corr), [(params[k], torch.from_numpy(np.ascontiguousarray(v)).to(rt.device))
                        for k, v in corr.items()]  # fmt: skip


def algorithm_for(cfg: ExperimentConfig) -> GossipAlgorithm:
    """The gossip algorithm a node runs, with its run-config hyperparameters.

    The centralized reference trains like a lone node that never communicates.
    """
    from strategies import Choco, create_strategy

    if cfg.strategy == "choco":
        return Choco(gamma=cfg.gamma, compressor=cfg.compressor,
                     compress_fraction=cfg.compress_fraction, seed=cfg.seed)  # fmt: skip
    if cfg.strategy == "relay-sum":
        return create_strategy("relay-sum", num_nodes=cfg.num_nodes)
    if cfg.strategy == "qg-dsgdm":
        return create_strategy("qg-dsgdm", momentum=cfg.momentum)
    return create_strategy("local" if cfg.strategy == "centralized" else cfg.strategy)
