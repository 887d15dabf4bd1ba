"""What a node keeps between rounds survives Flower's records exactly."""

import pytest
import torch

from flower_p2p.config import ExperimentConfig
from flower_p2p.models import apply_finetune, create_model
from flower_p2p.training import load_optimizer_state, make_optimizer, optimizer_state, train_epochs
from flower_p2p.wire import from_record, to_record


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_state_round_trips_through_an_array_record(name):
    cfg = ExperimentConfig(depth=1)
    model, _ = apply_finetune(create_model(cfg, 10), cfg)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))

    def steps(opt):
        gen = torch.Generator().manual_seed(0)
        train_epochs(model, x, y, opt, 1, 32, gen, torch.device("cpu"), steps=2)

    opt = make_optimizer(model, name, 1e-3, 0.05)
    steps(opt)
    restored = make_optimizer(model, name, 1e-3, 0.05)
    load_optimizer_state(restored, from_record(to_record(optimizer_state(opt))))
    before, after = opt.state_dict()["state"], restored.state_dict()["state"]
    assert before.keys() == after.keys() and len(before) > 0
    for idx, entries in before.items():
        for key, value in entries.items():
            assert torch.equal(after[idx][key], value), (idx, key)  # shapes included (Adam step)
    # The restored optimizer takes exactly the step the original would.
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps(opt)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    steps(restored)
    for n, p in model.named_parameters():
        assert torch.equal(p, expected[n]), n


def test_a_message_equal_to_the_kept_model_reuses_its_packed_arrays():
    params = {"a": torch.randn(3).numpy(), "b": torch.randn(2).numpy()}
    kept = to_record(params)
    out = to_record({"a": params["a"], "b": params["b"].copy()}, reuse=(params, kept))
    assert out["a"] is kept["a"] and out["b"] is not kept["b"]
    assert from_record(out).keys() == params.keys()
