"""Programs at any batch size.

A program is lowered at the batch size of its example inputs: its layouts and size arguments are
concrete. While lowering, the model is also traced and lowered on its inputs with one example more
along their batch axis (:func:`tplimits.core.trace.batch_axis`: axis 0, or the axis along which a
sequence-first model's examples are independent; :func:`~tplimits.core.trace.resize_batch`); comparing
the two programs instruction by instruction finds
every size that grows with the batch size b (a :class:`BatchInt` ``ratio·b``: the batch axis itself,
``b·T`` in a view to ``[b·T, n]``) and every folded constant that does (a causal mask broadcast over the
batch, kept as one :class:`BatchConstant` unit). The :class:`BatchSpec` so found re-specialises the
program to any batch size without tracing again (``Program.at_batch``). Where the two programs differ
in any other way (another op sequence, a size that is not proportional to b, a constant that differs
between examples), the program stays specific to its batch size and records why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import torch

from tplimits.core.ir import Constant, Input, Instruction, Proportional, Ref, common_scale, map_args
from tplimits.errors import BatchSizeError

if TYPE_CHECKING:  # generalise compares two programs
    from tplimits.core.program import Program


@attrs.frozen
class BatchInt(Proportional):
    """A size that equals ``ratio · b`` for the batch size b (a batch axis, a view size ``b·T``)."""

    symbol: ClassVar[str] = "b"
    scale: ClassVar[str] = "batch size"

    def resolve(self, size: int) -> int:
        value = self.whole(size)
        if value is None:
            raise BatchSizeError(f"batch size {size} does not give a whole size for an axis of {self} examples; "
                                 f"use a multiple of {(self.ratio * size).denominator}")
        return value


EXAMPLES = BatchInt(Fraction(1))
"""The size of a batch axis: one entry per example."""


@attrs.frozen
class BatchConstant:
    """A folded constant that is the same for every example: ``unit`` repeated b times along each of
    ``axes`` (``(axis, period)``: the axis has ``period·b`` entries, example-major)."""

    unit: torch.Tensor = attrs.field(eq=False)
    axes: tuple[tuple[int, int], ...]

    def at(self, size: int) -> torch.Tensor:
        value = self.unit
        for axis, period in self.axes:
            shape = list(value.shape)
            value = value.unsqueeze(axis).expand(*shape[:axis], size, *shape[axis:])
            value = value.reshape(*shape[:axis], size * period, *shape[axis + 1:])
        return value.contiguous()


@attrs.frozen
class BatchSpec:
    """How a lowered program depends on the batch size.

    ``size`` is the batch size its instructions are specialised to; ``fields`` holds, for every
    instruction that depends on it, the fields in which sizes are :class:`BatchInt`; ``constants`` the
    folded constants that grow with it. ``instructions`` are the program's own: a program derived from
    it (parametrized, total) has others and must be derived again from the re-specialised program.
    """

    size: int
    fields: Mapping[str, Mapping[str, Any]]
    constants: Mapping[str, BatchConstant]
    instructions: tuple[Instruction, ...] = attrs.field(eq=False, repr=False)

    def describes(self, instructions: Sequence[Instruction]) -> bool:
        return len(instructions) == len(self.instructions) and all(
            a is b for a, b in zip(instructions, self.instructions, strict=True))

    def layout(self, ins: Instruction) -> tuple:
        """``ins``'s layout with its batch axes as :class:`BatchInt`."""
        return self.fields.get(ins.name, {}).get("layout", ins.layout)

    def example_axis(self, ins: Instruction) -> int | None:
        """The axis of ``ins`` with one entry per example (``b`` in its layout), or None where it has none."""
        return next((axis for axis, spec in enumerate(self.layout(ins)) if spec == EXAMPLES), None)

    def respecialise(self, instructions: Sequence[Instruction], size: int) -> list[Instruction]:
        """``instructions`` (the ones this spec describes) at batch size ``size``."""
        out = []
        for ins in instructions:
            changes = {field: _resolve(value, size) for field, value in self.fields.get(ins.name, {}).items()}
            if ins.name in self.constants:
                changes["value"] = self.constants[ins.name].at(size)
            out.append(attrs.evolve(ins, **changes) if changes else ins)
        return out

    def size_of(self, inputs: Sequence[Input], flat: Sequence[Any]) -> int:
        """The batch size of the program's ``inputs`` given as ``flat`` (the flattened user inputs)."""
        given = [(ins, flat[ins.index]) for ins in inputs if ins.index < len(flat) and torch.is_tensor(flat[ins.index])]
        return common_scale(((f"input {ins.index}", self.layout(ins), value) for ins, value in given), BatchInt,
                            self.size, BatchSizeError)


def check_shapes(inputs: Sequence[Input], flat: Sequence[Any], why: str) -> None:
    """Inputs of a program specific to its batch size must have the shapes it was lowered with."""
    for ins in inputs:
        value = flat[ins.index] if ins.index < len(flat) else None
        if torch.is_tensor(value) and tuple(value.shape) != tuple(ins.layout):
            raise BatchSizeError(
                f"input {ins.index} has shape {list(value.shape)} but the program was lowered for {list(ins.layout)} "
                f"and holds only at that batch size: {why}. Lower the model with example "
                "inputs of the shape you run it on (tpl.lower(..., example_inputs=...)).")


def _resolve(value: Any, size: int) -> Any:
    return map_args(value, lambda v: v.resolve(size) if isinstance(v, BatchInt) else v)


def _has_batch(value: Any) -> bool:
    if isinstance(value, BatchInt):
        return True
    if isinstance(value, list | tuple):
        return any(_has_batch(v) for v in value)
    if isinstance(value, dict):
        return any(_has_batch(v) for v in value.values())
    return False


