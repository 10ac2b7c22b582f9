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

Instructions:

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

from collections.abc import Callable, Iterator, Mapping
from fractions import Fraction
from typing import Any

import attrs
import networkx as nx
import torch

# --------------------------------------------------------------------------------------------
# Width-dependent quantities
# --------------------------------------------------------------------------------------------


@attrs.frozen
class Width:
    """A width axis of size ``ratio · n``."""

    ratio: Fraction

    def size(self, n: int) -> int:
        size = self.ratio * n
        if size.denominator != 1:
            raise ValueError(f"width {n} does not give an integer size for an axis of ratio {self.ratio}")
        return int(size)

    def __str__(self) -> str:
        return "n" if self.ratio == 1 else f"{_fmt_fraction(self.ratio)}n"


Axis = int | Width
Layout = tuple[Axis, ...]


@attrs.frozen
class WidthInt:
    """An integer argument that equals ``ratio · n`` (a view size, a split size, a group count)."""

    ratio: Fraction

    def resolve(self, n: int) -> int:
        return Width(self.ratio).size(n)

    def __str__(self) -> str:
        return str(Width(self.ratio))


@attrs.frozen
class WidthPower:
    """A width-dependent constant ``coef · n^power`` (e.g. attention's 1/√d_head, a 1/fan_in scale).

    Found by comparing the traces at two widths and recorded explicitly, so that a
    parametrization can decide what it becomes instead of it being baked in silently.
    """

    coef: float
    power: Fraction

    def resolve(self, n: int) -> float:
        return self.coef * float(n) ** float(self.power)

    def __str__(self) -> str:
        coef = "" if self.coef == 1 else f"{self.coef:.6g}·"
        return f"{coef}n^{_fmt_fraction(self.power)}"


def resolve(arg: Any, n: int) -> Any:
    """Replace every width-dependent constant inside ``arg`` (any nesting) by its value at width n."""
    return substitute(arg, {}, n)


def width_dependent(arg: Any) -> bool:
    """Whether ``arg`` contains a width-dependent constant."""
    if isinstance(arg, WidthInt | WidthPower):
        return True
    if isinstance(arg, list | tuple):
        return any(width_dependent(a) for a in arg)
    if isinstance(arg, dict):
        return any(width_dependent(v) for v in arg.values())
    return False


def _fmt_fraction(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def layout_kind(layout: Layout) -> str:
    """``"scalar"``, ``"vector"`` or ``"matrix"`` by the number of width axes."""
    count = sum(isinstance(axis, Width) for axis in layout)
    return ("scalar", "vector", "matrix")[count] if count <= 2 else f"{count}-width-axis tensor"


def width_axes(layout: Layout) -> tuple[int, ...]:
    """Positions of the width axes in ``layout``."""
    return tuple(i for i, axis in enumerate(layout) if isinstance(axis, Width))


def concrete_shape(layout: Layout, n: int) -> tuple[int, ...]:
    return tuple(axis.size(n) if isinstance(axis, Width) else axis for axis in layout)


def format_layout(layout: Layout) -> str:
    return "[" + ", ".join(str(axis) for axis in layout) + "]"


# --------------------------------------------------------------------------------------------
# Instructions
# --------------------------------------------------------------------------------------------


@attrs.frozen
class Origin:
    """Where an instruction came from: the fx node, its op and the user's source line."""

    node: str = ""
    op: str = ""
    source: str = ""

    def describe(self) -> str:
        parts = [f"node {self.node!r}" if self.node else "", f"op {self.op}" if self.op else ""]
        text = ", ".join(p for p in parts if p)
        return f"{text} at {self.source}" if self.source else text


@attrs.frozen(kw_only=True)
class Instruction:
    """Base class. ``name`` is unique in the program; ``inputs`` names the instructions read."""

    name: str
    layout: Layout
    origin: Origin = Origin()

    @property
    def kind(self) -> str:
        return layout_kind(self.layout)

    @property
    def inputs(self) -> tuple[str, ...]:
        return ()

    def describe(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError


@attrs.frozen(kw_only=True)
class Input(Instruction):
    """A user input (initial scalars ξ, Def 2.9.1): its size never depends on width."""

    index: int
    dtype: torch.dtype = torch.float32

    def describe(self) -> str:
        return f"input {self.index}"


@attrs.frozen(kw_only=True)
class Parameter(Instruction):
    """An initial matrix, vector or scalar: a parameter (or a width-sized buffer) of the model."""

    target: str
    trainable: bool = True

    def describe(self) -> str:
        what = "parameter" if self.trainable else "buffer"
        return f"{what} {self.target!r}"


@attrs.frozen(kw_only=True)
class Constant(Instruction):
    """A width-independent constant tensor, folded at lowering (masks, position ids, …)."""

    value: torch.Tensor = attrs.field(eq=False)

    def describe(self) -> str:
        if self.value.numel() == 1:
            return f"constant {self.value.item():.6g}"
        return f"constant {self.value.dtype} {list(self.value.shape)}"


@attrs.frozen
class Ref:
    """A reference to another instruction's value inside an argument structure."""

    name: str

    def __str__(self) -> str:
        return f"%{self.name}"


def refs_in(args: Any) -> Iterator[str]:
    if isinstance(args, Ref):
        yield args.name
    elif isinstance(args, list | tuple):
        for a in args:
            yield from refs_in(a)
    elif isinstance(args, dict):
        for a in args.values():
            yield from refs_in(a)


def substitute(args: Any, values: Mapping[str, Any], n: int) -> Any:
    """Replace :class:`Ref` by ``values[name]`` and width-dependent constants by their value at n."""
    if isinstance(args, Ref):
        return values[args.name]
    if isinstance(args, WidthInt | WidthPower):
        return args.resolve(n)
    if isinstance(args, list | tuple):
        return type(args)(substitute(a, values, n) for a in args)
    if isinstance(args, dict):
        return {k: substitute(v, values, n) for k, v in args.items()}
    return args


def format_args(args: Any) -> str:
    if isinstance(args, list):
        return "[" + ", ".join(format_args(a) for a in args) + "]"
    if isinstance(args, tuple):
        return ", ".join(format_args(a) for a in args)
    if isinstance(args, dict):
        return ", ".join(f"{k}={format_args(v)}" for k, v in args.items())
    if isinstance(args, torch.dtype):
        return str(args).removeprefix("torch.")
    if isinstance(args, float):
        return f"{args:.6g}"
    return str(args)


def format_call(fn: Callable, args: tuple, kwargs: Mapping[str, Any]) -> str:
    inner = format_args(args)
    if kwargs:
        inner += (", " if inner else "") + format_args(dict(kwargs))
    return f"{fn_name(fn)}({inner})"


def fn_name(fn: Callable) -> str:
    name = getattr(fn, "__name__", None) or repr(fn)
    if isinstance(fn, torch._ops.OpOverload):
        packet, overload = fn._overloadpacket.__name__, fn._overloadname
        return packet if overload == "default" else f"{packet}.{overload}"
    return name


@attrs.frozen(kw_only=True)
class Nonlin(Instruction):
    """``fn(*args, **kwargs)`` evaluated coordinate by coordinate along the width axis.

    ``args`` / ``kwargs`` hold :class:`Ref` to earlier values, plain constants and width-dependent
    constants. ``fn`` receives tensors in their own layouts; it must not mix coordinates of the
    width axis (the lowering rule that emits it vouches for that).
    """

    fn: Callable = attrs.field(eq=False)
    args: tuple = ()
    kwargs: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(refs_in((self.args, self.kwargs))))

    def describe(self) -> str:
        return f"nonlin {format_call(self.fn, self.args, self.kwargs)}"


@attrs.frozen(kw_only=True)
class MatMul(Instruction):
    """``einsum(equation, W, x)``: the initial matrix ``W`` (or Wᵀ) applied to the vector ``x``.

    The equation contracts one width axis of the matrix with the width axis of ``x``. Fixed axes
    of ``W`` that also appear in ``x`` (kernel offsets) batch the product: one matrix per index.
    """

    matrix: str
    vector: str
    equation: str
    transposed: bool = False

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.matrix, self.vector)

    def describe(self) -> str:
        t = "ᵀ" if self.transposed else ""
        return f"matmul %{self.matrix}{t} @ %{self.vector}   [{self.equation}]"


