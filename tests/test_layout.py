"""The layout is the pipeline: structural checks over the package's source.

* no import cycle among tplimits' modules, and no function-local import used to hide one;
* each layer imports only the layers below it (core knows no parametrization, optimizer or plugin);
* no module's class is swapped and no subpackage is shadowed by a function;
* core, training, limit and the registry hold no op, parametrization, optimizer, loss or architecture
  names: those facts are declared where ops are lowered and where plugins register.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import pathlib
import pkgutil
import types

import networkx as nx
import pytest
import torch

import tplimits as tpl
from tplimits.core.backprop import Pullback
from tplimits.optimizers import GROUP_OPTIONS

ROOT = pathlib.Path(tpl.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}
BUILTIN_PLUGINS = {ep.value for ep in importlib.metadata.entry_points(group="tplimits")}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The tplimits modules an import statement executes (a submodule named in ``from package import``
    counts as that submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "tplimits"]
    if not node.module or node.module.split(".")[0] != "tplimits":
        return []
    return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names]


def _imports(path: pathlib.Path) -> tuple[set[str], list[str]]:
    """(module-level tplimits imports, function- or class-local ones) of a source file."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    local: list[str] = []

    def visit(body: list[ast.stmt], nested: bool) -> None:
        for node in body:
            if _is_type_checking(node):
                continue
            if isinstance(node, ast.Import | ast.ImportFrom):
                (local.extend if nested else top.update)(_imported(node))
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt) and not isinstance(node, ast.If | ast.Try | ast.With):
                    visit([child], True)
                elif isinstance(child, ast.stmt):
                    visit([child], nested)

    visit(tree.body, False)
    return top, local


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for name, path in MODULES.items():
        g.add_node(name)
        for target in _imports(path)[0]:
            g.add_edge(name, target)
    return g


def test_no_import_cycle():
    cycles = list(nx.simple_cycles(_graph()))
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_no_function_local_import_of_the_package():
    found = {name: local for name, path in MODULES.items() if (local := _imports(path)[1])}
    assert not found, f"function-local imports of tplimits modules: {found}"


LAYERS = {
    "tplimits.core": {"tplimits.core", "tplimits.errors"},
    "tplimits.optimizers.base": {"tplimits.errors"},
    "tplimits.training": {"tplimits.core", "tplimits.training", "tplimits.optimizers.base", "tplimits.errors"},
    "tplimits.limit": {"tplimits.core", "tplimits.training", "tplimits.limit", "tplimits.optimizers.base",
                       "tplimits.registry", "tplimits.errors"},
    "tplimits.diagnostics": {"tplimits.core", "tplimits.training", "tplimits.optimizers.base", "tplimits.limit",
                             "tplimits.diagnostics", "tplimits.errors"},
    "tplimits.registry": {"tplimits.core", "tplimits.training", "tplimits.optimizers.base", "tplimits.registry",
                          "tplimits.errors"},
}


