"""The one plugin manager: loads the entry points of group ``tplimits``, checks what every plugin
answers, and resolves names to the objects the pipeline works with."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import pluggy

from tplimits.core.frontend import Architecture
from tplimits.errors import PluginError
from tplimits.optimizers.base import UpdateRule
from tplimits.registry.specs import ANSWER_TYPES, PROJECT, TplimitsSpec
from tplimits.training.loss import Loss, as_loss
from tplimits.training.parametrize import Parametrization, ParametrizationFamily

T = TypeVar("T")

MISSING_BUILTINS = (
    "tplimits' built-in plugins register through the entry-point group 'tplimits' of its package metadata, and "
    "none was found: install the package (`pip install -e .` in a checkout, or `pip install tplimits`) instead "
    "of importing it from a source tree"
)


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every installed entry point loaded and checked."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(TplimitsSpec)
    pm.load_setuptools_entrypoints(PROJECT)
    for name, plugin in pm.list_name_plugin():
        _check_plugin(pm, plugin, name)
    return pm


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin (a module or object with ``@hookimpl`` functions) at run time. Every hook it
    implements is called once and its answer checked; a malformed plugin is refused by name."""
    pm = plugin_manager()
    registered = pm.register(plugin, name=name)
    if registered is None:
        raise PluginError(f"plugin {name or plugin!r} is blocked or already registered")
    try:
        _check_plugin(pm, plugin, registered)
    except PluginError:
        pm.unregister(plugin)
        raise
    return registered


def unregister_plugin(plugin: object | None = None, name: str | None = None) -> None:
    """Remove a plugin registered with :func:`register_plugin`."""
    plugin_manager().unregister(plugin=plugin, name=name)


def _check_plugin(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    for caller in pm.get_hookcallers(plugin) or ():
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin:
                _check_answer(caller.name, impl.function(), name)


def _check_answer(hook: str, answer: Any, plugin: str) -> None:
    where = f"plugin {plugin!r}: its {hook} hook"
    if hook == "tplimits_lowering_rules":
        if not isinstance(answer, Mapping):
            raise PluginError(f"{where} returned {type(answer).__name__}; expected a mapping op -> rule(ctx, node)")
        bad = [op for op, rule in answer.items() if not callable(rule)]
        if bad:
            raise PluginError(f"{where} maps {bad[0]!r} to a {type(answer[bad[0]]).__name__}, not a callable rule")
        return
    kinds = ANSWER_TYPES[hook]
    if isinstance(answer, str | bytes | Mapping) or not hasattr(answer, "__iter__"):
        raise PluginError(f"{where} returned {type(answer).__name__}; expected a list of "
                          f"{' or '.join(k.__name__ for k in kinds)}")
    for value in answer:
        if not isinstance(value, kinds):
            raise PluginError(f"{where} returned {value!r}; expected {' or '.join(k.__qualname__ for k in kinds)}")


def _registered(hook: str) -> dict[str, Any]:
    """Every value the plugins return from ``hook``, by its ``name``; a later registration wins."""
    found: dict[str, Any] = {}
    # pluggy calls the most recently registered plugin first; iterate oldest first so later wins.
    for answer in reversed(getattr(plugin_manager().hook, hook)()):
        for value in answer:
            found[value.name] = value
    return found


def _lookup(registry: Mapping[str, T], name: str, what: str, hook: str) -> T:
    """``registry[name]``, or an error listing the known names and the hook that adds one."""
    if name in registry:
        return registry[name]
    if not registry:
        raise PluginError(f"no {what} named {name!r}: no {what} is registered at all. {MISSING_BUILTINS}.")
    raise PluginError(f"no {what} named {name!r} is registered; known: {sorted(registry)}. "
                      f"Register one with a plugin implementing `{hook}`.")


def list_architectures() -> dict[str, Architecture]:
    """Every registered architecture, by name."""
    return _registered("tplimits_architectures")


def architecture(name: str) -> Architecture:
    """The registered architecture ``name``; a clear error listing the known names otherwise."""
    return _lookup(list_architectures(), name, "architecture", "tplimits_architectures")


def list_optimizers() -> dict[str, UpdateRule]:
    """Every registered update rule, by name; a later registration overrides an earlier one."""
    return _registered("tplimits_optimizers")


def optimizer(name: str | UpdateRule) -> UpdateRule:
    """The registered update rule ``name`` (an :class:`UpdateRule` passes through)."""
    if isinstance(name, UpdateRule):
        return name
    if not isinstance(name, str):
        raise PluginError(f"optimizer must be a registered name or an UpdateRule, got {type(name).__name__}")
    return _lookup(list_optimizers(), name, "optimizer", "tplimits_optimizers")


def list_parametrizations() -> dict[str, Parametrization | ParametrizationFamily]:
    """Every registered parametrization, by name (families such as ``UP_s`` are listed as ``UP_*``)."""
    return _registered("tplimits_parametrizations")


def parametrization(name: str | Parametrization) -> Parametrization:
    """A parametrization by name (``"muP"``, ``"UP_0.3"`` from the ``UP_`` family, …); a Parametrization
    passes through."""
    if isinstance(name, Parametrization):
        return name
    if not isinstance(name, str):
        raise PluginError(f"param must be a registered name or a Parametrization, got {type(name).__name__}")
    known = list_parametrizations()
    if isinstance(known.get(name), Parametrization):
        return known[name]
    for family in known.values():
        if isinstance(family, ParametrizationFamily):
            member = family.match(name)
            if member is not None:
                return member
    return _lookup({k: v for k, v in known.items() if isinstance(v, Parametrization)}, name, "parametrization",
                   "tplimits_parametrizations")


def list_losses() -> dict[str, Loss]:
    """Every registered loss, by name."""
    return _registered("tplimits_losses")


def loss(name: str | Loss | Callable) -> Loss:
    """A loss by name (``"mse"``, ``"cross_entropy"``); a Loss passes through and a plain callable
    ``fn(outputs, targets) -> scalar`` is wrapped as one."""
    if isinstance(name, str):
        return _lookup(list_losses(), name, "loss", "tplimits_losses")
    if callable(name):
        return as_loss(name)
    raise PluginError(f"loss must be a registered name, a Loss or a callable fn(outputs, targets), got "
                      f"{type(name).__name__}")


def lowering_rules() -> dict[Any, Callable]:
    """Every registered lowering rule, keyed by op; later registrations override earlier ones."""
    rules: dict[Any, Callable] = {}
    for answer in reversed(plugin_manager().hook.tplimits_lowering_rules()):
        rules.update(answer)
    if not rules:
        raise PluginError(f"no lowering rule is registered. {MISSING_BUILTINS}.")
    return rules
