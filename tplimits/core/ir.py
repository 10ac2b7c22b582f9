"""The Tensor Program IR: width-dependent quantities, instructions and the parameter table.

The instructions of the NE⊗OR⊤ language of Tensor Programs IVb (MATH.md §4.2, §7); the program
that holds them is :class:`tplimits.core.program.Program`, whose docstring explains the language.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from fractions import Fraction
from typing import Any, ClassVar

import attrs
import torch

# --------------------------------------------------------------------------------------------
# Width-dependent quantities
# --------------------------------------------------------------------------------------------


@attrs.frozen
class Proportional:
    """A size ``ratio · s`` for a scale s that a program leaves open: the width n (:class:`Width`) or the batch
    size b (:class:`tplimits.core.batch.BatchInt`)."""

    ratio: Fraction
    symbol: ClassVar[str] = "s"
    scale: ClassVar[str] = "scale"  # what s is, in words

    def whole(self, scale: int) -> int | None:
        """``ratio · scale``, or None where that is not a whole size."""
        size = self.ratio * scale
        return int(size) if size.denominator == 1 else None

    def __str__(self) -> str:
        return self.symbol if self.ratio == 1 else f"{_fmt_fraction(self.ratio)}{self.symbol}"


@attrs.frozen
class Width(Proportional):
    """A width axis of size ``ratio · n``."""

    symbol: ClassVar[str] = "n"
    scale: ClassVar[str] = "width"

    def size(self, n: int) -> int:
        size = self.whole(n)
        if size is None:
            raise ValueError(f"width {n} does not give an integer size for an axis of ratio {self.ratio}")
        return size


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


def format_layout(layout: Sequence[Any]) -> str:
    return "[" + ", ".join(str(axis) for axis in layout) + "]"


def common_scale(tensors: Iterable[tuple[str, Sequence[Any], torch.Tensor]], kind: type[Proportional], default: int,
                 error: type[Exception], hint: str = "") -> int:
    """The one scale s (the width, the batch size: ``kind``) at which every tensor has the shape of its layout:
    ``kind`` axes ``ratio·s`` entries, the others their fixed size. ``tensors``: (what it is, its layout, the
    tensor); ``default`` where none has a ``kind`` axis. A tensor that fits no scale raises ``error`` naming it
    and its axis (``hint``: what to check then)."""
    found: dict[int, str] = {}
    for what, layout, tensor in tensors:
        if tensor.dim() != len(layout):
            raise error(f"{what} has {tensor.dim()} axes but the program expects {len(layout)} "
                        f"({format_layout(layout)}){hint}")
        for axis, (spec, length) in enumerate(zip(layout, tensor.shape, strict=True)):
            if isinstance(spec, kind):
                scale = Fraction(length) / spec.ratio
                if scale.denominator != 1 or scale < 1:
                    raise error(f"{what} has {length} entries along axis {axis}, which the program sizes as {spec} "
                                f"({kind.symbol} the {kind.scale}): not a whole {kind.scale}{hint}")
                found.setdefault(int(scale), f"{what} axis {axis}")
            elif length != spec:
                raise error(f"{what} has size {length} along axis {axis}, which the program fixes at {spec} "
                            f"({format_layout(layout)}, {kind.symbol} the {kind.scale}){hint}")
    if len(found) > 1:
        raise error(f"the program's tensors disagree on the {kind.scale}: {found}")
    return next(iter(found), default)


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


def map_args(args: Any, leaf: Callable[[Any], Any]) -> Any:
    """``args`` (nested lists, tuples and dicts) with ``leaf`` applied to every other value in them."""
    if isinstance(args, list | tuple):
        return type(args)(map_args(a, leaf) for a in args)
    if isinstance(args, dict):
        return {k: map_args(v, leaf) for k, v in args.items()}
    return leaf(args)


def substitute(args: Any, values: Mapping[str, Any], n: int) -> Any:
    """Replace :class:`Ref` by ``values[name]`` and width-dependent constants by their value at n."""

    def leaf(value: Any) -> Any:
        if isinstance(value, Ref):
            return values[value.name]
        return value.resolve(n) if isinstance(value, WidthInt | WidthPower) else value

    return map_args(args, leaf)


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

    Facts about ``fn`` are declared by the rule that emits it and read from here, never recovered
    from its name:

    * ``smooth``: ``fn`` is continuously differentiable. ``False`` for kinks and jumps (relu, abs,
      clamp, comparisons, max over fixed axes): a derivative that jumps has a second derivative
      with a point mass, which per-particle autograd does not see.
    * ``width_scale``: the instruction multiplies scalars (attention logits) by its width-dependent
      constant argument. ``"default"``: the op's own default (sdpa's 1/√d_head), which a
      parametrization may set; ``"model"``: a constant written in the model's code, kept as it is.
    * ``differentiable``: ``False`` where the model cuts gradients (``.detach()``, the outputs of a
      ``torch.no_grad()`` region). ``fn`` is then the identity: the value, and how it depends on earlier
      values (which the limit's dots differentiate), are unchanged; only backpropagation stops here.
    * ``gaussian``: what ``fn`` does to Gaussian arguments, for the exact kernels of the NT limit
      (:mod:`tplimits.limit.exact`); ``None`` when undeclared. ``("affine", positions)``: jointly affine
      in the arguments at ``positions`` (``None``: every argument); ``("multilinear", positions)``: affine
      in each of them separately; ``("arc-cosine", k, scale, shift)``: ``scale·max(x, 0)^k + shift`` of its
      first argument (k = 0 is the unit step); ``("error function",)``; ``("quadrature",)``: a smooth
      function of its first argument alone, integrated numerically (quadrature).
    * ``kinks``: ``((point, size), ...)``: ``fn`` is continuous and coordinatewise in its first argument,
      and its derivative in it jumps by ``size`` at ``point`` (relu: ``((0.0, 1.0),)``); empty when
      undeclared. The pullback of that argument inherits the declaration: its *value* jumps there, by
      ``size`` times the cotangent, and the limit's autograd dots smooth the point mass this leaves in its
      derivative (:func:`tplimits.limit.kets.smoothed_jumps`).
    """

    fn: Callable = attrs.field(eq=False)
    args: tuple = ()
    kwargs: Mapping[str, Any] = attrs.field(factory=dict)
    smooth: bool = True
    width_scale: str | None = attrs.field(default=None, validator=attrs.validators.in_((None, "default", "model")))
    differentiable: bool = True
    gaussian: tuple | None = None
    kinks: tuple[tuple[float, float], ...] = ()

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(refs_in((self.args, self.kwargs))))

    def describe(self) -> str:
        cut = "" if self.differentiable else "  (no gradient)"
        return f"nonlin {format_call(self.fn, self.args, self.kwargs)}{cut}"


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
