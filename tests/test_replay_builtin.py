"""Replaying the lowered program with a model's own parameters reproduces the model (float64, 1e-10).

Expected values come from the torch model itself. Each family is lowered once per config and
replayed at a traced width and at widths that were never traced.
"""

from __future__ import annotations

import pytest
import torch

import tplimits as tpl
from tests.conftest import assert_close_tree

CONFIGS = [
    ("mlp", {}),
    ("mlp", {"depth": 1, "activation": "relu"}),
    ("mlp", {"depth": 2, "activation": "gelu", "bias": False, "d_out": 3}),
    ("mlp", {"depth": 3, "activation": "silu", "d_in": 5}),
    ("mlp", {"depth": 2, "activation": "softplus"}),
    ("mlp", {"depth": 2, "activation": "sigmoid"}),
    ("decorrelated-mlp", {}),
    ("decorrelated-mlp", {"depth": 2, "activation": "relu", "bias": False}),
    ("resnet", {}),
    ("resnet", {"stages": 3, "blocks": 2}),
    ("resnet", {"stages": 1, "blocks": 1, "image_size": 6, "num_classes": 3}),
    ("transformer", {}),
    ("transformer", {"tied": True}),
    ("transformer", {"attention": "explicit"}),
    ("transformer", {"attention": "explicit", "tied": True, "n_heads": 2, "n_layers": 1}),
    ("transformer", {"n_heads": 1, "n_layers": 3}),
]


@pytest.mark.parametrize("name,config", CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_replay_reproduces_builtin(name, config):
    arch = tpl.architecture(name)
    prog = tpl.lower(name, **config)
    inputs = arch.example_inputs(**config)
    small = arch.trace_widths[0]
    for width in (small, small * 3 // 2, small * 3):
        torch.manual_seed(width)
        model = arch.build(width, **config)
        assert_close_tree(prog.replay(model, *inputs), model(*inputs))


def test_replay_on_other_inputs():
    """The program is not specialised to the example inputs' values."""
    prog = tpl.lower("transformer")
    model = tpl.architecture("transformer").build(48)
    other = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(7))
    assert_close_tree(prog.replay(model, other), model(other))


def test_replay_follows_parameter_changes():
    """Replay reads the model's current parameters (nothing is cached from the trace)."""
    arch = tpl.architecture("mlp")
    prog = tpl.lower("mlp")
    model = arch.build(40)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    (x,) = arch.example_inputs()
    assert_close_tree(prog.replay(model, x), model(x))


def test_replay_rejects_other_architecture():
    prog = tpl.lower("mlp", d_in=16)
    model = tpl.architecture("mlp").build(32, d_in=5)
    with pytest.raises(tpl.TplimitsError, match="layers.0.weight"):
        prog.replay(model, torch.randn(8, 5))