def _within(module: str, packages: set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_layer_imports_only_the_layers_below(layer):
    for name, path in MODULES.items():
        if _within(name, {layer}):
            outside = sorted(m for m in _imports(path)[0] if not _within(m, LAYERS[layer]))
            assert not outside, f"{name} imports {outside}"


def test_builtin_plugins_use_the_public_plugin_api():
    """A built-in plugin imports what it needs from tplimits.plugin (or a sibling), like a third party."""
    assert BUILTIN_PLUGINS and "tplimits.ops.linalg" in BUILTIN_PLUGINS
    for name in BUILTIN_PLUGINS:
        package = name.rpartition(".")[0]
        for target in _imports(MODULES[name])[0]:
            assert target == "tplimits.plugin" or target.rpartition(".")[0] == package, f"{name} imports {target}"


def test_no_module_class_swapped_and_no_subpackage_shadowed():
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "__class__" and isinstance(node.ctx, ast.Store):
                pytest.fail(f"{path} assigns a __class__")
    for info in pkgutil.walk_packages(tpl.__path__, "tplimits."):
        importlib.import_module(info.name)
    for name in MODULES:
        parent, _, child = name.rpartition(".")
        if parent:
            bound = getattr(importlib.import_module(parent), child)
            assert isinstance(bound, types.ModuleType), f"{parent}.{child} is a {type(bound).__name__}, not the module"


# The framework's own vocabulary that happens to spell an op: optimizer group options (``clip``) and
# matplotlib's axis scale ("log"). Loss names are left out: a public method may default to one.
OWN_WORDS = {*GROUP_OPTIONS, "log"}


def _registered_names() -> set[str]:
    names = set(tpl.list_parametrizations()) | set(tpl.list_optimizers()) | set(tpl.list_architectures())
    for op in tpl.lowering_rules():
        packet = getattr(op, "_overloadpacket", op)
        names.add(getattr(packet, "__name__", str(packet)).split(".")[-1])
    return names - OWN_WORDS


def _code_strings(path: pathlib.Path) -> list[tuple[int, str]]:
    """String constants of a module that are not docstrings or pieces of an f-string message."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value,
                                                                                            ast.Constant):
            skipped.add(id(body[0].value))
        if isinstance(node, ast.JoinedStr):
            skipped.update(id(v) for v in node.values)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped]


@pytest.mark.parametrize("package", ["core", "training", "limit", "registry", "diagnostics"])
def test_no_op_or_plugin_names_outside_the_plugins(package):
    """Facts about ops (smooth, which argument is a scale) and predictions of parametrizations are declared
    where they are registered; the framework never recognizes an op or a plugin by its name."""
    names = _registered_names()
    assert {"relu", "softmax", "scaled_dot_product_attention", "muP", "NTP", "adam", "decorrelation"} <= names
    for path in sorted((ROOT / package).rglob("*.py")):
        found = [(line, value) for line, value in _code_strings(path) if value in names]
        assert not found, f"{path.relative_to(ROOT)} names {found}"


def test_autograd_dots_are_accepted_for_attention():
    """Softmax is smooth (declared by the attention rule); the causal transformer gets autograd dots."""
    limit = tpl.derive("transformer", optimizer="sgd", n_layers=1, n_heads=2, vocab=5, seq_len=3, batch=1)
    (ids,) = tpl.architecture("transformer").example_inputs(vocab=5, seq_len=3, batch=1)
    setup = limit.setup(ids)
    kinked = [ins for ins in setup.program if isinstance(ins, tpl.Nonlin) and not ins.smooth]
    softmax = [ins for ins in setup.program if isinstance(ins, tpl.Nonlin) and "softmax" in ins.describe()]
    assert softmax and not any(ins in kinked for ins in softmax)
    assert limit._resolve_dots("autograd", setup) == "autograd"


def test_kinks_are_declared_by_the_rule():
    """relu's rule declares the kink; its pullback in the backward program inherits it; tanh is smooth."""
    relu_op = torch.ops.aten.relu.default
    prog = tpl.lower("mlp", depth=2, activation="relu")
    relu = [ins for ins in prog if isinstance(ins, tpl.Nonlin) and ins.fn is relu_op]
    assert relu and all(not ins.smooth for ins in relu)
    assert all(ins.smooth for ins in prog if isinstance(ins, tpl.Nonlin) and ins.fn is not relu_op)
    backward = tpl.total_program(prog).program
    pullbacks = [ins for ins in backward if isinstance(ins, tpl.Nonlin) and isinstance(ins.fn, Pullback)
                 and ins.fn.fn is relu_op]
    assert pullbacks and all(not ins.smooth for ins in pullbacks)
    smooth = tpl.total_program(tpl.lower("mlp", depth=2, activation="tanh")).program
    assert all(ins.smooth for ins in smooth if isinstance(ins, tpl.Nonlin))
