"""Hook specifications: what a plugin may provide, and the type each hook's answer must have."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pluggy

from tplimits.core.frontend import Architecture
from tplimits.optimizers.base import UpdateRule
from tplimits.training.loss import Loss
from tplimits.training.parametrize import Parametrization, ParametrizationFamily

PROJECT = "tplimits"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

LoweringRule = Callable[..., Any]
"""``rule(ctx: LoweringContext, node: OpNode) -> Value | MatrixValue | tuple | None``."""


class TplimitsSpec:
    """The hooks. Each returns a collection; tplimits merges the answers of all plugins."""

    @hookspec
    def tplimits_architectures(self) -> Sequence[Architecture]:
        """Model families this plugin provides."""

    @hookspec
    def tplimits_lowering_rules(self) -> Mapping[Any, LoweringRule]:
        """Lowering rules: a mapping from an op (an aten ``OpOverload`` or ``OpOverloadPacket``,
        or any other fx call target) to ``rule(ctx, node) -> Value | tuple[Value, ...]``.

        ``ctx`` is a :class:`tplimits.plugin.LoweringContext`, ``node`` a :class:`tplimits.plugin.OpNode`.
        A rule for an exact overload wins over a rule for its packet; among plugins, the one registered
        last wins, so a plugin can override a built-in rule.
        """

    @hookspec
    def tplimits_optimizers(self) -> Sequence[UpdateRule]:
        """Optimizer plugins: entrywise update functions with their state, and non-gradient rules."""

    @hookspec
    def tplimits_parametrizations(self) -> Sequence[Parametrization | ParametrizationFamily]:
        """Named abcd-parametrizations, and families of them named by a prefix (``UP_s``)."""

    @hookspec
    def tplimits_losses(self) -> Sequence[Loss]:
        """Losses and the error signals they induce."""


ANSWER_TYPES: Mapping[str, tuple[type, ...]] = {
    "tplimits_architectures": (Architecture,),
    "tplimits_optimizers": (UpdateRule,),
    "tplimits_parametrizations": (Parametrization, ParametrizationFamily),
    "tplimits_losses": (Loss,),
}
"""The type of each element a hook's answer may hold (``tplimits_lowering_rules`` answers a mapping
to callables, checked separately)."""
