"""The plugin registry: pluggy hook specifications (:mod:`~tplimits.registry.specs`) and the plugin
manager that loads the ``tplimits`` entry points, checks each plugin's answers and resolves names
(:mod:`~tplimits.registry.manager`). Plugin authors import :mod:`tplimits.plugin`."""
