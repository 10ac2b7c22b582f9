"""Evaluating a Program on an assignment.

:class:`Interpreter` walks the instructions in order and calls one method per instruction type;
subclasses change what the instructions *mean* (finite-width tensors, Monte Carlo kets), never the
walk. :class:`FiniteInterpreter` is the finite-width assignment: a vector is a tensor with a width
axis of size ``ratio·n``, Avg is the mean over it, MatMul multiplies by the model's own dense
matrix. It must reproduce the torch model exactly, which is how the lowering is proven right.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree

from tplimits.core.ir import (
    Avg,
    Constant,
    Input,
    Instruction,
    MatMul,
    Nonlin,
    Parameter,
    Ref,
    Regroup,
    Width,
    common_scale,
    map_args,
    substitute,
)
from tplimits.core.pullback import PerCoordinateValue, deferrable, materialized
from tplimits.errors import TplimitsError

if TYPE_CHECKING:  # the Program replays itself with a FiniteInterpreter
    from tplimits.core.program import Program


class Interpreter:
    """Evaluates a :class:`Program`; subclasses define each instruction's meaning."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.values: dict[str, Any] = {}
        self.cotangents: tuple = ()  # error signals of the outputs, for total programs

    def run(self, *inputs: Any, initial_env: Mapping[str, Any] | None = None, stop: int | None = None) -> Any:
        """Evaluate the program on ``inputs``; returns the outputs in the model's output structure.

        As with ``torch.fx.Interpreter.run(initial_env=...)``, instructions whose value is already in
        ``initial_env`` are not evaluated again, and ``stop`` ends the walk before instruction ``stop``:
        a partial run (the forward half of a total program) leaves its values in :attr:`values`, and a
        second run with ``initial_env=interp.values`` continues where it stopped. The outputs are
        returned once every one of them has been computed, else ``None``.
        """
        self.values = dict(initial_env or {})
        self.flat_inputs = pytree.tree_leaves(inputs)
        for ins in self.program.instructions[:stop]:
            if ins.name not in self.values:
                self.values[ins.name] = self.execute(ins)
        if any(name not in self.values for name in self.program.outputs):
            return None
        outputs = [self.values[name] for name in self.program.outputs]
        if self.program.out_spec is not None:
            return pytree.tree_unflatten(outputs, self.program.out_spec)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def execute(self, ins: Instruction) -> Any:
        method = getattr(self, type(ins).__name__.lower(), None)
        if method is None:
            raise TplimitsError(f"{type(self).__name__} cannot evaluate {type(ins).__name__} instructions")
        return method(ins)

    def input(self, ins: Input) -> Any:
        index = ins.index
        if index >= len(self.flat_inputs):
            raise TplimitsError(f"the program takes input {index}, but only {len(self.flat_inputs)} were given")
        return self.flat_inputs[index]

    def constant(self, ins: Constant) -> Any:
        return ins.value

    def cotangent(self, ins: Any) -> Any:
        if ins.index >= len(self.cotangents):
            raise TplimitsError(f"the total program needs the error signal of output {ins.index}")
        return self.cotangents[ins.index]

    # The instructions whose meaning depends on the assignment:
    def parameter(self, ins: Parameter) -> Any:
        raise NotImplementedError

    def nonlin(self, ins: Nonlin) -> Any:
        raise NotImplementedError

    def regroup(self, ins: Regroup) -> Any:
        raise NotImplementedError

    def avg(self, ins: Avg) -> Any:
        raise NotImplementedError

    def matmul(self, ins: MatMul) -> Any:
        raise NotImplementedError


