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
``tpl.list_optimizers()`` lists every registered rule, ``tpl.make_optimizer(name, params, lr=...)``
builds the finite-width optimizer of one.
"""

from __future__ import annotations

from tplimits.optimizers.base import (
    GROUP_OPTIONS,
    DenseAction,
    MatrixAction,
    TplimitsOptimizer,
    UpdateRule,
    apply_rule,
    record_inputs,
)

__all__ = [
    "GROUP_OPTIONS",
    "DenseAction",
    "MatrixAction",
    "TplimitsOptimizer",
    "UpdateRule",
    "apply_rule",
    "record_inputs",
]
