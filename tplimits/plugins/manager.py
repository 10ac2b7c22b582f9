"""The one plugin manager: loads entry points of group ``tplimits`` and merges hook answers."""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
from typing import Any

import pluggy

from tplimits.errors import PluginError
from tplimits.plugins.specs import PROJECT, Architecture, TplimitsSpec


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every installed entry point loaded."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(TplimitsSpec)
    pm.load_setuptools_entrypoints(PROJECT)
    return pm


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin (a module or object with ``@hookimpl`` functions) at run time."""
    registered = plugin_manager().register(plugin, name=name)
    if registered is None:
        raise PluginError(f"plugin {name or plugin!r} is blocked or already registered")
    return registered


def unregister_plugin(plugin: object | None = None, name: str | None = None) -> None:
    """Remove a plugin registered with :func:`register_plugin`."""
    plugin_manager().unregister(plugin=plugin, name=name)


def registered(hook: str, kind: type | None = None) -> dict[str, Any]:
    """Every value the plugins return from ``hook``, by its ``name``; a later registration wins."""
    found: dict[str, Any] = {}
    # pluggy calls the most recently registered plugin first; iterate oldest first so later wins.
    for answer in reversed(getattr(plugin_manager().hook, hook)()):
        for value in answer:
            if kind is not None and not isinstance(value, kind):
                raise PluginError(f"a {hook} hook returned {value!r}; expected {kind.__module__}.{kind.__qualname__}")
            found[value.name] = value
    return found


def lookup(registry: dict[str, Any], name: str, what: str, hook: str) -> Any:
    """``registry[name]``, or an error listing the known names and the hook that adds one."""
    if name not in registry:
        raise PluginError(f"no {what} named {name!r} is registered; known: {sorted(registry)}. "
                          f"Register one with a plugin implementing `{hook}`.")
    return registry[name]


def architectures() -> dict[str, Architecture]:
    """Every registered architecture, by name."""
    return registered("tplimits_architectures", Architecture)


def architecture(name: str) -> Architecture:
    """The registered architecture ``name``; a clear error listing the known names otherwise."""
    return lookup(architectures(), name, "architecture", "tplimits_architectures")


def parametrizations() -> dict[str, Any]:
    """Every registered parametrization, by name."""
    return registered("tplimits_parametrizations")


def parametrization(name: Any) -> Any:
    """A parametrization by name (``"muP"``, ``"UP_0.3"``, …); a Parametrization passes through."""
    if not isinstance(name, str):
        return name
    known = parametrizations()
    if name in known:
        return known[name]
    if name.startswith("UP_"):
        from tplimits.core.parametrize import uniform

        return uniform(name[3:])
    raise PluginError(f"no parametrization named {name!r} is registered; known: {sorted(known)} and UP_s for any "
                      "s in [0, 1/2]. Register one with a plugin implementing `tplimits_parametrizations`.")


def losses() -> dict[str, Any]:
    """Every registered loss, by name."""
    return registered("tplimits_losses")


def loss(name: Any) -> Any:
    """A loss by name (``"mse"``, ``"cross_entropy"``); a Loss object passes through."""
    if not isinstance(name, str):
        return name
    return lookup(losses(), name, "loss", "tplimits_losses")


def lowering_rules() -> dict[Any, Callable]:
    """Every registered lowering rule, keyed by op; later registrations override earlier ones."""
    rules: dict[Any, Callable] = {}
    for answer in reversed(plugin_manager().hook.tplimits_lowering_rules()):
        rules.update(answer)
    return rules


class _RegistryPackage(types.ModuleType):
    """A package that is also the function listing what is registered under its name.

    ``tpl.architectures()`` must keep working after ``tplimits.architectures.mlp`` is imported,
    which binds the name ``architectures`` on ``tplimits`` to the subpackage.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _REGISTRY_FUNCTIONS[self.__name__](*args, **kwargs)


_REGISTRY_FUNCTIONS: dict[str, Callable[..., Any]] = {}


def make_package_callable(package: str, function: Callable[..., Any]) -> None:
    """Make the already-imported ``package`` callable as ``function``."""
    _REGISTRY_FUNCTIONS[package] = function
    sys.modules[package].__class__ = _RegistryPackage
