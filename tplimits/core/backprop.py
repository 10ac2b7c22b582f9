"""The backpropagation and total programs (Def 2.9.14, 2.9.16), built symbolically in the IR.

Given the forward program and one error signal (cotangent) per output, :func:`total_program`
appends the backward pass as ordinary instructions, in reverse order of the forward ones:

========================  ===============================================================
forward                   backward
========================  ===============================================================
``y = W x`` (MatMul)      ``dx = Wᵀ dy`` (MatMul by the transpose); W's gradient is the
                          outer-product term ``(dy, x)``, never materialized
``y = fn(x; c)`` (Nonlin) ``dx = pullback`` (Nonlin, coordinatewise); for a scalar ``c``:
                          the per-coordinate pullbacks averaged over width (Nonlin + Avg,
                          evaluated as one vector-Jacobian product: :mod:`tplimits.core.pullback`)
``c = s·Avg(x)``          ``dx = dc·s/ratio`` spread along the width axis (Nonlin)
``y = regroup(x)``        ``dx = regroup⁻¹(dy)`` (Regroup)
========================  ===============================================================

Units follow the paper: with F the contraction of the outputs with their error signals, a
vector's cotangent is ``dy = n·∂F/∂y`` and a scalar's is ``dc = ∂F/∂c`` (``d^x y = n ∂⟨x⟩/∂y``).
Gradients of parameters are then ``dv/n`` (vectors), ``dc`` (scalars) and
``(1/n)·Σ einsum(dh, x)`` over the uses ``h = W x`` (matrices).

The pullbacks of a Nonlin differentiate its function ψ (``torch.func``), never the model.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import attrs
import torch
from torch.utils import _pytree as pytree

from tplimits.core.interpret import FiniteInterpreter
from tplimits.core.ir import (
    Avg,
    Instruction,
    Layout,
    MatMul,
    Nonlin,
    Origin,
    Parameter,
    Ref,
    Regroup,
    Width,
    WidthInt,
    WidthPower,
    format_layout,
    width_axes,
)
from tplimits.core.program import Program
from tplimits.core.pullback import Pullback
from tplimits.errors import TplimitsError

# --------------------------------------------------------------------------------------------
# Instructions and records of the total program
# --------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Cotangent(Instruction):
    """The error signal of program output ``index`` (an initial scalar of the total program)."""

    index: int

    def describe(self) -> str:
        return f"cotangent of output {self.index}"


@attrs.frozen
class MatrixGradientTerm:
    """One use ``h = W x`` of a matrix: its gradient contribution is ``(1/n)·einsum(equation, dh, x)``."""

    cotangent: str
    vector: str
    equation: str


@attrs.frozen
class Gradient:
    """Where the gradient of a parameter is in the total program, in the units above."""

    kind: str  # "matrix" | "vector" | "scalar"
    value: str | None = None  # vector / scalar: the instruction holding dv or dc
    terms: tuple[MatrixGradientTerm, ...] = ()  # matrix: outer-product terms

    def unit(self, n: int) -> float:
        """The factor from the program's cotangents to ``∂F/∂θ`` at width n: ``1/n`` for matrices
        (``dh ⊗ x``) and vectors (``dv``), 1 for scalars (``dc``)."""
        return 1.0 if self.kind == "scalar" else 1.0 / n


@attrs.define
class TotalProgram:
    """The forward program followed by its backpropagation (Def 2.9.16)."""

    program: Program
    forward_length: int
    gradients: dict[str, Gradient]
    cotangent_layouts: tuple[Layout, ...]
    cotangents: dict[str, str] = attrs.field(factory=dict)
    """Forward value -> the instruction holding its total cotangent (values that depend on a trainable
    parameter and reach an output)."""

    def gradients_at(self, model: torch.nn.Module, inputs: tuple, cotangents: tuple) -> dict[str, torch.Tensor]:
        """Finite-width gradients ``∂F/∂θ`` for every trainable parameter (under each of its names, for
        tied weights), with F = Σ ⟨cotangent, output⟩ over the program's outputs."""
        interp = FiniteInterpreter.from_model(self.program, model)
        interp.cotangents = tuple(cotangents)
        interp.run(*inputs)
        grads = {}
        for target, grad in self.gradients.items():
            if grad.kind == "matrix":
                total = None
                for term in grad.terms:
                    part = torch.einsum(term.equation, interp.values[term.cotangent], interp.values[term.vector])
                    total = part if total is None else total + part
            else:
                total = interp.values[grad.value]
            grads[target] = total * grad.unit(interp.n)
            for alias in self.program.aliases.get(target, ()):  # tied weights: one gradient, every name
                grads[alias] = grads[target]
        return grads

    def format(self) -> str:
        lines = [self.program.format()]
        lines.append("gradients:")
        for target, grad in self.gradients.items():
            if grad.kind == "matrix":
                terms = " + ".join(f"(%{t.cotangent} ⊗ %{t.vector})" for t in grad.terms)
                lines.append(f"  d {target} = n^-1 · [{terms}]")
            else:
                scale = "n^-1 · " if grad.kind == "vector" else ""
                lines.append(f"  d {target} = {scale}%{grad.value}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Functions of backward Nonlin instructions (the pullbacks themselves: tplimits.core.pullback)
# --------------------------------------------------------------------------------------------


def _spread(dc: torch.Tensor, axis: int, size: int, factor: Any) -> torch.Tensor:
    """``dc`` (kept size-1 at ``axis``) expanded to ``size`` along the width axis, times ``factor``."""
    shape = list(dc.shape)
    shape[axis] = size
    out = dc.expand(shape)
    return out * factor if not (isinstance(factor, int | float) and factor == 1) else out.clone()


def _add(*parts: torch.Tensor) -> torch.Tensor:
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


# --------------------------------------------------------------------------------------------
# Building the total program
# --------------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, program: Program) -> None:
        self.program = program
        self.instructions: list[Instruction] = list(program.instructions)
        self.names = {ins.name for ins in self.instructions}
        self.layouts: dict[str, Layout] = {ins.name: ins.layout for ins in self.instructions}
        self.contributions: dict[str, list[str]] = {}
        self.matrix_terms: dict[str, list[MatrixGradientTerm]] = {}

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name = f"{base}_{i}"
            i += 1
        self.names.add(name)
        return name

    def emit(self, cls: type[Instruction], base: str, origin: Origin, **fields: Any) -> str:
        name = self.fresh(base)
        ins = cls(name=name, origin=origin, **fields)
        self.instructions.append(ins)
        self.layouts[name] = ins.layout
        return name

    def contribute(self, target: str, value: str) -> None:
        self.contributions.setdefault(target, []).append(value)

    def cotangent_of(self, name: str) -> str | None:
        """The total cotangent of ``name``: the sum of its contributions (emitted once, when needed)."""
        parts = self.contributions.get(name)
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        layout = self.layout(name)
        total = self.emit(Nonlin, f"d_{name}", Origin(name, "backprop"), fn=_add,
                          args=tuple(Ref(p) for p in parts), layout=layout)
        self.contributions[name] = [total]
        return total

    def layout(self, name: str) -> Layout:
        return self.layouts[name]


def total_program(program: Program) -> TotalProgram:
    """Append the backpropagation of ``program`` (one cotangent input per output) to it."""
    for name in program.outputs:
        if width_axes(program[name].layout):
            raise TplimitsError(
                f"output %{name} {format_layout(program[name].layout)} is a vector: backpropagation needs scalar "
                "outputs (sums or averages over the width axis, like a readout)")
    needs = _needs_gradient(program)
    b = _Builder(program)
    cotangent_layouts = []
    cotangents: dict[str, str] = {}
    for i, name in enumerate(program.outputs):
        cot = b.emit(Cotangent, f"cotangent{i}", Origin(name, "cotangent"), index=i, layout=program[name].layout)
        b.contribute(name, cot)
        cotangent_layouts.append(program[name].layout)
    for ins in reversed(program.instructions):
        if ins.name not in needs:
            continue
        dy = b.cotangent_of(ins.name)
        if dy is None:
            continue
        cotangents[ins.name] = dy
        if isinstance(ins, Nonlin | Regroup):
            _pull_function(b, ins, dy, needs)
        elif isinstance(ins, MatMul):
            _pull_matmul(b, ins, dy, needs)
        elif isinstance(ins, Avg):
            _pull_avg(b, ins, dy)
    gradients = {}
    for ins in program.instructions:
        if not isinstance(ins, Parameter) or not ins.trainable:
            continue
        if ins.kind == "matrix":
            gradients[ins.target] = Gradient("matrix", terms=tuple(b.matrix_terms.get(ins.name, ())))
        else:
            total = b.cotangent_of(ins.name)
            if total is None:
                total = b.emit(Nonlin, f"d_{ins.name}", Origin(ins.name, "backprop"), fn=torch.zeros_like,
                               args=(Ref(ins.name),), layout=ins.layout)
            gradients[ins.target] = Gradient(ins.kind, value=total)
    outputs = list(program.outputs)
    total = attrs.evolve(program, instructions=b.instructions, outputs=outputs)
    return TotalProgram(total, len(program.instructions), gradients, tuple(cotangent_layouts), cotangents)


def eager_pullbacks(total: TotalProgram) -> TotalProgram:
    """``total`` with every per-coordinate pullback's values formed as its instruction runs and averaged as any
    value (``Pullback.deferred=False``): the path the interpreters took before they averaged such values as one
    vector-Jacobian product, to compare against. Same instructions, names and results up to rounding."""
    instructions = [attrs.evolve(ins, fn=attrs.evolve(ins.fn, deferred=False))
                    if isinstance(ins, Nonlin) and isinstance(ins.fn, Pullback) and ins.fn.per_coordinate else ins
                    for ins in total.program.instructions]
    return attrs.evolve(total, program=attrs.evolve(total.program, instructions=instructions))


def _needs_gradient(program: Program) -> set[str]:
    """Instructions that depend on a trainable parameter through differentiable paths (everything else has
    no cotangent: a Nonlin declared not differentiable, a ``.detach()``, cuts the path)."""
    needs: set[str] = set()
    for ins in program.instructions:
        if isinstance(ins, Parameter) and ins.trainable:
            needs.add(ins.name)
        elif isinstance(ins, Nonlin) and not ins.differentiable:
            continue
        elif any(name in needs for name in ins.inputs):
            needs.add(ins.name)
    return needs


def _pull_function(b: _Builder, ins: Nonlin | Regroup, dy: str, needs: set[str]) -> None:
    leaves, spec = pytree.tree_flatten((ins.args, dict(ins.kwargs)))
    out_axes = width_axes(ins.layout)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Ref) or leaf.name not in needs:
            continue
        arg_layout = b.layout(leaf.name)
        per_coordinate = bool(out_axes) and not width_axes(arg_layout)
        pull = Pullback(ins.fn, spec, i, per_coordinate, out_axes[0] if per_coordinate else None)
        origin = Origin(ins.name, "backprop", ins.origin.source)
        base = f"d_{leaf.name}_from_{ins.name}"
        if isinstance(ins, Regroup):
            name = b.emit(Regroup, base, origin, fn=pull, args=(*leaves, Ref(dy)), layout=arg_layout, block=ins.block)
        elif per_coordinate:
            ratio = ins.layout[out_axes[0]].ratio
            per = b.emit(Nonlin, base + "_per_coordinate", origin, fn=pull, args=(*leaves, Ref(dy)),
                         layout=(Width(ratio), *arg_layout), smooth=ins.smooth)
            name = b.emit(Avg, base, origin, vector=per, axis=0, scale=WidthPower(float(ratio), Fraction(0)),
                          layout=arg_layout)
        else:  # the derivative of a function with a kink jumps: the pullback inherits the declaration
            name = b.emit(Nonlin, base, origin, fn=pull, args=(*leaves, Ref(dy)), layout=arg_layout,
                          smooth=ins.smooth, kinks=ins.kinks if isinstance(ins, Nonlin) and i == 0 else ())
        b.contribute(leaf.name, name)


