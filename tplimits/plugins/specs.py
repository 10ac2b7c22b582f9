"""Hook specifications and the value types that plugins hand to tplimits."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import pluggy

PROJECT = "tplimits"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@attrs.frozen
class Architecture:
    """A named model family that can be built at any width.

    ``build(width, **config)`` returns an ``nn.Module`` whose hidden sizes scale with ``width``;
    ``example_inputs(**config)`` returns a tuple of example inputs (their sizes must not depend
    on width). ``trace_widths`` are the two widths at which the family is traced to find its
    width axes; both must be valid widths for every config (e.g. divisible by the head count).
    """

    name: str
    build: Callable[..., Any]
    example_inputs: Callable[..., tuple]
    trace_widths: tuple[int, int] = (32, 64)
    defaults: Mapping[str, Any] = attrs.field(factory=dict)
    description: str = ""
    update_rules: Mapping[str, str] = attrs.field(factory=dict)


class TplimitsSpec:
    """The hooks. Each returns a collection; tplimits merges the answers of all plugins."""

    @hookspec
    def tplimits_architectures(self) -> Sequence[Architecture]:
        """Model families this plugin provides."""

    @hookspec
    def tplimits_lowering_rules(self) -> Mapping[Any, Callable]:
        """Lowering rules: a mapping from an op (an aten ``OpOverload`` or ``OpOverloadPacket``,
        or any other fx call target) to ``rule(ctx, node) -> Value | tuple[Value, ...]``.

        ``ctx`` is a :class:`tplimits.core.lower.LoweringContext`, ``node`` a
        :class:`tplimits.core.lower.OpNode`. A rule for an exact overload wins over a rule for
        its packet; among plugins, the one registered last wins, so a plugin can override a
        built-in rule.
        """

    @hookspec
    def tplimits_optimizers(self) -> Sequence[Any]:
        """Optimizer plugins: entrywise update functions with their state."""

    @hookspec
    def tplimits_parametrizations(self) -> Sequence[Any]:
        """Named abcd-parametrizations."""

    @hookspec
    def tplimits_losses(self) -> Sequence[Any]:
        """Losses and the error signals they induce."""
