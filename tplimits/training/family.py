"""An architecture lowered once, with how to build it at any width: what instantiation, the coordinate
check and the limits share."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from torch import nn

from tplimits.core.frontend import Architecture, ArchitectureLike, ExampleInputs, lower_architecture
from tplimits.core.program import Program
from tplimits.errors import TplimitsError
from tplimits.optimizers.base import UpdateRule


@attrs.frozen
class Family:
    """An architecture lowered once: its program, how to build it at any width, and the non-gradient
    rules (``{parameter pattern: UpdateRule}``) its architecture assigns."""

    program: Program
    build: Callable[[int], nn.Module] | None
    module: nn.Module | None = None
    update_rules: Mapping[str, UpdateRule] = attrs.field(factory=dict)

    def model(self, width: int, seed: int) -> nn.Module:
        """The architecture at ``width``, built with torch's global seed ``seed`` (restored afterwards)."""
        if self.build is None:
            if self.program.width != width:
                raise TplimitsError(f"the module given has width {self.program.width}, not {width}; pass a "
                                    "registered architecture or a callable `width -> nn.Module` to build other widths")
            return self.module
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return self.build(width)


def lower_family(arch: ArchitectureLike, rules: Mapping[Any, Callable], example_inputs: ExampleInputs = None,
                 base: nn.Module | None = None, update_rules: Mapping[str, UpdateRule] | None = None,
                 **config: Any) -> Family:
    """Lower ``arch`` (an :class:`Architecture`, a callable ``width -> nn.Module`` or a module with ``base=``)
    with the lowering ``rules`` once, and keep how to build it at other widths."""
    config.pop("width", None)
    program = lower_architecture(arch, rules, example_inputs, base, **config)
    update_rules = dict(update_rules or {})
    if isinstance(arch, nn.Module):
        return Family(program, None, arch, update_rules=update_rules)
    if isinstance(arch, Architecture):
        return Family(program, functools.partial(arch.build, **config), update_rules=update_rules)
    return Family(program, functools.partial(arch, **config), update_rules=update_rules)
