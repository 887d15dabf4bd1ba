"""The memory estimate: what algorithms keep and send, activations, the refusal before training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flower_p2p.config import ExperimentConfig
from flower_p2p.memory import GIB, activation_bytes, check_fits, optimizer_slots
from flower_p2p.registry import ConfigError
from flower_p2p.server_app import preflight
from strategies import DSGD, KGT, Choco, GradientTracking, QGDSGDm, RelaySum
from strategies.footprint import footprint, star_weights

SIZE = 1024  # footprint's model: large enough that scalars (counts, weights) round away


def _fp(make, degree: int):
    fp = footprint(make, degree, size=SIZE)
    return round(fp.state, 2), round(fp.sent, 2), round(fp.received, 2)


@pytest.mark.parametrize("degree", [1, 2, 5])
def test_footprint_of_algorithms_with_known_sizes(degree: int) -> None:
    # DSGD keeps nothing, sends its model once, hears one model per neighbour
    assert _fp(lambda n: DSGD(), degree) == (0.0, 1.0, degree)
    # gradient tracking sends model and tracker; K-GT the same
    assert _fp(lambda n: GradientTracking(), degree)[1:] == (2.0, 2.0 * degree)
    assert _fp(lambda n: KGT(), degree)[1:] == (2.0, 2.0 * degree)
    # RelaySum sends each neighbour its own message: degree models out, degree in
    state, sent, received = _fp(lambda n: RelaySum(num_nodes=n), degree)
    assert (sent, received) == (degree, degree)
    # CHOCO without compression keeps a copy of every neighbour's public model, and its own
    state, sent, received = _fp(lambda n: Choco(gamma=1.0, compressor="none",
                                                compress_fraction=1.0, seed=0), degree)  # fmt: skip
    assert state >= degree + 1 and (sent, received) == (1.0, degree)
    # top-k sends a tenth of the values with their indices: less than the model
    assert _fp(lambda n: Choco(gamma=0.1, compressor="top-k", compress_fraction=0.1,
                               seed=0), degree)[1] < 0.5  # fmt: skip
    # QG-DSGDm keeps a momentum buffer and the previous model
    assert _fp(lambda n: QGDSGDm(momentum=0.9), degree)[0] >= 1.0


def test_star_weights_are_doubly_stochastic() -> None:
    w = star_weights(4)
    assert w.shape == (5, 5) and (w >= 0).all()
    assert torch.allclose(torch.tensor(w.sum(0)), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(torch.tensor(w.sum(1)), torch.ones(5, dtype=torch.float64))


def test_activation_bytes_counts_what_backward_keeps_once() -> None:
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    # linear 1 keeps its input (4 x 10) for its weight's gradient; ReLU keeps its output (4 x 20),
    # the tensor linear 2 keeps as its input: held once. Weights are parameters, not activations.
    assert activation_bytes(model, 4, (10,)) == 4 * (4 * 10 + 4 * 20)
    for p in model.parameters():
        p.requires_grad_(False)
    assert activation_bytes(model, 4, (10,)) == 0  # nothing trains: no graph, nothing kept


def test_optimizer_slots() -> None:
    assert optimizer_slots(ExperimentConfig()) == 2  # AdamW's two moments
    assert optimizer_slots(ExperimentConfig(optimizer="sgd", momentum=0.9)) == 1
    assert optimizer_slots(ExperimentConfig(optimizer="sgd", momentum=0.0)) == 0
    # QG-DSGDm's momentum lives in the algorithm's state, SGD keeps none
    assert optimizer_slots(ExperimentConfig(optimizer="sgd", strategy="qg-dsgdm")) == 0


def test_estimate_counts_each_node_state_in_the_driver() -> None:
    cfg = ExperimentConfig(depth=1, memory_limit_gb=1000)
    small = preflight(cfg).memory
    big = preflight(cfg.replace(num_nodes=16)).memory
    trainable = small.model / 2  # parameters + gradients, everything trains
    # AdamW (2 moments) + the parameters themselves, DSGD keeps no state of its own
    assert small.node_state == pytest.approx(3 * trainable, rel=1e-6)
    assert small.message == pytest.approx(trainable, rel=1e-6)
    per_node = (big.driver - small.driver) / 8
    assert per_node == pytest.approx(small.node_state + small.message, rel=1e-6)
    kgt = preflight(cfg.replace(strategy="k-gt")).memory
    assert kgt.node_state > small.node_state + 2.9 * trainable  # tracker, correction, previous


def test_run_that_cannot_fit_is_refused_before_training_with_the_estimate() -> None:
    # the case: full fine-tuning of Swin-T (27.5 M parameters) on 9 nodes
    cfg = ExperimentConfig(model="swin_tiny_patch4_window7_224", img_size=0, patch_size=0,
                           depth=0, window_size=7, num_nodes=9, batch_size=8,
                           memory_limit_gb=6)  # fmt: skip
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    text = str(err.value)
    assert text.startswith("num-nodes=9 is not allowed: a run that fits in memory")
    assert "9 nodes x" in text and "memory-limit-gb is 6.00 GiB" in text
    assert "finetune=head, last-k or lora" in text
    need = float(text.split("about ")[1].split(" GiB")[0])
    # 9 x (27.5 M x 4 B x (1 + 2 AdamW) + a 110 MB message) in the driver, at the least
    assert need > 9 * 27.5e6 * 4 * 4 / GIB
    head = preflight(cfg.replace(finetune="head", memory_limit_gb=6)).memory
    assert head.total < 6 * GIB  # the hint works: head-only fits


def test_check_fits_against_the_machine_and_a_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from flower_p2p import memory

    need = preflight(ExperimentConfig(depth=1, memory_limit_gb=1000)).memory
    cfg = ExperimentConfig(depth=1)
    check_fits(cfg, need, limit=need.total)
    with pytest.raises(ConfigError, match="this machine has .* available"):
        check_fits(cfg, need, limit=need.total - 1)
    with pytest.raises(ConfigError, match="memory-limit-gb is 512 MiB"):
        check_fits(cfg.replace(memory_limit_gb=0.5), need)
    # inside the ServerApp the run's processes already hold their base memory: not twice
    bases = memory.BASE_RAY + memory.BASE_DRIVER + need.actors * memory.BASE_ACTOR
    monkeypatch.setattr(memory, "available_bytes", lambda: need.total - bases)
    with pytest.raises(ConfigError):
        check_fits(cfg, need)
    check_fits(cfg, need, started=True)


@pytest.mark.parametrize("bad", [-1.0, math.nan])
def test_memory_limit_must_be_a_size(bad: float) -> None:
    with pytest.raises(ConfigError, match="memory-limit-gb"):
        ExperimentConfig.from_run_config({"memory-limit-gb": bad})