@attrs.frozen(kw_only=True)
class Avg(Instruction):
    """The mean of ``vector`` over its width axis ``axis``, times ``scale`` (n·ratio for a sum)."""

    vector: str
    axis: int
    keepdim: bool = False
    scale: WidthPower | None = None

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.vector,)

    def describe(self) -> str:
        scale = f"{self.scale} · " if self.scale is not None else ""
        return f"{scale}avg(%{self.vector}, axis={self.axis}{', keepdim' if self.keepdim else ''})"


@attrs.frozen(kw_only=True)
class Regroup(Instruction):
    """A reshape of width axes through equal contiguous or interleaved blocks.

    Evaluated at finite width by ``fn(*args)`` (a view / split / cat with width-dependent sizes).
    ``block`` is the width ratio of the block space: the input's and the output's width axes are
    whole numbers of blocks of size ``block·n`` (heads split out of d_model: block = 1/heads), and
    the reshape only relabels blocks and fixed coordinates, never coordinates within a block.
    """

    fn: Callable = attrs.field(eq=False)
    args: tuple = ()
    kwargs: Mapping[str, Any] = attrs.field(factory=dict)
    block: Fraction = Fraction(1)

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(refs_in((self.args, self.kwargs))))

    def describe(self) -> str:
        return f"regroup {format_call(self.fn, self.args, self.kwargs)}   [blocks of {Width(self.block)}]"


# --------------------------------------------------------------------------------------------
# Parameter table
# --------------------------------------------------------------------------------------------


@attrs.frozen
class ParameterInfo:
    """How a parameter enters the program.

    ``kind`` is matrix / vector / scalar; ``width_axes`` the positions of its width axes and
    ``ratios`` their sizes relative to n; ``fixed_axes`` the other positions. ``fan_in_axes`` are the
    axes summed against the input where the parameter multiplies something (known from the op, not
    from the weight's shape — GPT-2 stores (in, out)); empty if it is never contracted (biases,
    gains, embedding tables).
    """

    name: str
    kind: str
    layout: Layout
    shape: tuple[int, ...]
    trainable: bool
    uses: tuple[str, ...] = ()
    fan_in_axes: tuple[int, ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def width_axes(self) -> tuple[int, ...]:
        return width_axes(self.layout)

    @property
    def ratios(self) -> tuple[Fraction, ...]:
        return tuple(self.layout[i].ratio for i in self.width_axes)

    @property
    def fixed_axes(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.layout)) if i not in self.width_axes)


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
    _by_name: dict[str, Instruction] = attrs.field(init=False, factory=dict, repr=False)

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

    # -- evaluation ----------------------------------------------------------------------------

    def replay(self, model: torch.nn.Module, *inputs: Any) -> Any:
        """Evaluate the program with ``model``'s own parameters (the finite-width assignment).

        ``model`` may be at any width of the family, not only the traced ones. The result has the
        structure of ``model(*inputs)`` and equals it up to floating-point rounding.
        """
        from tplimits.core.interpret import FiniteInterpreter

        return FiniteInterpreter.from_model(self, model).run(*inputs)

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