# --------------------------------------------------------------------------------------------
# Two programs at two batch sizes -> one spec
# --------------------------------------------------------------------------------------------


def generalise(program: Program, other: Program, sizes: tuple[int, int]) -> BatchSpec:
    """The :class:`BatchSpec` of ``program`` (lowered at batch size ``sizes[0]``) from ``other``, the same model
    lowered at ``sizes[1]``. Raises :class:`BatchSizeError` naming the first instruction that depends on the
    batch size otherwise than through proportional sizes and per-example constants."""
    a, b = program.instructions, other.instructions
    if len(a) != len(b) or [type(x) for x in a] != [type(y) for y in b]:
        raise BatchSizeError(f"the program has {len(a)} instructions at batch size {sizes[0]} and {len(b)} at "
                             f"{sizes[1]}, or other ones: the model's graph depends on the batch size")
    fit = _Fit({y.name: x.name for x, y in zip(a, b, strict=True)}, sizes)
    if [fit.names.get(name) for name in other.outputs] != list(program.outputs):
        raise BatchSizeError(f"the program's outputs differ between batch sizes {sizes[0]} and {sizes[1]}")
    fields: dict[str, dict[str, Any]] = {}
    constants: dict[str, BatchConstant] = {}
    for x, y in zip(a, b, strict=True):
        fit.where = f"%{x.name} ({x.origin.describe() or type(x).__name__})"
        generic = {}
        for field in attrs.fields(type(x)):
            if field.name in ("name", "origin") or (isinstance(x, Constant) and field.name == "value"):
                continue
            value = fit(getattr(x, field.name), getattr(y, field.name))
            if _has_batch(value):
                generic[field.name] = value
        if isinstance(x, Constant):
            constant = fit.constant(x.value, y.value)
            if constant is not None:
                constants[x.name] = constant
        if generic:
            fields[x.name] = generic
    return BatchSpec(sizes[0], fields, constants, tuple(a))


class _Fit:
    """Fits one value of two programs (at two batch sizes) to a batch-generic value."""

    def __init__(self, names: Mapping[str, str], sizes: tuple[int, int]) -> None:
        self.names = names  # the other program's instruction names -> the program's
        self.sizes = sizes
        self.where = ""

    def refuse(self, what: str) -> None:
        raise BatchSizeError(f"{self.where}: {what} at batch sizes {self.sizes[0]} and {self.sizes[1]}")

    def __call__(self, x: Any, y: Any) -> Any:
        if isinstance(x, Ref) and isinstance(y, Ref):
            return x if self.names.get(y.name) == x.name else self.refuse("reads other values")
        if isinstance(x, str) and isinstance(y, str):
            return x if x == y or self.names.get(y) == x else self.refuse(f"has {x!r} and {y!r}")
        if isinstance(x, int) and isinstance(y, int) and not isinstance(x, bool) and not isinstance(y, bool):
            return x if x == y else self._size(x, y)
        if isinstance(x, list | tuple) and type(x) is type(y) and len(x) == len(y):
            return type(x)(self(p, q) for p, q in zip(x, y, strict=True))
        if isinstance(x, Mapping) and isinstance(y, Mapping) and x.keys() == y.keys():
            return {k: self(x[k], y[k]) for k in x}
        if torch.is_tensor(x) or torch.is_tensor(y):
            same = torch.is_tensor(x) and torch.is_tensor(y) and x.shape == y.shape and torch.equal(x, y)
            return x if same else self.refuse("holds tensors that differ")
        if x is y or (type(x) is type(y) and _equal(x, y)):
            return x
        return self.refuse(f"has {x!r} and {y!r}")

    def _size(self, x: int, y: int) -> BatchInt:
        ratio = Fraction(x, self.sizes[0])
        if Fraction(y, self.sizes[1]) != ratio:
            self.refuse(f"has size {x} and {y}, not proportional to the batch size,")
        return BatchInt(ratio)

    def constant(self, x: torch.Tensor, y: torch.Tensor) -> BatchConstant | None:
        """A folded constant: the same at both batch sizes (None), or one unit repeated for every example."""
        if x.dim() != y.dim() or x.dtype != y.dtype:
            self.refuse("is a constant of another rank or dtype")
        axes = []
        for axis, (p, q) in enumerate(zip(x.shape, y.shape, strict=True)):
            if p != q:
                ratio = self._size(p, q).ratio
                if ratio.denominator != 1:
                    self.refuse(f"is a constant with {ratio} entries per example along axis {axis}")
                axes.append((axis, int(ratio)))
        unit_x, unit_y = _unit(x, axes, self.sizes[0]), _unit(y, axes, self.sizes[1])
        if unit_x is None or unit_y is None or not torch.equal(unit_x, unit_y):
            self.refuse("is a constant that differs between examples or batch sizes (only a constant repeated for "
                        "every example, like a mask broadcast over the batch, is re-specialised)")
        return BatchConstant(unit_x, tuple(axes)) if axes else None


def _unit(value: torch.Tensor, axes: Sequence[tuple[int, int]], size: int) -> torch.Tensor | None:
    """What ``value`` repeats for every example along ``axes``, or None if examples differ."""
    for axis, period in axes:
        blocks = value.unflatten(axis, (size, period))
        first = blocks.narrow(axis, 0, 1)
        if not torch.equal(blocks, first.expand_as(blocks)):
            return None
        value = first.squeeze(axis)
    return value


def _equal(x: Any, y: Any) -> bool:
    try:
        return bool(x == y) or (isinstance(x, float) and x != x and y != y)  # NaN constants agree
    except (TypeError, RuntimeError):  # objects without a comparison of values
        return False
