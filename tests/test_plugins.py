"""The plugin system: third-party architectures and op lowerings register through the same hooks
as the built-ins, and the core imports no built-in plugin by name."""

from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import types

import pytest
import torch
import torch.nn as nn

import tplimits as tpl
from tests.conftest import assert_close_tree
from tplimits.plugin import coordinatewise


@torch.library.custom_op("tplimits_test::scaled_tanh", mutates_args=())
def scaled_tanh(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.tanh(x) * scale


@scaled_tanh.register_fake
def _(x, scale):
    return torch.empty_like(x)


class CustomOpNet(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.inp = nn.Linear(5, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        return self.out(scaled_tanh(self.hidden(scaled_tanh(self.inp(x), 2.0)), 0.5))


def _plugin():
    plugin = types.ModuleType("third_party_plugin")

    @tpl.hookimpl
    def tplimits_architectures():
        return [tpl.Architecture("custom-op-net", build=lambda width, **_: CustomOpNet(width),
                                 example_inputs=lambda **_: (torch.randn(3, 5, generator=torch.Generator()
                                                                         .manual_seed(0)),),
                                 trace_widths=(16, 32), defaults={})]

    @tpl.hookimpl
    def tplimits_lowering_rules():
        return {torch.ops.tplimits_test.scaled_tanh.default: coordinatewise}

    plugin.tplimits_architectures = tplimits_architectures
    plugin.tplimits_lowering_rules = tplimits_lowering_rules
    return plugin


@pytest.fixture
def third_party():
    plugin = _plugin()
    tpl.register_plugin(plugin, name="third-party")
    yield plugin
    tpl.unregister_plugin(plugin)


def test_unknown_op_before_plugin():
    assert "custom-op-net" not in tpl.list_architectures()
    with pytest.raises(tpl.UnsupportedOperation, match="tplimits_test.scaled_tanh"):
        tpl.lower(CustomOpNet, example_inputs=(torch.randn(3, 5),), width=16)


def test_third_party_architecture_and_lowering(third_party):
    assert "custom-op-net" in tpl.list_architectures()
    prog = tpl.lower("custom-op-net")
    assert any("scaled_tanh" in ins.describe() for ins in prog)
    arch = tpl.architecture("custom-op-net")
    (x,) = arch.example_inputs()
    for width in (16, 48):
        model = arch.build(width)
        assert_close_tree(prog.replay(model, x), model(x))
    assert prog.parameters["hidden.weight"].kind == "matrix"


def test_plugin_rule_overrides_builtin(third_party):
    calls = []

    def counting_gelu(ctx, node):
        calls.append(node.name)
        return coordinatewise(ctx, node)

    plugin = types.ModuleType("override_plugin")
    plugin.tplimits_lowering_rules = tpl.hookimpl(lambda: {torch.ops.aten.gelu: counting_gelu})
    tpl.register_plugin(plugin, name="override")
    try:
        tpl.lower("mlp", activation="gelu", depth=2)
    finally:
        tpl.unregister_plugin(plugin)
    assert calls == ["gelu", "gelu_1"] * 2  # both gelu nodes, lowered at the inputs' batch size and at another


def test_builtins_come_from_entry_points():
    group = importlib.metadata.entry_points(group="tplimits")
    modules = {ep.value for ep in group}
    assert {"tplimits.architectures.mlp", "tplimits.ops.linalg", "tplimits.ops.shape"} <= modules
    registered = {name for name, _ in tpl.plugin_manager().list_name_plugin()}
    assert {ep.name for ep in group} <= registered


def test_core_imports_no_builtin_plugin():
    """The core reaches built-ins only through the plugin manager, never by importing a plugin module."""
    core = pathlib.Path(tpl.__file__).parent / "core"
    forbidden = tuple({ep.value for ep in importlib.metadata.entry_points(group="tplimits")})
    assert "tplimits.ops.linalg" in forbidden
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name not in forbidden and not name.startswith("tplimits.ops"), f"{path.name} imports {name}"


def test_unknown_architecture_lists_known():
    with pytest.raises(tpl.PluginError, match="mlp"):
        tpl.architecture("no-such-net")
