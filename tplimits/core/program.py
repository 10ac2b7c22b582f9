"""The Tensor Program IR: the NE⊗OR⊤ language of Tensor Programs IVb (MATH.md §4.2, §7).

A :class:`Program` is a straight-line list of instructions. Every instruction produces one
tensor whose axes are either *fixed* (batch, positions, heads, kernel offsets, …) or a *width*
axis whose size is ``ratio · n``. The number of width axes decides the kind of a value:

========  ===========  ======================================================
kind      width axes   in the paper
========  ===========  ======================================================
scalar    0            scalars (with fixed axes: a collection of scalars)
vector    1            multi-vectors ``[n, *fixed]``
matrix    2            initial matrices (only parameters may be matrices)
========  ===========  ======================================================

Tensors keep the axis order torch gave them; the layout records where the width axis is. So the
same instruction can be evaluated on a finite network (width axis of size ``ratio · n``) or on
Monte Carlo kets (width axis of size P particles): one program, many interpreters.

Instructions (defined in :mod:`tplimits.core.ir`):

* :class:`Input`, :class:`Parameter`, :class:`Constant` — initial scalars / vectors / matrices;
* :class:`Nonlin` — OuterNonlin of order 1 (r = 0): a function applied coordinate by coordinate
  along the width axis, of vectors and scalars (a function of scalars alone is a scalar,
  Lemma 2.6.2);
* :class:`MatMul` — an initial matrix (or its transpose) times a vector, optionally batched
  over fixed axes shared with the matrix (one matrix per kernel offset for convolutions);
* :class:`Avg` — the mean over the width axis, times an explicit power of width for sums;
* :class:`Regroup` — a reshape of width axes into equal blocks (heads, fused q/k/v): a space of
  size ``r·n`` seen as ``k`` blocks of size ``(r/k)·n``. In the paper's terms this splits every
  matrix acting on that space into blocks, each an initial matrix of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import networkx as nx
import torch
from torch.utils import _pytree as pytree

from tplimits.core.batch import BatchSpec, check_shapes
from tplimits.core.interpret import FiniteInterpreter
from tplimits.core.ir import Input, Instruction, Parameter, ParameterInfo, concrete_shape, format_layout, width_axes
from tplimits.errors import BatchSizeError, check_count

# --------------------------------------------------------------------------------------------
# The program
# --------------------------------------------------------------------------------------------


@attrs.define
class Program:
    """A lowered Tensor Program: instructions in order, outputs, and what the model looked like.

    ``width`` is the width n at which the model was given (for ``base=`` lowering, the model's),
    ``out_spec`` the pytree spec that rebuilds the model's output structure.
    """

    instructions: list[Instruction]
    outputs: list[str]
    width: int
    out_spec: Any = None
    tracer: str = "torch.export"
    notes: list[str] = attrs.field(factory=list)
    fan_in: dict[str, tuple[int, ...]] = attrs.field(factory=dict)  # parameter -> axes summed against inputs
    aliases: dict[str, tuple[str, ...]] = attrs.field(factory=dict)  # tied parameter -> its other names
    unused: tuple[str, ...] = ()  # trainable parameters of the model that its forward never reads
    batch: BatchSpec | None = attrs.field(default=None, repr=False)  # how it depends on the batch size
    batch_dependence: str = ""  # why it holds at its own batch size only, when it does
    _by_name: dict[str, Instruction] = attrs.field(init=False, factory=dict, repr=False)
    _at_batch: dict[int, Program] = attrs.field(init=False, factory=dict, repr=False)

    def __attrs_post_init__(self) -> None:
        self._by_name = {ins.name: ins for ins in self.instructions}

    def __getitem__(self, name: str) -> Instruction:
        return self._by_name[name]

    def __iter__(self) -> Iterator[Instruction]:
        return iter(self.instructions)

    def __len__(self) -> int:
        return len(self.instructions)

    # -- views -------------------------------------------------------------------------------

    @property
    def inputs(self) -> list[Input]:
        return sorted((i for i in self.instructions if isinstance(i, Input)), key=lambda i: i.index)

    @property
    def parameters(self) -> dict[str, ParameterInfo]:
        """Parameter name -> :class:`ParameterInfo` (kind, shape at the model's width, width axes)."""
        uses: dict[str, list[str]] = {}
        for ins in self.instructions:
            for name in ins.inputs:
                uses.setdefault(name, []).append(ins.name)
        table = {}
        for ins in self.instructions:
            if isinstance(ins, Parameter):
                table[ins.target] = ParameterInfo(
                    name=ins.target,
                    kind=ins.kind,
                    layout=ins.layout,
                    shape=concrete_shape(ins.layout, self.width),
                    trainable=ins.trainable,
                    uses=tuple(uses.get(ins.name, ())),
                    fan_in_axes=self.fan_in.get(ins.target, ()),
                    aliases=self.aliases.get(ins.target, ()),
                )
        return table

    @property
    def graph(self) -> nx.DiGraph:
        """The program as a ``networkx.DiGraph``: one node per instruction, edges data → use."""
        g = nx.DiGraph()
        for ins in self.instructions:
            g.add_node(
                ins.name,
                instruction=type(ins).__name__,
                kind=ins.kind,
                layout=format_layout(ins.layout),
                text=ins.describe(),
                origin=ins.origin.describe(),
                output=ins.name in self.outputs,
            )
            for src in ins.inputs:
                g.add_edge(src, ins.name)
        return g

    def counts(self) -> dict[str, int]:
        """How many instructions of each type the program has."""
        out: dict[str, int] = {}
        for ins in self.instructions:
            out[type(ins).__name__] = out.get(type(ins).__name__, 0) + 1
        return out

    def scales_with_width(self) -> bool:
        """Whether any value of the program has a width axis (else it is the same at every width)."""
        return any(width_axes(getattr(ins, "layout", ())) for ins in self.instructions)

    # -- batch size ----------------------------------------------------------------------------

    @property
    def batch_generic(self) -> bool:
        """Whether the program can be re-specialised to other batch sizes (:meth:`at_batch`)."""
        return self.batch is not None and self.batch.describes(self.instructions)

    def at_batch(self, size: int) -> Program:
        """The program at batch size ``size``, re-specialised from this one without tracing again.

        Raises :class:`~tplimits.errors.BatchSizeError` when the model's graph depends on the batch size
        (the reason found at lowering is given) or when this program was derived from a lowered one
        (re-specialise the lowered program, then derive).
        """
        check_count("size", size, 1)
        if not self.batch_generic:
            raise BatchSizeError(f"this program cannot be re-specialised to batch size {size}: "
                                 f"{self._why_batch_specific()}. Lower the model with example inputs of that "
                                 "batch size (along the inputs' batch axis: axis 0, or the one a sequence-first model "
                                 "takes its examples along).")
        if size == self.batch.size:
            return self
        if size not in self._at_batch:
            instructions = self.batch.respecialise(self.instructions, size)
            self._at_batch[size] = attrs.evolve(self, instructions=instructions, batch=attrs.evolve(
                self.batch, size=size, instructions=tuple(instructions)))
        return self._at_batch[size]

    def for_inputs(self, *inputs: Any) -> Program:
        """The program at the batch size of ``inputs`` (itself when they have the shapes it was lowered with)."""
        flat = pytree.tree_leaves(inputs)
        if not self.batch_generic:
            check_shapes(self.inputs, flat, self._why_batch_specific())
            return self
        return self.at_batch(self.batch.size_of(self.inputs, flat))

    def _why_batch_specific(self) -> str:
        if self.batch is not None and not self.batch_generic:
            return ("it was derived from a lowered program (parametrized, or a total program); re-specialise the "
                    "lowered program with `at_batch` and derive it again")
        return self.batch_dependence or "it records no batch axis"

    # -- evaluation ----------------------------------------------------------------------------

    def replay(self, model: torch.nn.Module, *inputs: Any) -> Any:
        """Evaluate the program with ``model``'s own parameters (the finite-width assignment).

        ``model`` may be at any width of the family, not only the traced ones, and ``inputs`` of any batch
        size (the program is re-specialised to it, see :meth:`at_batch`). The result has the structure of
        ``model(*inputs)`` and equals it up to floating-point rounding.
        """
        checked = FiniteInterpreter.from_model(self, model)  # the model's parameters first: the likelier mistake
        return FiniteInterpreter(self.for_inputs(*inputs), checked.state, checked.n).run(*inputs)

    # -- printing ------------------------------------------------------------------------------

    def format(self, *, origins: bool = False) -> str:
        """A readable listing, one instruction per line."""
        lines = [f"Tensor Program (width n = {self.width}, traced with {self.tracer})"]
        name_width = max((len(i.name) for i in self.instructions), default=4) + 1
        for ins in self.instructions:
            head = f"%{ins.name}".ljust(name_width + 1)
            kind = f"{ins.kind} {format_layout(ins.layout)}"
            line = f"  {head} : {kind:<28} = {ins.describe()}"
            if origins and ins.origin.source:
                line += f"    # {ins.origin.source}"
            lines.append(line)
        lines.append("  return " + ", ".join(f"%{o}" for o in self.outputs))
        return "\n".join(lines)

    def parameter_table(self) -> str:
        """A table of every parameter: kind, shape, width axes and how many times it is used."""
        rows = [("parameter", "kind", "shape", "layout", "fan-in axes", "uses")]
        for info in self.parameters.values():
            rows.append(
                (
                    info.name + ("" if info.trainable else " (buffer)")
                    + (f" (tied: {', '.join(info.aliases)})" if info.aliases else ""),
                    info.kind,
                    "x".join(map(str, info.shape)) or "()",
                    format_layout(info.layout),
                    ",".join(map(str, info.fan_in_axes)) or "-",
                    str(len(info.uses)),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()
