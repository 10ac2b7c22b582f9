"""An architecture lowered once, with how to build it at any width: what instantiation, the coordinate
check and the limits share."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils import _pytree as pytree

from tplimits.core.frontend import Architecture, ArchitectureLike, ExampleInputs, lower_pair, resolve
from tplimits.core.interpret import FiniteInterpreter
from tplimits.core.program import Program
from tplimits.errors import TplimitsError, WidthError
from tplimits.optimizers.base import UpdateRule


@attrs.frozen
class Family:
    """An architecture lowered once: its program, how to build it at any width, and the non-gradient
    rules (``{parameter pattern: UpdateRule}``) its architecture assigns."""

    program: Program
    build: Callable[[int], nn.Module] | None
    module: nn.Module | None = None
    update_rules: Mapping[str, UpdateRule] = attrs.field(factory=dict)
    inputs: tuple = ()  # the example inputs it was lowered with
    trace_widths: tuple[int, ...] = ()
    _verified: set = attrs.field(factory=set, eq=False, repr=False)

    def model(self, width: int, seed: int) -> nn.Module:
        """The architecture at ``width``, built with torch's global seed ``seed`` (restored afterwards), after
        checking (once per width) that it is the architecture the program was lowered from."""
        if self.build is None:
            if self.program.width != width:
                raise TplimitsError(f"the module given has width {self.program.width}, not {width}; pass a "
                                    "registered architecture or a callable `width -> nn.Module` to build other widths")
            return self.module
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = self.build(width)
        if width not in self._verified:
            self._check_width(model, width)
            self._verified.add(width)
        return model

    def _check_width(self, model: nn.Module, width: int) -> None:
        """The program lowered at the trace widths must be this model: the same parameters with the sizes
        its layouts give at ``width``, and the same outputs (when the model's forward is deterministic)."""
        where = f"the architecture at width {width} is not the one lowered at widths {self.trace_widths}"
        known = {name for info in self.program.parameters.values() for name in (info.name, *info.aliases)}
        known |= set(self.program.unused)
        # a frozen parameter is lowered as a buffer, so one the forward never reads is in neither list
        extra = sorted(name for name, p in model.named_parameters() if name not in known and p.requires_grad)
        if extra:
            raise WidthError(f"{where}: it has parameters {extra[:5]} the program does not (does the model branch "
                             "on its width?); lower it at widths that take the same branch")
        replayed = FiniteInterpreter.from_model(self.program, model)  # checks every parameter's sizes
        copy_ = copy.deepcopy(model)  # its forward may update buffers (batch norm)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
        inputs = pytree.tree_map(lambda t: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t,
                                 self.inputs)
        with torch.no_grad(), torch.random.fork_rng():
            first, second = copy_(*inputs), copy_(*inputs)
            got = replayed.run(*inputs)
        leaves = zip(pytree.tree_leaves(first), pytree.tree_leaves(second), pytree.tree_leaves(got), strict=False)
        for a, b, c in leaves:
            if torch.is_tensor(a) and torch.equal(a, b) and (a.shape != c.shape or not torch.allclose(
                    c, a, rtol=1e-4, atol=1e-4 * float(a.abs().max().clamp_min(1)))):
                raise WidthError(f"{where}: its outputs differ from the program's (does the model branch on its "
                                 "width?); lower it at widths that take the same branch")


def lower_family(arch: ArchitectureLike, rules: Mapping[Any, Callable], example_inputs: ExampleInputs = None,
                 base: nn.Module | None = None, update_rules: Mapping[str, UpdateRule] | None = None,
                 **config: Any) -> Family:
    """Lower ``arch`` (an :class:`Architecture`, a callable ``width -> nn.Module`` or a module with ``base=``)
    with the lowering ``rules`` once, and keep how to build it at other widths."""
    config.pop("width", None)
    pair = resolve(arch, example_inputs, base, **config)
    program = lower_pair(pair, rules)
    common = {"update_rules": dict(update_rules or {}), "inputs": pair.inputs, "trace_widths": (pair.n, pair.n_other)}
    if isinstance(arch, nn.Module):
        return Family(program, None, arch, **common)
    if isinstance(arch, Architecture):
        return Family(program, functools.partial(arch.build, **config), **common)
    return Family(program, functools.partial(arch, **config), **common)
