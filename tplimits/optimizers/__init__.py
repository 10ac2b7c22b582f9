"""Optimizers as update rules: the entrywise update functions ``Q_t`` of Tensor Programs IVb (Sec. 2.1).

An optimizer plugin returns :class:`UpdateRule` values from the ``tplimits_optimizers`` hook; the
same rule drives the finite-width :class:`TplimitsOptimizer` and the limit engines. Built-in rules,
each a plugin module registered through the ``tplimits`` entry-point group (the same way a
third-party plugin registers):

* ``sgd``, ``momentum`` (:mod:`tplimits.optimizers.sgd`);
* ``signsgd``, ``lion`` (:mod:`tplimits.optimizers.sign`);
* ``adam``, ``adamw``, ``rmsprop``, ``adagrad``, ``adamax`` (:mod:`tplimits.optimizers.adaptive`);
* ``decorrelation`` (:mod:`tplimits.optimizers.decorrelation`), a non-gradient rule for
  decorrelation matrices, driven by layer inputs.

This package deliberately imports none of them; they are loaded by the plugin manager.
``tpl.optimizers()`` lists every registered rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tplimits.optimizers.base import GROUP_OPTIONS, TplimitsOptimizer, UpdateRule, record_inputs
from tplimits.plugins.manager import lookup, make_package_callable, registered


def optimizers() -> dict[str, UpdateRule]:
    """Every registered update rule, by name; a later registration overrides an earlier one."""
    return registered("tplimits_optimizers", UpdateRule)


def optimizer(name: str) -> UpdateRule:
    """The registered update rule ``name``; a clear error listing the known names otherwise."""
    return lookup(optimizers(), name, "optimizer", "tplimits_optimizers")


def make_optimizer(rule: UpdateRule | str, params: Iterable[Any], *, lr: float, **options: Any) -> TplimitsOptimizer:
    """A :class:`TplimitsOptimizer` for ``rule`` (an :class:`UpdateRule` or a registered name).

    ``params`` are parameters or param groups; ``options`` are the group options
    (:data:`GROUP_OPTIONS`) and the rule's hyperparameters, e.g.
    ``make_optimizer("adam", model.parameters(), lr=1e-3, betas=(0.9, 0.99))``.
    """
    if isinstance(rule, str):
        rule = optimizer(rule)
    return TplimitsOptimizer(params, rule, lr=lr, **options)


make_package_callable(__name__, optimizers)

__all__ = [
    "GROUP_OPTIONS",
    "TplimitsOptimizer",
    "UpdateRule",
    "make_optimizer",
    "optimizer",
    "optimizers",
    "record_inputs",
]
