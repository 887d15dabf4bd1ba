"""Nodes of one process share one model; what each computes does not depend on who ran before."""

import numpy as np
import pytest
import torch

from flower_p2p import node as node_module
from flower_p2p.config import ExperimentConfig
from flower_p2p.node import _trains_buffers, algorithm_for, node_runtime, run_round

CFG = ExperimentConfig(num_nodes=3, depth=1, partitioner="iid", num_rounds=4)


def _round(cfg: ExperimentConfig, node: int, rnd: int = 1, params=None, optim=None):
    algo = algorithm_for(cfg)
    return run_round(node_runtime(cfg, node), algo, params, None, optim, {}, {node: 1.0},
                     rnd=rnd, do_eval=True)  # fmt: skip


def _fresh_process_state() -> None:
    node_module.RUNTIMES.clear()
    node_module._TEMPLATES.clear()


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_nodes_of_a_process_share_one_model():
    _fresh_process_state()
    assert node_runtime(CFG, 0).model is node_runtime(CFG, 1).model


# last-k without the prefix cache, head with it
@pytest.mark.parametrize("finetune", ["full", "last-k", "lora", "head"])
def test_a_node_computes_the_same_whether_or_not_another_trained_first(finetune):
    cfg = CFG.replace(finetune=finetune, prefix_cache="off" if finetune == "last-k" else "auto")
    # node 1 alone, in a fresh process
    _fresh_process_state()
    alone = _round(cfg, 1)
    again = _round(cfg, 1, rnd=2, params=alone.params, optim=alone.optimizer)
    # node 0 trains two rounds first, then node 1 (its runtime built after node 0 trained)
    _fresh_process_state()
    first = _round(cfg, 0)
    _round(cfg, 0, rnd=2, params=first.params, optim=first.optimizer)
    after = _round(cfg, 1)
    _same(after.params, alone.params)
    assert after.accuracy == alone.accuracy and after.train_loss == alone.train_loss
    # ... and node 0's round in between does not leak into node 1's second round
    _round(cfg, 0, rnd=3, params=first.params, optim=first.optimizer)
    again_after = _round(cfg, 1, rnd=2, params=after.params, optim=after.optimizer)
    _same(again_after.params, again.params)
    _same(again_after.optimizer, again.optimizer)


def test_the_start_values_are_the_untrained_model_and_never_change():
    _fresh_process_state()
    start = {k: v.copy() for k, v in node_runtime(CFG, 0).initial_params.items()}
    trained = _round(CFG, 0)
    assert any(not np.array_equal(trained.params[k], start[k]) for k in start)
    _same(node_runtime(CFG, 2).initial_params, start)


def test_a_model_with_running_statistics_gets_a_copy_per_node(monkeypatch):
    assert not _trains_buffers(node_runtime(CFG, 0).model)  # the ViTs: LayerNorm only
    assert _trains_buffers(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
    _fresh_process_state()
    monkeypatch.setattr(node_module, "_trains_buffers", lambda model: True)
    rt0 = node_runtime(CFG, 0)
    _round(CFG, 0)
    rt1 = node_runtime(CFG, 1)
    assert rt0.model is not rt1.model
    frozen0 = {id(p) for p in rt0.model.parameters() if not p.requires_grad}
    assert frozen0 <= {id(p) for p in rt1.model.parameters()}  # frozen weights still shared
    current = {n: p.detach().numpy() for n, p in rt1.model.named_parameters()}
    _same({k: current[k] for k in rt1.initial_params}, rt1.initial_params)


@pytest.fixture(autouse=True)
def _one_thread():
    # bitwise comparisons: the same thread count for every round of a test
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    _fresh_process_state()


class _Sized:
    def __init__(self, size: int) -> None:
        self.size = size

    def nbytes(self) -> int:
        return self.size


def test_runtime_cache_keeps_every_node_of_a_large_run_within_its_byte_bound() -> None:
    # an actor serves every node in turn: 300 nodes, three rounds. A cache bounded by count
    # (the old LRU of 128) rebuilt every node every round; this one builds each once.
    cache = node_module.RuntimeCache(max_bytes=300 * 1000)
    for _ in range(3):
        for node in range(300):
            cache.get((node,), lambda: _Sized(1000))
    assert cache.built == 300 and len(cache) == 300


def test_runtime_cache_drops_least_recently_used_past_its_bound() -> None:
    cache = node_module.RuntimeCache(max_bytes=10_000)
    for node in range(20):
        cache.get((node,), lambda: _Sized(1000))
    assert len(cache) == 10 and cache.total_bytes == 10_000
    cache.get((10,), lambda: _Sized(1000))  # still there: no rebuild
    assert cache.built == 20
    cache.get((0,), lambda: _Sized(1000))  # dropped long ago: rebuilt, evicting node 11
    assert cache.built == 21 and cache.total_bytes == 10_000
    cache.get((11,), lambda: _Sized(1000))
    assert cache.built == 22
    # one runtime larger than the bound is still kept (the node in flight needs it)
    cache.get(("big",), lambda: _Sized(50_000))
    assert len(cache) == 1 and cache.total_bytes == 50_000