def _pull_matmul(b: _Builder, ins: MatMul, dy: str, needs: set[str]) -> None:
    lhs, out = ins.equation.split("->")
    m_letters, x_letters = lhs.split(",")
    origin = Origin(ins.name, "backprop", ins.origin.source)
    if ins.vector in needs:
        name = b.emit(MatMul, f"d_{ins.vector}_from_{ins.name}", origin, matrix=ins.matrix, vector=dy,
                      equation=f"{m_letters},{out}->{x_letters}", transposed=not ins.transposed,
                      layout=b.layout(ins.vector))
        b.contribute(ins.vector, name)
    matrix = b.program[ins.matrix]
    if isinstance(matrix, Parameter) and matrix.trainable:
        b.matrix_terms.setdefault(ins.matrix, []).append(
            MatrixGradientTerm(dy, ins.vector, f"{out},{x_letters}->{m_letters}"))


def _pull_avg(b: _Builder, ins: Avg, dy: str) -> None:
    x_layout = b.layout(ins.vector)
    axis = ins.axis
    ratio = x_layout[axis].ratio
    scale = ins.scale if ins.scale is not None else WidthPower(1.0, Fraction(0))
    factor = WidthPower(scale.coef / float(ratio), scale.power)
    source = dy
    if not ins.keepdim:
        kept = tuple(1 if i == axis else a for i, a in enumerate(x_layout))
        source = b.emit(Nonlin, f"d_{ins.name}_keepdim", Origin(ins.name, "backprop"), fn=torch.unsqueeze,
                        args=(Ref(dy), axis), layout=kept)
    name = b.emit(Nonlin, f"d_{ins.vector}_from_{ins.name}", Origin(ins.name, "backprop", ins.origin.source),
                  fn=_spread, args=(Ref(source), axis, WidthInt(ratio), factor), layout=x_layout)
    b.contribute(ins.vector, name)