class FiniteInterpreter(Interpreter):
    """The finite-width assignment: the program evaluated with a concrete network's parameters."""

    def __init__(self, program: Program, state: Mapping[str, torch.Tensor], n: int) -> None:
        super().__init__(program)
        self.state = state
        self.n = n

    @classmethod
    def from_model(cls, program: Program, model: torch.nn.Module) -> FiniteInterpreter:
        """The assignment given by ``model``'s parameters and buffers, read by attribute path so that a
        parametrized weight (``torch.nn.utils.parametrize``) enters with its multiplier applied."""
        state = {}
        for ins in program.instructions:
            if isinstance(ins, Parameter):
                try:
                    state[ins.target] = operator.attrgetter(ins.target)(model)
                except AttributeError:
                    raise TplimitsError(f"the model has no parameter or buffer {ins.target!r} that the program "
                                        "uses") from None
        return cls(program, state, infer_width(program, state))

    def parameter(self, ins: Parameter) -> torch.Tensor:
        try:
            return self.state[ins.target]
        except KeyError:
            raise TplimitsError(f"the model has no parameter or buffer {ins.target!r} that the program uses") from None

    def nonlin(self, ins: Nonlin) -> Any:
        if deferrable(ins.fn) and not ins.kwargs:
            return self.defer(ins)
        return self.evaluate(ins)

    def evaluate(self, ins: Nonlin) -> torch.Tensor:
        """The value of a Nonlin, formed now."""
        value = self.apply(ins)
        # where the model cuts gradients (``.detach()``, ``torch.no_grad()``), so does its replay
        return value if ins.differentiable else value.detach()

    def defer(self, ins: Nonlin) -> PerCoordinateValue:
        """A per-coordinate pullback's values, left to be formed when read: the Avg that follows it needs only
        their sum over the rows, one vector-Jacobian product (:meth:`avg`, :mod:`tplimits.core.pullback`)."""
        args, _ = self.arguments(ins)
        # parameters and inputs belong to the caller, who may change them in place (an optimizer step) before the
        # values are read: they are held as they are now (values the program computed are checked, not copied)
        held = [value.clone() if isinstance(ref, Ref) and torch.is_tensor(value)
                and isinstance(self.program[ref.name], Parameter | Input) else value
                for ref, value in zip(ins.args, args, strict=True)]
        return PerCoordinateValue(ins.name, ins.fn, held, ins.differentiable)

    def arguments(self, ins: Nonlin | Regroup) -> tuple[Any, dict[str, Any]]:
        """The values of ``ins``'s arguments (a per-coordinate pullback's formed, for a reader other than its
        Avg)."""
        return self.substituted(ins.args), self.substituted(dict(ins.kwargs))

    def substituted(self, args: Any) -> Any:
        """``args`` with references replaced by the values (formed, where deferred) and width-dependent
        constants by their value at this width."""
        return map_args(substitute(args, self.values, self.n), materialized)

    def apply(self, ins: Nonlin | Regroup) -> Any:
        """``ins.fn`` on the values of its arguments."""
        args, kwargs = self.arguments(ins)
        return ins.fn(*args, **kwargs)

    regroup = apply

    def avg(self, ins: Avg) -> torch.Tensor:
        vector = self.values[ins.vector]
        if isinstance(vector, PerCoordinateValue):
            total, rows = row_sum(vector, ins.axis, ins.keepdim)
            out = total / rows
        else:
            out = vector.mean(dim=ins.axis, keepdim=ins.keepdim)
        return out if ins.scale is None else out * ins.scale.resolve(self.n)

    def matmul(self, ins: MatMul) -> torch.Tensor:
        vector = materialized(self.values[ins.vector])
        return torch.einsum(ins.equation, self.values[ins.matrix], vector).contiguous()


def row_sum(vector: torch.Tensor | PerCoordinateValue, axis: int, keepdim: bool) -> tuple[torch.Tensor, int]:
    """The sum of ``vector`` along ``axis`` and the number of rows summed, for an Avg: one vector-Jacobian
    product for a per-coordinate pullback's values along their rows."""
    if isinstance(vector, PerCoordinateValue):
        return vector.row_sum(axis, keepdim), vector.rows if axis == 0 else vector.resolve().shape[axis]
    return vector.sum(dim=axis, keepdim=keepdim), vector.shape[axis]


def infer_width(program: Program, state: Mapping[str, torch.Tensor]) -> int:
    """The width n of a concrete network, from its parameters' sizes along the width axes."""
    parameters = [ins for ins in program.instructions if isinstance(ins, Parameter)]
    for ins in parameters:
        if ins.target not in state:
            raise TplimitsError(f"the model has no parameter or buffer {ins.target!r} that the program uses")
    return common_scale(((f"parameter {ins.target!r}", ins.layout, state[ins.target]) for ins in parameters), Width,
                        program.width, TplimitsError, ": is this the same architecture and config?")
