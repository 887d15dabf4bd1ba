"""`share`: only the named groups are mixed and sent; the rest never leave the node."""

import numpy as np
import pytest

from flower_p2p.config import ExperimentConfig
from flower_p2p.models import param_group
from flower_p2p.node import NodeRuntime, algorithm_for, run_round
from flower_p2p.registry import ConfigError
from flower_p2p.server_app import preflight


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("head.weight", "head"),
        ("blocks.3.attn.qkv.weight", "attn"),
        ("base_model.model.blocks.0.attn.qkv.lora_A.default.weight", "attn"),
        ("base_model.model.head.modules_to_save.default.bias", "head"),
        ("layers.1.blocks.0.mlp.fc2.bias", "mlp"),
        ("blocks.0.norm1.weight", "norm"),
        ("norm.bias", "norm"),
        ("patch_embed.proj.weight", "embed"),
        ("cls_token", "embed"),
    ],
)
def test_parameter_groups(name, group):
    assert param_group(name) == group


def test_only_shared_groups_are_sent_and_mixed():
    cfg = ExperimentConfig(num_nodes=2, depth=1, share="head,norm", local_steps=1)
    rt = NodeRuntime(cfg, 0)
    algo = algorithm_for(cfg)
    assert rt.shared and all(param_group(n) in ("head", "norm") for n in rt.shared)
    first = run_round(rt, algo, None, None, None, {}, {0: 0.5, 1: 0.5}, 1, False)
    assert set(first.message) == set(rt.shared)
    # a neighbour's message moves only the shared groups
    neighbour = {k: v + 1.0 for k, v in first.message.items()}
    second = run_round(rt, algo, first.params, first.state, first.optimizer, {1: neighbour},
                       {0: 0.5, 1: 0.5}, 2, False, train=False)  # fmt: skip
    for k, v in second.params.items():
        if k in rt.shared:
            np.testing.assert_allclose(v, first.params[k] + 0.5, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(v, first.params[k])


def test_share_naming_no_trainable_group_is_refused_before_training():
    with pytest.raises(ConfigError, match=r"share='attn' .*finetune=head: head"):
        preflight(ExperimentConfig(finetune="head", share="attn", depth=1))
    with pytest.raises(ConfigError, match=r"share='heads' .*all, head, attn"):
        ExperimentConfig.from_run_config({"share": "heads"})
