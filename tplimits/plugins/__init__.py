"""The plugin system: pluggy hook specifications, the plugin manager, entry-point loading.

Every built-in architecture and op lowering registers through these hooks, exactly as a
third-party package would (entry-point group ``tplimits``)::

    # mypkg/plugin.py
    import tplimits as tpl

    @tpl.hookimpl
    def tplimits_architectures():
        return [tpl.Architecture("my-net", build=build, example_inputs=inputs)]

and in ``pyproject.toml``::

    [project.entry-points.tplimits]
    my_net = "mypkg.plugin"

A plugin can also be registered at run time with ``tpl.register_plugin(module_or_object)``.
"""

from tplimits.plugins.manager import (
    architecture,
    architectures,
    loss,
    losses,
    lowering_rules,
    parametrization,
    parametrizations,
    plugin_manager,
    register_plugin,
    unregister_plugin,
)
from tplimits.plugins.specs import Architecture, hookimpl, hookspec

__all__ = [
    "Architecture",
    "architecture",
    "architectures",
    "hookimpl",
    "hookspec",
    "loss",
    "losses",
    "lowering_rules",
    "parametrization",
    "parametrizations",
    "plugin_manager",
    "register_plugin",
    "unregister_plugin",
]
