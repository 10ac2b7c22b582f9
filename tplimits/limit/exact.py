"""Exact NNGP and NTK of the NT limit by Gaussian integrals, where closed forms (or quadrature) exist.

At initialization every vector of a program whose matrices are each used once in the forward pass is
a function of jointly Gaussian kets (Def 2.4.2): the outputs of the matrix products and the randomly
initialized vector parameters. :class:`ExactInterpreter` runs the forward half of the program on laws
instead of particles, at a width ``n`` that only enters through the abcd factors and the program's
width-dependent constants:

* a **Gaussian** vector is its mean and its coefficients on the independent Gaussian source families
  created so far (the width axis of its layout holds the sources; :class:`Metrics` their covariances), so
  sums and affine maps of Gaussians stay exact, correlations included;
* a declared **law** of one Gaussian (``Nonlin.gaussian``: arc-cosine for relu, its powers, the step and
  sign; the error function; quadrature for any other smooth function) has the closed-form
  moments of Cho & Saul and Williams, or two-dimensional quadrature;
* a **product** of two independent vectors by a bilinear function (a readout ``x ⊙ v``) has its moments
  from the two second-moment matrices (the smaller one factored);
* a **linear map** of a non-Gaussian vector over its fixed axes (pooling, unfolding patches) has ``L M Lᵀ``;
* a **matrix product** ``h = W x`` starts a source family with covariance ``n_in·s²·E[x xᵀ]``; a matrix
  with fixed axes (a convolution's offsets) is one independent matrix per offset.

Alongside, every vector carries its tangent: for each trained parameter and each place it entered, the
Gram ``Σ_e κ ∂z/∂θ_e ∂z/∂θ_e`` of a coordinate (``κ = lr_scale·grad_scale·multiplier²``),
the forward-mode recursion of the NTK (``Θ_h = κ_W n_in E[x xᵀ] + s² n_in Θ_x``, ``Θ_φ(g) = E[φ'φ']⊙Θ_g``).
Averages over width are readouts: their fluctuation ``√n`` times the mean of ``x ⊙ v`` gives the NNGP,
and the outputs' Jacobian in them (autograd through the scalar tail) gives the kernels of the outputs. Other
averages over width (a normalization's mean and variance) are numbers in the limit, the expectation of a
coordinate; they may set the coefficients of functions of random vectors, not reach the outputs.

Each contribution (the NNGP, each parameter's NTK) is a power of the width; :func:`exact_kernel` reads the
powers once per program from two widths and then runs the program once, the staying parameters' tangents
carried as one channel.

Anything else (attention, softmax, batch norm, regroupings, a matrix used twice, a nonlinear function of a
non-Gaussian vector) raises :class:`NotGaussian` naming the instruction; ``limit.kernel(path="auto")`` then
takes the Monte Carlo path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

import attrs
import torch
from torch.utils import _pytree as pytree

from tplimits.core.interpret import Interpreter
from tplimits.core.ir import (
    Avg,
    Constant,
    Instruction,
    MatMul,
    Nonlin,
    Parameter,
    Ref,
    Regroup,
    Width,
    WidthInt,
    WidthPower,
    map_args,
    refs_in,
    substitute,
    width_axes,
)
from tplimits.errors import Diverged, TplimitsError
from tplimits.limit.runs import digest
from tplimits.training.init import init_std, multiplier
from tplimits.training.optim import parameter_groups

QUADRATURE_RANGE = 9.0
"""The trapezoidal rule integrates over ``|z| ≤ 9`` standard deviations (the Gaussian weight beyond: 1e-18)."""
QUADRATURE_MAX_NODES = 601
QUADRATURE_CHUNK = 2**24
"""Function evaluations per block of the two-dimensional quadrature (128 MiB in float64)."""
STAYING = "(the parameters whose NTK stays in the limit)"
"""The tangent channel of every parameter known to keep its NTK in the limit: their sum is one recursion."""



class NotGaussian(TplimitsError):
    """The exact kernel path cannot integrate an instruction of the program (``instruction`` names it)."""

    def __init__(self, message: str, instruction: str = "") -> None:
        super().__init__(message)
        self.instruction = instruction


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@attrs.define
class Metrics:
    """The covariances of the Gaussian source families (first source → ``(size, block)``: the sources ``start ..
    start + size`` have covariance ``block``; ``None`` for the identity) and of the tangent channels (the
    same per channel). Families are independent; a matrix product's family is ``n_in·s²·E[x xᵀ]`` over the
    vector's entries, so no value needs a square root of a covariance (only a readout factors its small side)."""

    sources: dict[int, tuple[int, torch.Tensor | None]] = attrs.field(factory=dict)  # start: size, covariance
    channels: dict[tuple[str, str], torch.Tensor | None] = attrs.field(factory=dict)


Block = torch.Tensor | None
"""The coefficients of a vector on one source family or tangent channel, laid out as the vector with the width
axis holding the family's sources; ``None``: the identity, the family's sources being the vector's own entries
(a matrix product's output, and affine maps that leave it unchanged), whose Gram is the family's metric."""


@attrs.frozen
class Opaque:
    """A tangent channel whose coefficient is random (a trained gain ``w`` in ``y ⊙ w``: the tangent ``y ⊙ δw``):
    its Gram, and while the coefficient is still a Gaussian ``coefficient`` (``y``), the Gram's factor from the
    channel, ``structure``, with ``gram = E[c cᵀ] ⊙ structure`` — what a nonlinearity needs (its tangent Gram
    is ``E[φ'(g) c φ'(g') c'] ⊙ structure``, the coefficient correlated with the argument)."""

    gram: torch.Tensor
    coefficient: Gauss | None = None
    structure: torch.Tensor | None = None


@attrs.define
class Gauss:
    """A Gaussian vector: ``mean`` (its layout, width axis of size 1) plus its blocks ``coef`` on the source
    families of ``metrics`` it depends on (by first source); ``tangent`` maps a channel (parameter, origin) to
    the map from the channel's space to the value's entries (a block likewise), its Gram ``T·metric·Tᵀ``."""

    mean: torch.Tensor
    coef: dict[int, Block]
    tangent: dict[tuple[str, str], Block]
    axis: int
    metrics: Metrics
    opaque: dict[tuple[str, str], Opaque] = attrs.field(factory=dict)  # tangents with a random coefficient
    cache: dict[str, Any] = attrs.field(factory=dict, repr=False)  # its covariance and Grams, computed once


@attrs.define
class Mapped:
    """``law(g)`` coordinate by coordinate for a Gaussian ``g``; ``fn`` the function on a tensor (quadrature)."""

    law: tuple
    fn: Callable[[torch.Tensor], torch.Tensor] | None
    arg: Gauss
    axis: int
    differentiable: bool = True
    cache: dict[str, Any] = attrs.field(factory=dict, repr=False)


@attrs.define
class Product:
    """``fn(x, y)`` bilinear in two independent vectors."""

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    x: Any
    y: Any
    axis: int
    shape: tuple[int, ...]  # the full layout's sizes with the width axis of size 1
    differentiable: bool = True
    cache: dict[str, Any] = attrs.field(factory=dict, repr=False)
    shared: Structure | None = attrs.field(default=None, repr=False)  # as Linear's


@attrs.define
class Linear:
    """``fn(x)`` linear in one non-Gaussian vector ``x`` (pooling a nonlinearity's output, unfolding patches)."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    arg: Any
    axis: int
    shape: tuple[int, ...]  # the full layout's sizes with the width axis of size 1
    differentiable: bool = True
    cache: dict[str, Any] = attrs.field(factory=dict, repr=False)
    shared: Structure | None = attrs.field(default=None, repr=False)  # where its map's copies are kept across runs


@attrs.define
class OffsetTerms:
    """A convolution's product before its sum over the kernel offsets (``h = W_o x_o`` per offset o, ``x``
    copying entries of ``base``): ``index`` and ``offset`` give, for each entry of h, the entry of ``base`` it
    reads (-1: zero padding) and its offset; ``shape``, ``axis``: h's layout with width 1. Its one reader
    either sums the offsets (:meth:`ExactInterpreter._offset_sum`) or has the generic product formed."""

    product: MatMul
    base: Any
    differentiable: bool
    index: torch.Tensor
    offset: torch.Tensor
    shape: tuple[int, ...]
    axis: int


Random = Gauss | Mapped | Product | Linear
RANDOM = (Gauss, Mapped, Product, Linear)


@attrs.define
class Structure:
    """What the exact path finds about one instruction's function that depends only on the program, the width
    and the inputs' shapes, never on the inputs' values (which entries a linear map copies, whether it leaves an
    argument unchanged, a convolution's offsets): found on the first run and kept for the next (``facts``). Only
    instructions whose arguments are all random values (or matrices) have one: another argument (the inputs,
    a normalization's statistics) could change the function between runs."""

    name: str
    facts: dict[Any, Any] = attrs.field(factory=dict)

    def get(self, key: Any, find: Callable[[], Any]) -> Any:
        if key not in self.facts:
            self.facts[key] = find()
        return self.facts[key]


_STRUCTURE: list = []  # [setup, {(n, dtype, device, input shapes) or (): {instruction: Structure}}] of the last program


def _structures(setup: Any, key: tuple) -> dict[str, Structure]:
    """The :class:`Structure` of each instruction of the last program run at ``key`` (``()``: facts of the program
    alone, such as the instructions' inputs and their arguments at a width)."""
    if not (_STRUCTURE and _STRUCTURE[0] is setup):
        _STRUCTURE[:] = [setup, {}]
    return _STRUCTURE[1].setdefault(key, {})


@attrs.define
class Workspace:
    """``[F, F]`` buffers of one program run at one width, dtype, device and inputs' shapes, kept between runs:
    a fresh tensor of that size costs page faults about as much as a pass over it (the allocator returns its
    memory to the system between calls). Each run deals its buffers out in turn, each at most once per run;
    whatever a run returns is copied before it leaves this module (:func:`exact_kernel`), and the last kernels
    kept (``_LAST``) are forgotten before a run, so no value of an earlier run is read after its buffer is dealt."""

    buffers: dict[tuple, list[torch.Tensor]] = attrs.field(factory=dict)
    dealt: dict[tuple, int] = attrs.field(factory=dict)
    size: int = 0  # bytes kept
    constants: dict[tuple, Any] = attrs.field(factory=dict)  # made once: an identity, a Jacobian's map

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        key = (tuple(shape), like.dtype, str(like.device))
        kept, i = self.buffers.setdefault(key, []), self.dealt.get(key, 0)
        if i == len(kept):
            new = torch.empty(shape, dtype=like.dtype, device=like.device)
            if self.size + new.nbytes > WORKSPACE_BYTES:  # held between calls: large sizes are not kept
                return new
            self.size += new.nbytes
            kept.append(new)
        self.dealt[key] = i + 1
        return kept[i]


WORKSPACE_BYTES = 2**28
"""The most a :class:`Workspace` keeps between runs (every buffer of a run stays alive until the run ends, and the
workspace until the next program): beyond it, values are allocated as usual."""
_WORKSPACE: list = []  # [setup, {run key: Workspace}] of the last program; [] outside a run that uses one
_ACTIVE: list[Workspace] = []  # the workspace of the run under way, if it has one


def _buffer(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialized tensor of ``shape``: from the run's :class:`Workspace` when it has one, else new."""
    if _ACTIVE:
        return _ACTIVE[0].take(shape, like)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _workspace(setup: Any, key: tuple) -> Workspace:
    if not (_WORKSPACE and _WORKSPACE[0] is setup):
        _WORKSPACE[:] = [setup, {}]
    space = _WORKSPACE[1].setdefault(key, Workspace())
    space.dealt.clear()
    return space


def _fixed_flat(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``[F, columns]``: the fixed entries of a layout-shaped tensor by the columns on its width axis."""
    moved = t.movedim(axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def _unflat(flat: torch.Tensor, shape: tuple[int, ...], axis: int) -> torch.Tensor:
    """The inverse of :func:`_fixed_flat` for a layout of sizes ``shape`` (width axis entry ignored)."""
    fixed = [s for i, s in enumerate(shape) if i != axis]
    return flat.reshape(*fixed, flat.shape[-1]).movedim(-1, axis)


def _factor(M: torch.Tensor) -> torch.Tensor:
    """``Φ`` with ``Φ Φᵀ = M`` for a positive semi-definite ``M`` (negative rounding noise dropped)."""
    if not bool(torch.isfinite(M).all()):
        raise Diverged("the exact kernel path met non-finite second moments at initialization (inputs or "
                       "parameters too large for the dtype); use float64 or smaller inputs", value="kernel")
    M = (M + M.T) / 2
    evals, evecs = torch.linalg.eigh(M)
    return evecs * evals.clamp_min(0).sqrt()


def _pad(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    if t.shape[axis] == size:
        return t
    pad = list(t.shape)
    pad[axis] = size - t.shape[axis]
    return torch.cat([t, t.new_zeros(pad)], dim=axis)


def _block_size(value: Gauss, block: Block) -> int:
    """The columns of a block (the size of its family or channel space)."""
    return value.mean.numel() if block is None else block.shape[value.axis]


def _sources(value: Random) -> set[int]:
    """The Gaussian sources a value depends on (nonzero coefficient columns)."""
    if isinstance(value, Gauss):
        found: set[int] = set()
        for start, block in value.coef.items():
            if block is None:
                found.update(range(start, start + value.metrics.sources[start][0]))
            else:
                used = _fixed_flat(block, value.axis).abs().sum(0) > 0
                found.update(start + i for i in torch.nonzero(used).flatten().tolist())
        return found
    if isinstance(value, Mapped | Linear):
        return _sources(value.arg)
    return _sources(value.x) | _sources(value.y)


def _channels(value: Random) -> set[tuple[str, str]]:
    if isinstance(value, Gauss):
        return set(value.tangent) | set(value.opaque)
    if isinstance(value, Mapped):
        return set(value.arg.tangent) if value.differentiable else set()
    if isinstance(value, Linear):
        return _channels(value.arg) if value.differentiable else set()
    return _channels(value.x) | _channels(value.y) if value.differentiable else set()


# --------------------------------------------------------------------------------------------
# Moments
# --------------------------------------------------------------------------------------------


def mean_of(value: Random) -> torch.Tensor:
    """``E[z]`` over the fixed entries, ``[F]``."""
    if isinstance(value, Gauss):
        return _fixed_flat(value.mean, value.axis)[:, 0]
    if isinstance(value, Mapped):
        g = value.arg
        return law_mean(value.law, value.fn, mean_of(g), _covariance(g).diagonal())
    if isinstance(value, Linear):
        return _fixed_flat(value.fn(_unflat(mean_of(value.arg)[:, None], _layout_shape(value.arg),
                                            value.arg.axis)), value.axis)[:, 0]
    x = _unflat(mean_of(value.x)[:, None], _layout_shape(value.x), value.x.axis)
    y = _unflat(mean_of(value.y)[:, None], _layout_shape(value.y), value.y.axis)
    return _fixed_flat(value.fn(x, y), value.axis)[:, 0]


def _gram_sum(g: Gauss, blocks: Mapping[Any, Block], metric_of: Callable[[Any], torch.Tensor | None]) -> torch.Tensor:
    """``Σ T metric Tᵀ`` over ``blocks`` (``T Tᵀ`` for the identity metric; the metric itself for ``T = I``). The
    sum is accumulated in place once it is a tensor made here (never into a metric, which other values read)."""
    F = g.mean.numel()
    total, owned = None, False
    for key, block in blocks.items():
        metric = metric_of(key)
        if block is None:
            part = metric if metric is not None else torch.eye(F, dtype=g.mean.dtype, device=g.mean.device)
            total, owned = (part, metric is None) if total is None else (
                total.add_(part) if owned else torch.add(total, part, out=_buffer(part.shape, part)), True)
            continue
        T = _fixed_flat(block, g.axis)
        if metric is not None:
            part = _congruence(T, metric)
            total = part if total is None else total.add_(part) if owned else torch.add(total, part,
                                                                                       out=_buffer(part.shape, part))
        elif total is None:
            total = torch.mm(T, T.T, out=_buffer((F, F), T))
        elif T.shape[1] == 1:  # one source (a bias): a rank-one update, far cheaper than a product of width 1
            total = total.addr_(T[:, 0], T[:, 0]) if owned else torch.addr(total, T[:, 0], T[:, 0],
                                                                           out=_buffer(total.shape, total))
        else:
            total = total.addmm_(T, T.T) if owned else torch.addmm(total, T, T.T, out=_buffer(total.shape, total))
        owned = True
    return total if total is not None else g.mean.new_zeros(F, F)


SPARSE_FRACTION = 1 / 16
"""A block with at most this fraction of nonzero entries is multiplied as a sparse matrix."""


def _congruence(T: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """``T metric Tᵀ``; a sparse ``T`` (sums over a few entries: a convolution's offsets, pooling, slices) as
    a sparse matrix, two products of its nonzeros instead of two dense ones."""
    if T.numel() >= 2**16 and int(torch.count_nonzero(T)) <= SPARSE_FRACTION * T.numel():
        sparse = T.to_sparse()
        return torch.sparse.mm(sparse, torch.sparse.mm(sparse, metric).T)  # metric symmetric
    return torch.mm(T @ metric, T.T, out=_buffer((T.shape[0], T.shape[0]), T))


def _covariance(g: Gauss) -> torch.Tensor:
    if "covariance" not in g.cache:
        g.cache["covariance"] = _gram_sum(g, g.coef, lambda start: g.metrics.sources[start][1])
    return g.cache["covariance"]


def second_moment(value: Random) -> torch.Tensor:
    """``E[z(a) z(b)]`` over the fixed entries, ``[F, F]`` (not centered); computed once per value."""
    if "second moment" not in value.cache:
        value.cache["second moment"] = _second_moment(value)
    return value.cache["second moment"]


def _second_moment(value: Random) -> torch.Tensor:
    if isinstance(value, Gauss):
        mu = mean_of(value)
        return torch.outer(mu, mu, out=_buffer((len(mu), len(mu)), mu)).add_(_covariance(value))
    if isinstance(value, Mapped):
        g = value.arg
        return law_moment(value.law, value.fn, mean_of(g), _covariance(g), g.cache)
    if isinstance(value, Linear):
        return _sandwich(value.fn, second_moment(value.arg), value.arg, value.axis)
    return _bilinear(value, second_moment(value.x), second_moment(value.y))


def _sandwich(fn: Callable[[torch.Tensor], torch.Tensor], M: torch.Tensor, arg: Random, axis: int) -> torch.Tensor:
    """``L M Lᵀ`` for the linear map ``L = fn`` from ``arg``'s entries to the result's (width axis ``axis``):
    ``fn`` on the columns of ``M``, then on the columns of the transpose."""
    shape = _layout_shape(arg)
    half = _fixed_flat(fn(_unflat(M, shape, arg.axis)), axis)
    return _fixed_flat(fn(_unflat(half.T.contiguous(), shape, arg.axis)), axis)


def _bilinear(value: Product, Mx: torch.Tensor, My: torch.Tensor) -> torch.Tensor:
    """``E[fn(x, y)(a) fn(x, y)(b)]`` for independent x, y with second moments (or Grams) ``Mx``, ``My``: the
    side with fewer entries is factored, ``Σ_l L_l M L_lᵀ`` over its factor's columns on the other side. A side
    of one entry (one output's readout weight) is a number the map is linear in: the sandwich of the other
    side under the unit map is found once per matrix and scaled."""
    x_small = Mx.shape[0] < My.shape[0]
    small, big = (Mx, My) if x_small else (My, Mx)
    if small.shape != (1, 1):
        return _factored(value, big, _factor(small), x_small)
    found = [part for seen, part in value.cache.setdefault("unit", []) if seen is big]
    if not found:
        copies = _unit_copies(value, x_small, big)
        found = [_copied_moment(big, copies) if copies is not None else _factored(value, big, torch.ones_like(small),
                                                                                    x_small)]
        value.cache["unit"].append((big, found[0]))
    return _times(float(small[0, 0]), found[0])


def _fixed_side(value: Product, column: torch.Tensor, x_small: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The bilinear function as a linear map of its large side, the small side fixed at ``column`` (its entries)."""
    big_value, small_value = (value.y, value.x) if x_small else (value.x, value.y)
    fixed = _unflat(column, _layout_shape(small_value), small_value.axis)

    def fn(t: torch.Tensor) -> torch.Tensor:
        sizes = [t.shape[big_value.axis] if i == small_value.axis else s for i, s in enumerate(fixed.shape)]
        return value.fn(fixed.expand(*sizes), t) if x_small else value.fn(t, fixed.expand(*sizes))
    return fn


def _factored(value: Product, big: torch.Tensor, factor: torch.Tensor, x_small: bool) -> torch.Tensor:
    """``Σ_l L_l big L_lᵀ``, ``L_l`` the bilinear function with the small side fixed at the factor's column l."""
    big_value = value.y if x_small else value.x
    total = None
    for column in range(factor.shape[1]):
        part = _sandwich(_fixed_side(value, factor[:, column: column + 1], x_small), big, big_value, value.axis)
        total = part if total is None else total + part
    return total if total is not None else big.new_zeros(1, 1)


def _unit_copies(value: Product, x_small: bool, big: torch.Tensor) -> torch.Tensor | None:
    """When the small side has one entry (one output's readout weight) and the map at a unit weight only copies
    the large side's entries (``x ⊙ v`` summed over nothing else): the entry each output entry copies, as
    :func:`_copied_entries`; the sandwich is then an index of the second moment, no product formed."""
    big_value = value.y if x_small else value.x
    column = torch.ones(1, 1, dtype=big.dtype, device=big.device)
    shared = None if value.shared is None else value.shared.get(("unit", x_small), lambda: Structure(value.shared.name))
    return _copied_entries(Linear(_fixed_side(value, column, x_small), big_value, value.axis, value.shape,
                                  shared=shared))


def _copied_moment(M: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``M[index][:, index]`` with zeros at index -1: ``M`` itself for the identity (nothing writes into it after)."""
    if index.numel() == M.shape[0] and torch.equal(index, torch.arange(M.shape[0], device=index.device)):
        return M
    padded = torch.nn.functional.pad(M, (0, 1, 0, 1))
    at = torch.where(index >= 0, index, M.shape[0])
    return padded.index_select(0, at).index_select(1, at)


def _copied_entries(value: Linear) -> torch.Tensor | None:
    """``[F]``: the entry of ``value.arg`` each entry of ``value`` copies (-1: a zero), when its linear map only
    copies entries and writes zeros (unfolding patches with zero padding, slicing, reordering); ``None`` otherwise.
    Read from the map on the entries' numbers and checked on a random vector (another linear map agrees with the
    copy there with probability zero)."""
    if "copied" not in value.cache:
        find = lambda: _find_copies(value)  # noqa: E731
        value.cache["copied"] = find() if value.shared is None else value.shared.get("copied", find)
    return value.cache["copied"]


def _find_copies(value: Linear) -> torch.Tensor | None:
    arg = value.arg
    shape, like = _layout_shape(arg), _like(arg)
    F = math.prod(s for i, s in enumerate(shape) if i != arg.axis)
    copied = None
    if F < 1 / torch.finfo(like.dtype).eps:  # every entry's number exact in the dtype
        numbers = torch.arange(1, F + 1, dtype=like.dtype, device=like.device)
        read = _fixed_flat(value.fn(_unflat(numbers[:, None], shape, arg.axis)), value.axis)[:, 0]
        if bool((read == read.round()).all()) and bool(((read >= 0) & (read <= F)).all()):
            index = read.long() - 1
            probe = torch.randn(F, generator=torch.Generator().manual_seed(0), dtype=like.dtype).to(numbers.device)
            image = _fixed_flat(value.fn(_unflat(probe[:, None], shape, arg.axis)), value.axis)[:, 0]
            if torch.equal(image, torch.where(index >= 0, probe[index.clamp_min(0)], torch.zeros_like(image))):
                copied = index
    return copied


Reducer = Callable[..., torch.Tensor]
"""``(B, scale, plus=None, alpha=1) ↦ scale · Σ_o C[idx_o, idx_o]`` for ``C = B + alpha·plus``."""


def _shift_reducer(per_offset: torch.Tensor, F: int, rows: int) -> Reducer:
    """The :data:`Reducer` of ``per_offset = [idx_o]`` (-1: a zero). When each input row's entries read only its
    own row's (``idx = row·P + p_o(l)``, the same ``p_o`` in every row: a convolution of each input separately),
    the sum is one linear map on each pair of rows' ``[P, P]`` block, ``K = Σ_o S_o ⊗ S_o`` of ``[L², P²]``
    (neural-tangents' convolution of the covariance); else gathers."""
    offsets, R = per_offset.shape
    if F % rows == 0 and R % rows == 0:
        P, L = F // rows, R // rows
        first = per_offset[:, :L]
        row = torch.arange(rows, device=per_offset.device).repeat_interleave(L)[None, :]
        shifted = torch.where(first >= 0, first, 0).repeat(1, rows) + row * P
        if bool((first < P).all()) and torch.equal(per_offset, torch.where(first.repeat(1, rows) >= 0, shifted, -1)):
            return _blockwise_reducer(first, P, rows)
    padded_index = torch.where(per_offset >= 0, per_offset, F)  # the zero row and column appended

    def gathered(B: torch.Tensor, scale: float, plus: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
        padded = torch.nn.functional.pad(B if plus is None else torch.add(B, plus, alpha=alpha), (0, 1, 0, 1))
        total = None
        for index in padded_index:
            part = padded.index_select(0, index).index_select(1, index)
            total = part if total is None else total.add_(part)
        return total if scale == 1 else total.mul_(scale)
    return gathered


def _blockwise_reducer(first: torch.Tensor, P: int, rows: int) -> Reducer:
    """The reduction of :func:`_shift_reducer` on each pair of rows: ``[rows·P]² → [rows·L]²`` through the
    ``[L², P²]`` matrix ``K`` (sparse when large and mostly zero: large images), its entries the scale. The
    blocks are gathered into one buffer (``plus`` added there), and the result written back into it when the
    sizes agree: at large sizes a fresh tensor costs about as much as a pass over it."""
    offsets, L = first.shape
    ls = torch.arange(L, device=first.device)
    out_rows, in_cols = [], []
    for index in first:
        valid = ls[index >= 0]
        p = index[valid]
        out_rows.append((valid[:, None] * L + valid[None, :]).reshape(-1))
        in_cols.append((p[:, None] * P + p[None, :]).reshape(-1))
    entries = torch.stack([torch.cat(out_rows), torch.cat(in_cols)])
    # a dense K while small (a product of BLAS speed; a sparse one is far slower per entry), else sparse
    sparse = L * L * P * P > 2**20 and entries.shape[1] <= SPARSE_FRACTION * L * L * P * P
    kernels: dict[tuple, torch.Tensor] = {}

    def kernel(like: torch.Tensor, scale: float) -> torch.Tensor:
        key = (like.dtype, str(like.device), scale)
        if key not in kernels:
            values = torch.full((entries.shape[1],), scale, dtype=like.dtype, device=like.device)
            K = torch.sparse_coo_tensor(entries.to(like.device), values, (L * L, P * P), check_invariants=True)
            kernels[key] = K.coalesce() if sparse else K.to_dense().T.contiguous()
        return kernels[key]

    def blockwise(B: torch.Tensor, scale: float, plus: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
        buffer = _buffer((rows, rows, P, P), B)
        buffer.copy_(B.reshape(rows, P, rows, P).permute(0, 2, 1, 3))
        if plus is not None:
            buffer.add_(plus.reshape(rows, P, rows, P).permute(0, 2, 1, 3), alpha=alpha)
        blocks = buffer.reshape(rows * rows, P * P)
        out = torch.sparse.mm(kernel(B, scale), blocks.T).T if sparse else blocks @ kernel(B, scale)
        out = out.reshape(rows, rows, L, L).permute(0, 2, 1, 3)
        if L != P:
            return out.reshape(rows * L, rows * L)
        return buffer.view(rows, L, rows, L).copy_(out).view(rows * L, rows * L)
    return blockwise


def _like(value: Random) -> torch.Tensor:
    """A tensor of the value's dtype and device, found without computing any moment."""
    if isinstance(value, Gauss):
        return value.mean
    return _like(value.x) if isinstance(value, Product) else _like(value.arg)


def _layout_shape(value: Random) -> tuple[int, ...]:
    if isinstance(value, Gauss):
        return tuple(value.mean.shape)
    if isinstance(value, Mapped):
        return tuple(value.arg.mean.shape)
    return value.shape


def _plain_grams(g: Gauss) -> dict[str, torch.Tensor]:
    """The tangent Grams per parameter of the channels with deterministic maps (not :class:`Opaque`)."""
    by_param: dict[str, dict] = {}
    for key, T in g.tangent.items():
        by_param.setdefault(key[0], {})[key] = T
    return {param: _gram_sum(g, blocks, g.metrics.channels.get) for param, blocks in by_param.items()}


def _same_gaussian(a: Gauss, b: Gauss) -> bool:
    """The same random vector: equal means and equal blocks on the same families."""
    if a is b:
        return True
    if a.mean.shape != b.mean.shape or not torch.equal(a.mean, b.mean) or set(a.coef) != set(b.coef):
        return False
    return all((a.coef[k] is None and b.coef[k] is None) or (a.coef[k] is not None and b.coef[k] is not None
                                                              and torch.equal(a.coef[k], b.coef[k])) for k in a.coef)


def _times_argument(law: tuple, fn: Callable | None) -> tuple[tuple, Callable | None]:
    """The law of ``φ'(u)·u`` for the law of ``φ``: ``k·φ`` for a power of relu, else quadrature."""
    if law[0] == "arc-cosine" and law[3] == 0:
        _, k, scale, _ = law
        return (("zero",) if k == 0 else ("arc-cosine", k, k * scale, 0.0)), None
    prime = _derivative_fn(fn)
    return ("quadrature",), (None if prime is None else (lambda t: prime(t) * t))


def _times(scale: float, M: torch.Tensor) -> torch.Tensor:
    """``scale · M``, ``M`` itself for a unit scale (NTP's ``s²n`` and ``κn``); nothing writes into it after."""
    return M if scale == 1 else scale * M


def _weighted_grams(x: Random) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """``(weight, grams)`` with ``weight ⊙ gram`` the tangent Grams of ``x`` per parameter: for ``φ(g)`` (no
    tangent with a random coefficient) the law's ``E[φ'φ']`` and ``g``'s Grams, so that a matrix product fuses
    the product into its sum; else ``None`` and the Grams."""
    if isinstance(x, Mapped) and x.differentiable and not x.arg.opaque:
        g = x.arg
        weight = law_moment(derivative(x.law), _derivative_fn(x.fn), mean_of(g), _covariance(g), g.cache)
        return weight, tangent_grams(g)
    return None, tangent_grams(x)


def tangent_grams(value: Random) -> dict[str, torch.Tensor]:
    """``E Σ_θ-channel κ ⟨∂z(a)/∂θ, ∂z(b)/∂θ⟩`` per trained parameter, ``[F, F]`` each."""
    if isinstance(value, Gauss):  # the channels of a parameter summed as they are formed
        if "parameter grams" not in value.cache:
            grams = _plain_grams(value)
            for (param, _), channel in value.opaque.items():
                grams[param] = grams[param] + channel.gram if param in grams else channel.gram
            value.cache["parameter grams"] = grams
        return value.cache["parameter grams"]
    out: dict[str, torch.Tensor] = {}
    for (param, _), gram in _channel_grams(value).items():
        out[param] = out[param] + gram if param in out else gram
    return out


def _channel_grams(value: Mapped | Linear | Product) -> dict[tuple[str, str], torch.Tensor]:
    """The tangent Grams of a value that is not Gaussian, by (parameter, part)."""
    if not value.differentiable:
        return {}
    # below a Gaussian the channels of a parameter are summed first: a law's weight, a linear map and a
    # bilinear function act on their sum
    if isinstance(value, Mapped):
        g = value.arg
        weight = law_moment(derivative(value.law), _derivative_fn(value.fn), mean_of(g), _covariance(g), g.cache)
        if not g.opaque:
            return {(param, ""): torch.mul(weight, gram, out=_buffer(gram.shape, gram))
                    for param, gram in tangent_grams(g).items()}
        grams = {(param, ""): torch.mul(weight, gram, out=_buffer(gram.shape, gram))
                 for param, gram in _plain_grams(g).items()}
        # the coefficient is g itself (checked where the law was applied): E[φ'(g) g φ'(g') g'] ⊙ structure
        law, fn = _times_argument(value.law, value.fn)
        moment = law_moment(law, fn, mean_of(g), _covariance(g), g.cache)
        for key, channel in g.opaque.items():
            grams[key] = moment * channel.structure
        return grams
    if isinstance(value, Linear):
        return {(param, ""): _sandwich(value.fn, gram, value.arg, value.axis)
                for param, gram in tangent_grams(value.arg).items()}
    grams = {}
    Mx, My = second_moment(value.x), second_moment(value.y)
    for param, gram in tangent_grams(value.x).items():
        grams[(param, "x")] = _bilinear(value, gram, My)
    for param, gram in tangent_grams(value.y).items():
        grams[(param, "y")] = _bilinear(value, Mx, gram)
    return grams


# --------------------------------------------------------------------------------------------
# Laws of one Gaussian
# --------------------------------------------------------------------------------------------


def derivative(law: tuple) -> tuple:
    kind = law[0]
    if kind == "arc-cosine":
        _, k, scale, _ = law
        return ("zero",) if k == 0 else ("arc-cosine", k - 1, scale * k, 0.0)
    if kind == "error function":
        return ("bump", 2 / math.sqrt(math.pi))
    if kind == "quadrature":
        return ("quadrature",)
    raise TplimitsError(f"no derivative law for {law}")  # pragma: no cover - laws above are closed


def _derivative_fn(fn: Callable | None) -> Callable | None:
    if fn is None:
        return None

    def grad(t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = t.detach().requires_grad_(True)
            return torch.autograd.grad(fn(x).sum(), x)[0]
    return grad


def _angle(S: torch.Tensor, cache: dict | None = None, sine: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``((π − θ)/2π, |u||v| sin θ / 2π)`` for the angle θ between (u, v) ~ N(0, S) entrywise, θ by atan2
    (``arccos(1 − ε) ≈ √(2ε)`` would lose half the digits near θ = 0). The first is the step's law itself, the
    second relu's first term; kept in ``cache`` (a Gaussian's), which relu and its step both read. Each pass
    writes into a buffer made here (at large sizes a fresh tensor costs about as much as a pass over it)."""
    if cache is not None and "step" in cache and ("sine" in cache or not sine):
        return cache["step"], cache.get("sine")
    var = S.diagonal().clamp_min(0)
    norms2 = torch.outer(var, var, out=_buffer(S.shape, S))
    # not fused (addcmul): the diagonal's var·var − var·var must round to exactly 0
    cross = torch.mul(S, S, out=_buffer(S.shape, S))
    _sqrt_nonnegative(torch.sub(norms2, cross, out=cross), norms2)
    step = torch.atan2(cross, S, out=norms2)  # the norms are not read again
    torch.sub(_scalar(0.5, step), step, alpha=1 / (2 * math.pi), out=step)
    cross.mul_(1 / (2 * math.pi))
    if cache is not None:
        cache["step"], cache["sine"] = step, cross
    return step, cross


def _sqrt_nonnegative(x: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
    """``√max(x, 0)`` written into ``x`` (``spare``, a tensor of its shape, overwritten) as ``x⁺·max(x, tiny)^-½``:
    torch's float64 ``sqrt`` on CPU takes about three times as long as its ``rsqrt`` and a product (0.87 against
    0.30 + 0.05 ms on 512 × 512, one thread), within 2 ulp of it. An exact zero (the diagonal's) stays zero:
    ``0·tiny^-½``; a NaN stays NaN."""
    torch.clamp_min(x, 0, out=spare)
    return x.clamp_min_(torch.finfo(x.dtype).tiny).rsqrt_().mul_(spare)


_SCALARS: dict[tuple, torch.Tensor] = {}


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-dimensional tensor of ``like``'s dtype and device, made once (an operand where torch takes no number)."""
    key = (value, like.dtype, str(like.device))
    if key not in _SCALARS:
        _SCALARS[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return _SCALARS[key]


def _arc_cosine_raw(k: int, S: torch.Tensor, cache: dict | None = None, scale: float = 1.0) -> torch.Tensor:
    """``scale · E[max(u,0)^k max(v,0)^k]`` for (u, v) ~ N(0, S) entrywise (Cho & Saul), written with
    ``|u||v| cos θ = S`` and ``|u||v| sin θ`` so that no cosine, sine or division is taken. A unit ``scale``
    (relu) returns the step's law as computed for the angle: nothing writes into a law's moments after."""
    if k not in (0, 1, 2):
        raise TplimitsError(f"arc-cosine law of power {k}: only powers 0, 1, 2 have closed forms here")
    step, cross = _angle(S, cache, sine=k > 0)  # (π − θ)/2π and |u||v| sin θ / 2π
    if k == 0:  # a zero-variance side is 0, whose step is 0
        positive = S.diagonal() > 0
        if not bool(positive.all()):
            step = torch.where(positive[:, None] & positive[None, :], step, torch.zeros_like(step))
        return _times(scale, step)
    if k == 1:  # scale·(|u||v| sin θ + (π − θ) S) / 2π, written over the sine term, which leaves the cache
        if cache is not None:  # (relu's moment is kept as its value's second moment; asked again, it is redone)
            del cache["sine"]
        moment = cross.addcmul_(step, S)
        return moment if scale == 1 else moment.mul_(scale)
    var = S.diagonal().clamp_min(0)
    return (3 * cross * S + step * (torch.outer(var, var) + 2 * S * S)) * scale


def _arc_cosine_mean(k: int, var: torch.Tensor) -> torch.Tensor:
    """``E[max(u,0)^k]``, u ~ N(0, var)."""
    sd = var.clamp_min(0).sqrt()
    base = {0: 0.5, 1: 1 / math.sqrt(2 * math.pi), 2: 0.5}[k]
    return torch.where(sd > 0, sd**k * base, torch.zeros_like(sd))


def law_mean(law: tuple, fn: Callable | None, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``E[φ(g)]`` for g ~ N(mu, var) entrywise."""
    kind = law[0]
    centered = bool((mu == 0).all())
    if kind == "arc-cosine" and centered:
        _, k, scale, shift = law
        return scale * _arc_cosine_mean(k, var) + shift
    if kind == "error function" and centered:
        return torch.zeros_like(var)
    if kind == "bump" and centered:
        return law[1] / torch.sqrt(1 + 2 * var)
    if kind == "zero":
        return torch.zeros_like(var)
    return _quadrature_mean(_need_fn(law, fn), mu, var)


def law_moment(law: tuple, fn: Callable | None, mu: torch.Tensor, S: torch.Tensor,
               cache: dict | None = None) -> torch.Tensor:
    """``E[φ(g(a)) φ(g(b))]`` for g ~ N(mu, S), ``[F, F]``; ``cache``: the Gaussian's, for what the laws of
    one argument share (the arc-cosine angle)."""
    kind = law[0]
    centered = bool((mu == 0).all())
    if kind == "arc-cosine" and centered:
        _, k, scale, shift = law
        raw = _arc_cosine_raw(k, S, cache, scale**2)
        if shift == 0:
            return raw
        m = _arc_cosine_mean(k, S.diagonal())
        return raw + scale * shift * (m[:, None] + m[None, :]) + shift**2
    d = 1 + 2 * S.diagonal()
    if kind == "error function" and centered:
        return 2 / math.pi * torch.arcsin((2 * S / torch.sqrt(torch.outer(d, d))).clamp(-1, 1))
    if kind == "bump" and centered:
        return law[1] ** 2 / torch.sqrt(torch.outer(d, d) - 4 * S**2)
    if kind == "zero":
        return torch.zeros_like(S)
    return _quadrature_moment(_need_fn(law, fn), mu, S)


def _need_fn(law: tuple, fn: Callable | None) -> Callable:
    if fn is None:
        raise NotGaussian(f"the law {law} has no closed form for a Gaussian with a nonzero mean, and no function "
                          "to integrate numerically")
    return fn


def _nodes(sd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights for E over N(0, 1) of ``f(σ z)``, σ up to ``max(sd)``: the trapezoidal rule, which
    converges like ``exp(-2π d / h)`` for a function analytic in a strip of half-width ``d`` (Gauss–Hermite
    converges slowly when poles are near: tanh's at ``iπ/2σ``). The step makes that ``exp(-36)`` for poles at
    ``π/(2σ)`` (tanh, sigmoid; softplus and silu are farther, entire functions better)."""
    sigma = max(float(sd.max()) if sd.numel() else 1.0, 1e-3)
    step = min(0.25, math.pi**2 / (36 * sigma))
    count = min(QUADRATURE_MAX_NODES, 2 * math.ceil(QUADRATURE_RANGE / step) + 1)
    z = torch.linspace(-QUADRATURE_RANGE, QUADRATURE_RANGE, count, dtype=sd.dtype, device=sd.device)
    w = torch.exp(-z**2 / 2)
    return z, w / w.sum()


def _quadrature_mean(fn: Callable, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    sd = var.clamp_min(0).sqrt()
    z, w = _nodes(sd)
    return (fn(mu[:, None] + sd[:, None] * z) * w).sum(-1)


def _quadrature_moment(fn: Callable, mu: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Two-dimensional quadrature: u = μa + L11 z1, v = μb + L21 z1 + L22 z2 per pair (a, b); the result is
    symmetrized (the two orders of a pair differ by the rule's error)."""
    sd = S.diagonal().clamp_min(0).sqrt()
    z, w = _nodes(sd)
    fu = fn(mu[:, None] + sd[:, None] * z)  # [F, Q]
    out = torch.empty_like(S)
    chunk = max(1, QUADRATURE_CHUNK // (S.shape[0] * z.numel() ** 2))
    for start in range(0, S.shape[0], chunk):
        rows = slice(start, start + chunk)
        safe = torch.where(sd[rows] > 0, sd[rows], torch.ones_like(sd[rows]))
        l21 = torch.where(sd[rows, None] > 0, S[rows] / safe[:, None], torch.zeros_like(S[rows]))  # [c, F]
        l22 = (S.diagonal()[None, :] - l21**2).clamp_min(0).sqrt()
        v = mu[None, :, None, None] + l21[..., None, None] * z[:, None] + l22[..., None, None] * z[None, :]
        c, F, Q = v.shape[0], v.shape[1], z.numel()
        fv = fn(v.permute(1, 0, 2, 3).reshape(F, -1)).reshape(F, c, Q, Q).permute(1, 0, 2, 3)  # [c, F, Q1, Q2]
        inner = (fv * w[None, :]).sum(-1)  # over z2: [c, F, Q1]
        out[rows] = torch.einsum("aq,abq,q->ab", fu[rows], inner, w)
    return (out + out.T) / 2


# --------------------------------------------------------------------------------------------
# The interpreter
# --------------------------------------------------------------------------------------------


@attrs.frozen
class ReadoutLaw:
    """An average over width read out by the outputs: its value (a leaf the outputs are differentiated in),
    the covariance of its fluctuation and the Grams of its tangent, over its entries, each times ``factor``
    (the square of the fluctuation's scale, applied with the outputs' Jacobian)."""

    leaf: torch.Tensor
    covariance: torch.Tensor
    grams: Mapping[str, torch.Tensor]
    factor: float = 1.0


_FACTS: list = []  # [setup, {n: facts}] of the last program


def _program_facts(setup: Any, n: int) -> tuple[dict, dict[str, float], dict[str, int], dict[str, list[str]]]:
    """The program's parameter table, each trained parameter's ``lr_scale·grad_scale`` at width ``n``, the
    uses of each matrix in the forward pass and the instructions reading each value there (an output is read
    by the program's caller, ``""``): found once per program and width."""
    if not (_FACTS and _FACTS[0] is setup):
        _FACTS[:] = [setup, {}]
    if n not in _FACTS[1]:
        groups = parameter_groups(dict.fromkeys(setup.chosen), setup.program, setup.param, setup.chosen, n, 0.0)
        uses: dict[str, int] = {}
        readers: dict[str, list[str]] = {name: [""] for name in setup.program.outputs}
        for ins in setup.program.instructions[: setup.total.forward_length]:
            if isinstance(ins, MatMul):
                uses[ins.matrix] = uses.get(ins.matrix, 0) + 1
            for name in ins.inputs:
                readers.setdefault(name, []).append(ins.name)
        rates = {g["name"]: g["lr_scale"] * g["grad_scale"] for g in groups}
        _FACTS[1][n] = (setup.program.parameters, rates, uses, readers)
    return _FACTS[1][n]


class ExactInterpreter(Interpreter):
    """The forward program on Gaussian laws at width ``n`` (see the module docstring)."""

    def __init__(self, setup: Any, n: int, dtype: torch.dtype, device: torch.device, tangents: bool = True,
                 kept: Mapping[str, bool] | None = None, structured: bool = True) -> None:
        super().__init__(setup.program)
        # a convolution's product as shifted covariances of its input (False: over its patches, the generic way)
        self.structured = structured
        self.kept = kept or {}  # the parameters whose NTK is known to stay (True) or vanish (False) in the limit
        self.infos, self.rates, self.uses, self.readers = _program_facts(setup, n)
        self.program_facts = _structures(setup, ())
        self.structures: dict[str, Structure] = {}  # by instruction, at this width and these inputs' shapes
        self._run_facts: dict[str, Structure] = {}  # facts of instructions without a structure, for this run
        self.statistics: set[str] = set()  # averages over width taken as their limits, and what is computed from them
        self.setup, self.n, self.dtype, self.device = setup, n, dtype, device
        self.sources = 0
        self.metrics = Metrics()
        self.tangents = tangents  # False: the NNGP alone, no tangent is carried
        self.readouts: dict[str, ReadoutLaw] = {}
        self.scalar_leaves: dict[str, torch.Tensor] = {}

    def run(self, *inputs: Any, initial_env: Mapping[str, Any] | None = None, stop: int | None = None) -> Any:
        shapes = tuple((tuple(t.shape), t.dtype) for t in pytree.tree_leaves(inputs) if torch.is_tensor(t))
        self.structures = _structures(self.setup, (self.n, self.dtype, str(self.device), shapes))
        return super().run(*inputs, initial_env=initial_env, stop=stop)

    def inputs_of(self, ins: Nonlin) -> tuple[str, ...]:
        """``ins.inputs``, found once per program (the property walks the arguments on each access)."""
        return self._program_fact(ins, "inputs", lambda: ins.inputs)

    def _program_fact(self, ins: Instruction, key: Any, find: Callable[[], Any]) -> Any:
        if ins.name not in self.program_facts:
            self.program_facts[ins.name] = Structure(ins.name)
        return self.program_facts[ins.name].get(key, find)

    def structure(self, ins: Instruction) -> Structure | None:
        """The instruction's :class:`Structure` when its function cannot change between runs of the same shapes:
        every argument a random value or a matrix. ``None``: found again on each run."""
        if any(not isinstance(self.values[n], (*RANDOM, OffsetTerms, Parameter)) for n in self.inputs_of(ins)):
            return None
        if ins.name not in self.structures:
            self.structures[ins.name] = Structure(ins.name)
        return self.structures[ins.name]

    def _fact(self, ins: Instruction, key: Any, find: Callable[[], Any]) -> Any:
        """``find()``, kept in the instruction's structure where it has one, else for this run."""
        structure = self.structure(ins)
        if structure is None:
            structure = self._run_facts.setdefault(ins.name, Structure(ins.name))
        return structure.get(key, find)

    def _fact_of(self, ins: Instruction, key: Any, found_from: tuple[torch.Tensor, ...],
                 find: Callable[[], Any]) -> Any:
        """:meth:`_fact` of an instruction's function on index tensors found upstream (``found_from``): kept with
        them, found again when they differ."""
        kept = self._fact(ins, key, lambda: None)
        if kept is None or len(kept[0]) != len(found_from) or not all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip(kept[0], found_from, strict=True)):
            kept = (found_from, find())
            structure = self.structure(ins) or self._run_facts[ins.name]
            structure.facts[key] = kept
        return kept[1]

    def _zero_mean(self, ins: Instruction) -> torch.Tensor:
        """Zeros laid out as ``ins`` with the width axis of size 1: the same tensor on every run (see
        :meth:`_affine_kept`; nothing writes into a mean)."""
        return self._fact(ins, "zero mean", lambda: torch.zeros(
            tuple(1 if isinstance(a, Width) else a for a in ins.layout), dtype=self.dtype, device=self.device))

    def refuse(self, ins: Instruction, why: str) -> NotGaussian:
        return NotGaussian(f"the exact kernel path cannot integrate %{ins.name} ({ins.describe()}"
                           f"{', ' + ins.origin.describe() if ins.origin.describe() else ''}): {why}", ins.name)

    # -- sources ------------------------------------------------------------------------------
    def _new_sources(self, count: int, covariance: torch.Tensor | None) -> int:
        start = self.sources
        self.sources += count
        self.metrics.sources[start] = (count, covariance)
        return start

    def channel(self, param: str) -> str | None:
        """The tangent channel a parameter's tangent is carried in: its own while its scaling is unknown, one
        shared channel (:data:`STAYING`) for those whose NTK stays in the limit (one recursion for their sum),
        none for those whose NTK vanishes."""
        known = self.kept.get(param)
        return param if known is None else STAYING if known else None

    def _kappa(self, name: str) -> float:
        abcd = self.setup.chosen[name]
        return self.rates[name] * multiplier(abcd, self.n) ** 2

    # -- instructions ---------------------------------------------------------------------------
    def constant(self, ins: Constant) -> Any:
        if width_axes(ins.layout):
            raise self.refuse(ins, "a width-sized constant")
        return ins.value.to(self.dtype) if ins.value.is_floating_point() else ins.value

    def input(self, ins: Any) -> Any:
        value = super().input(ins)
        return value.to(self.dtype) if torch.is_tensor(value) and value.is_floating_point() else value

    def parameter(self, ins: Parameter) -> Any:
        info = self.infos[ins.target]
        init = self.setup.initial[ins.target]
        abcd = self.setup.chosen.get(ins.target)
        if info.kind == "matrix":
            if init.kind != "random" or abcd is None:
                raise self.refuse(ins, f"a matrix initialized as {init.kind} (only random trained matrices)")
            if self.uses.get(ins.name, 0) != 1:
                raise self.refuse(ins, "a matrix used more than once in the forward pass (shared weights)")
            return ins  # read by matmul
        mult = multiplier(abcd, self.n) if abcd is not None else 1.0
        axes = width_axes(info.layout)
        if not axes:
            if init.kind == "constant":
                value = torch.full(tuple(info.shape), float(init.value) * mult, dtype=self.dtype, device=self.device)
            elif init.kind == "fixed":
                value = init.value.to(device=self.device, dtype=init.dtype_in(self.dtype)) * mult
            else:
                raise self.refuse(ins, f"a scalar parameter initialized as {init.kind}")
            if not value.is_floating_point():
                return value
            if abcd is not None:
                value.requires_grad_(True)
                self.scalar_leaves[ins.target] = value
            return value
        if not (init.kind == "constant" or (init.kind == "random" and abcd is not None)):
            raise self.refuse(ins, f"a vector initialized as {init.kind}")
        channel = self.channel(ins.target)
        if not (abcd is not None and self.tangents):
            channel = None
        # the same tensors on every run (nothing writes into a value's mean or blocks): what is computed from them
        # downstream can be recognized as unchanged (:meth:`_affine_of`)
        mean, block, own = self._fact(ins, ("vector", channel), lambda: self._vector_parameter(ins, mult, channel))
        coef = {} if block is None else {self._new_sources(block.shape[axes[0]], None): block}
        tangent = {} if own is None else {(channel, ins.name): own}
        return Gauss(mean, coef, tangent, axes[0], self.metrics)

    def _vector_parameter(self, ins: Parameter, mult: float, channel: str | None
                          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """A vector parameter's mean, its block on its own source family (``None``: a constant) and its tangent
        block on its channel (``None``: none), each laid out as the parameter with the width axis of size 1."""
        info, init, abcd = self.infos[ins.target], self.setup.initial[ins.target], self.setup.chosen.get(ins.target)
        axis = width_axes(info.layout)[0]
        shape = tuple(1 if i == axis else s for i, s in enumerate(info.layout))
        F = math.prod(s for i, s in enumerate(shape) if i != axis)
        block = own = None
        if init.kind == "constant":
            mean = torch.full(shape, float(init.value) * mult, dtype=self.dtype, device=self.device)
        else:
            block = _unflat(torch.eye(F, dtype=self.dtype, device=self.device) * (init_std(info, abcd, self.n) * mult),
                            shape, axis)
            mean = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if channel is not None:
            own = _unflat(torch.eye(F, dtype=self.dtype, device=self.device) * math.sqrt(self._kappa(ins.target)),
                          shape, axis)
        return mean, block, own

    def regroup(self, ins: Regroup) -> Any:
        raise self.refuse(ins, "regrouping width axes is not integrated exactly yet")

    def matmul(self, ins: MatMul) -> Gauss | OffsetTerms:
        x = self.values[ins.vector]
        if not isinstance(x, RANDOM):
            raise self.refuse(ins, "the vector is not random")
        if self.structured and isinstance(x, Linear):
            terms = self._offset_terms(ins, x)
            if terms is not None:
                return terms
        return self._product_of(ins)

    def _product_of(self, ins: MatMul) -> Gauss:
        """The matrix product over the vector's entries: a family with covariance ``n_in·s²·E[x xᵀ]``."""
        x = self.values[ins.vector]
        matrix = self.values[ins.matrix]
        info = self.infos[matrix.target]
        abcd = self.setup.chosen[matrix.target]
        ratio = self.program[ins.vector].layout[x.axis].ratio
        n_in = float(ratio) * self.n
        s2 = (init_std(info, abcd, self.n) * multiplier(abcd, self.n)) ** 2
        shape = _layout_shape(x)
        out_axis = width_axes(ins.layout)[0]
        mean = self._zero_mean(ins)
        M = second_moment(x)
        same_offset = self._same_offset(ins, info.layout, shape, x.axis)
        if same_offset is not None:
            M = M * same_offset
        mapped = self._mapped(ins, info.layout, shape, x.axis, out_axis)

        def onto_h(gram: torch.Tensor) -> torch.Tensor:  # a Gram over x's entries, carried to h's
            if mapped is None:
                return gram
            if isinstance(mapped, tuple):  # a reordering of the fixed axes: one copy
                sizes, order = mapped
                k = len(order)
                return gram.reshape(*sizes, *sizes).permute(*order, *[k + i for i in order]).reshape(gram.shape)
            return _sandwich(mapped, gram, x, out_axis)
        start = self._new_sources(mean.numel(), onto_h(_times(s2 * n_in, M)))
        channels = {}
        if self.tangents:
            own = self.channel(matrix.target)
            if own is not None:
                channels[(own, ins.name)] = _times(self._kappa(matrix.target) * n_in, M)
            weight, grams = _weighted_grams(x)  # Θ_h = κ n E[x xᵀ] + s² n E[φ'φ'] ⊙ Θ_g, fused where x = φ(g)
            for param, gram in grams.items():
                if same_offset is not None:
                    gram = gram * (same_offset if weight is None else weight * same_offset)
                    weight_here = None
                else:
                    weight_here = weight
                key = (param, ins.name)
                if key in channels and weight_here is not None:
                    channels[key] = torch.addcmul(channels[key], weight_here, gram, value=s2 * n_in,
                                                  out=_buffer(gram.shape, gram))
                elif key in channels:
                    channels[key] = torch.add(channels[key], gram, alpha=s2 * n_in, out=_buffer(gram.shape, gram))
                elif weight_here is None:
                    channels[key] = _times(s2 * n_in, gram)
                else:  # s²n·(w ⊙ Θ), the product in a buffer, scaled there (a unit scale is not applied)
                    product = torch.mul(weight_here, gram, out=_buffer(gram.shape, gram))
                    channels[key] = product if s2 * n_in == 1 else product.mul_(s2 * n_in)
        self.metrics.channels.update({key: onto_h(gram) for key, gram in channels.items()})
        return Gauss(mean, {start: None}, dict.fromkeys(channels), out_axis, self.metrics)

    def _mapped(self, ins: MatMul, layout: tuple, shape: tuple[int, ...], axis: int,
                out_axis: int) -> Callable[[torch.Tensor], torch.Tensor] | tuple | None:
        """How ``h = W x`` maps x's entries to h's: the equation with the matrix an identity over its width
        axes, i.e. x's width letter renamed to h's, summed over the matrix's fixed axes (offsets); ``None`` (the
        identity) when h's fixed entries are x's in the same order, ``(sizes, order)`` (x's fixed axes' sizes
        and h's axes among them) when it only reorders them. h's family then has h's entries as its sources,
        its covariance (and each channel's Gram) carried over by this map: no product is formed."""
        specs, out_spec = ins.equation.split("->")
        m_spec, x_spec = specs.split(",")
        renamed = x_spec.replace(x_spec[axis], out_spec[out_axis])
        fixed = [(m_spec[i], a) for i, a in enumerate(layout) if not isinstance(a, Width)]
        if not fixed and renamed.replace(out_spec[out_axis], "") == out_spec.replace(out_spec[out_axis], ""):
            return None
        ones = torch.ones([size for _, size in fixed], dtype=self.dtype, device=self.device)
        equation = f"{''.join(letter for letter, _ in fixed)},{renamed}->{out_spec}"
        x_letters = [letter for i, letter in enumerate(renamed) if i != axis]
        h_letters = [letter for i, letter in enumerate(out_spec) if i != out_axis]
        if sorted(x_letters) == sorted(h_letters):  # nothing summed: the fixed axes reordered
            return tuple(s for i, s in enumerate(shape) if i != axis), [x_letters.index(x) for x in h_letters]
        return lambda t: torch.einsum(equation, ones, t)

    def _offset_terms(self, ins: MatMul, x: Linear) -> Gauss | OffsetTerms | None:
        """A convolution's product: ``x`` copies entries of a value ``base`` (or zeros) through a chain of linear
        maps (unfolding into patches), and the matrix is one independent matrix per kernel offset batched over
        ``x``'s offset axes. Summed over the offsets, h's second moment (and each tangent Gram) is the sum of
        ``base``'s shifted, ``Σ_o B[idx_o, idx_o]`` (``idx_o`` the entry of ``base`` each output entry copies at
        offset o, zero padding reading zero), never formed over the patches: here when the product sums the
        offsets, else (:class:`OffsetTerms`) when the one instruction reading h sums them. ``None``: the
        generic product."""
        specs, out_spec = ins.equation.split("->")
        m_spec, x_spec = specs.split(",")
        layout = self.infos[self.values[ins.matrix].target].layout
        offsets = [m_spec[i] for i, a in enumerate(layout) if not isinstance(a, Width)]
        out_axis = width_axes(ins.layout)[0]
        if not offsets or any(letter not in x_spec for letter in offsets) or len(set(x_spec)) != len(x_spec):
            return None
        x_letters = [letter for i, letter in enumerate(x_spec) if i != x.axis]
        h_letters = [letter for i, letter in enumerate(out_spec) if i != out_axis]
        summed = sorted(letter for letter in x_letters if letter not in offsets) == sorted(h_letters)
        readers = self.readers.get(ins.name, [])
        pending = (sorted(x_letters) == sorted(h_letters) and len(readers) == 1 and readers[0] != ""
                   and isinstance(self.program[readers[0]], Nonlin)
                   and (self.program[readers[0]].gaussian or (None,))[0] == "affine")
        if not (summed or pending):
            return None
        index, base, differentiable = None, x, True
        while isinstance(base, Linear):
            copied = _copied_entries(base)
            if copied is None:
                break
            index = copied if index is None else torch.where(index >= 0, copied[index.clamp_min(0)], index)
            differentiable = differentiable and base.differentiable
            base = base.arg
        if index is None:
            return None
        fixed = [s for i, s in enumerate(_layout_shape(x)) if i != x.axis]
        mean = self._zero_mean(ins)
        if summed:
            order = [x_letters.index(letter) for letter in offsets + h_letters]
            per_offset = index.reshape(fixed).permute(order).reshape(math.prod(fixed[i] for i in order[: len(offsets)]),
                                                                     -1)
            return self._shifted_product(ins, base, per_offset, mean, out_axis, differentiable, True)
        order = [x_letters.index(letter) for letter in h_letters]
        index = index.reshape(fixed).permute(order).reshape(-1)
        key = torch.zeros(fixed, dtype=torch.long, device=self.device)
        for letter in offsets:  # the offset of each entry, numbered
            axis = x_letters.index(letter)
            grid = torch.arange(fixed[axis], device=self.device).reshape([-1 if i == axis else 1
                                                                          for i in range(len(fixed))])
            key = key * fixed[axis] + grid
        offset = key.permute(order).reshape(-1)
        return OffsetTerms(ins, base, differentiable, index, offset, tuple(mean.shape), out_axis)

    def _offset_sum(self, ins: Nonlin, name: str, terms: OffsetTerms) -> Gauss | None:
        """``ins`` on the terms ``h`` of a convolution's product when it is linear in ``h`` alone and sums each
        entry of ``h`` into one output entry, at most one of each offset (the sum over the kernel offsets): the
        output entry r is then ``Σ_o`` of h's entry (o, r), read by applying ``ins`` to h's entries' numbers, one
        offset at a time, and checked on a random vector. ``None``: any other function."""
        law = ins.gaussian
        out_axes = width_axes(ins.layout)
        if (not out_axes or (law[1] is not None and not _only_at(ins, [name], law[1]))
                or any(isinstance(self.values[n], RANDOM) for n in self.inputs_of(ins))):
            return None
        out_axis = out_axes[0]
        rows = self._fact_of(ins, ("offset rows", name), (terms.index, terms.offset),
                             lambda: self._offset_rows(ins, name, terms, out_axis))
        if rows is None:
            return None
        mean = self._zero_mean(ins)
        return self._shifted_product(terms.product, terms.base, rows, mean, out_axis,
                                     terms.differentiable, ins.differentiable)

    def _offset_rows(self, ins: Nonlin, name: str, terms: OffsetTerms, out_axis: int) -> torch.Tensor | None:
        """``[offsets, outputs]``: the entry of the convolution's ``base`` each output entry of ``ins`` reads at each
        offset (-1: zero padding), when ``ins`` sums the offsets (see :meth:`_offset_sum`); ``None``: it does not."""

        def fn(t: torch.Tensor) -> torch.Tensor:
            return _fixed_flat(self._apply(ins, {**self.values, name: _unflat(t[:, None], terms.shape, terms.axis)}),
                               out_axis)[:, 0]
        F = terms.index.numel()
        if F >= 1 / torch.finfo(self.dtype).eps or bool(fn(torch.zeros(F, dtype=self.dtype, device=self.device)).any()):
            return None
        numbers = torch.arange(1, F + 1, dtype=self.dtype, device=self.device)
        probe = torch.randn(F, generator=torch.Generator().manual_seed(0), dtype=self.dtype).to(self.device)
        rows, expected = [], None
        for o in range(int(terms.offset.max()) + 1):
            read = fn(torch.where(terms.offset == o, numbers, torch.zeros_like(numbers)))
            if not (bool((read == read.round()).all()) and bool(((read >= 0) & (read <= F)).all())):
                return None
            entry = read.long() - 1
            part = torch.where(entry >= 0, probe[entry.clamp_min(0)], torch.zeros_like(read))
            expected = part if expected is None else expected + part
            rows.append(torch.where(entry >= 0, terms.index[entry.clamp_min(0)], -1))
        image = fn(probe)
        eps = torch.finfo(self.dtype).eps
        if image.shape != expected.shape or not bool(torch.allclose(image, expected, rtol=100 * eps, atol=100 * eps)):
            return None
        return torch.stack(rows)

    def _shifted_product(self, ins: MatMul, base: Random, per_offset: torch.Tensor, mean: torch.Tensor,
                         out_axis: int, base_tangents: bool, tangents: bool) -> Gauss:
        """A convolution's output summed over its offsets: a new family with covariance ``n_in·s²·Σ_o
        E[x_o x_oᵀ]``, the shifted second moments of ``base`` (``per_offset``: ``[offsets, outputs]``, the entry
        of ``base`` each output reads at each offset, -1 a zero), and the tangent ``Θ_h = Σ_o (κ n_in E[x_o
        x_oᵀ] + s² n_in Θ_{x_o})`` (``base_tangents``: base's tangents reach x; ``tangents``: any reaches h)."""
        matrix = self.values[ins.matrix]
        info, abcd = self.infos[matrix.target], self.setup.chosen[matrix.target]
        x = self.values[ins.vector]
        n_in = float(self.program[ins.vector].layout[x.axis].ratio) * self.n
        s2 = (init_std(info, abcd, self.n) * multiplier(abcd, self.n)) ** 2
        fixed = [s for i, s in enumerate(_layout_shape(base)) if i != base.axis]
        reduce = self._fact_of(ins, "reducer", (per_offset,),
                               lambda: _shift_reducer(per_offset, math.prod(fixed), fixed[0] if fixed else 1))
        M = second_moment(base)
        start = self._new_sources(mean.numel(), reduce(M, s2 * n_in))
        channels: dict[tuple[str, str], torch.Tensor | None] = {}
        if self.tangents and tangents:
            own = self.channel(matrix.target)
            kappa = self._kappa(matrix.target) * n_in
            if own is not None:
                channels[(own, ins.name)] = None
            for param, gram in (tangent_grams(base) if base_tangents else {}).items():
                key = (param, ins.name)
                if key in channels and s2 > 0:  # the reduction is linear: one of κ n_in E[x xᵀ] + s² n_in Θ_x
                    channels[key] = reduce(gram, s2 * n_in, M, kappa / (s2 * n_in))
                elif key in channels:
                    channels[key] = reduce(M, kappa).add_(reduce(gram, s2 * n_in))
                else:
                    channels[key] = reduce(gram, s2 * n_in)
            if own is not None and channels[(own, ins.name)] is None:
                channels[(own, ins.name)] = reduce(M, kappa)
        self.metrics.channels.update(channels)
        return Gauss(mean, {start: None}, dict.fromkeys(channels), out_axis, self.metrics)

    def _same_offset(self, ins: MatMul, layout: tuple, shape: tuple[int, ...], axis: int) -> torch.Tensor | None:
        """``[F, F]``: 1 where two fixed entries of the vector meet the same matrix (``None``: all of them). A
        matrix with fixed axes (a convolution's kernel offsets) is one independent matrix per offset, batched
        over the vector's axes of the same letters: entries at different offsets are multiplied by independent
        matrices."""
        specs, _ = ins.equation.split("->")
        m_spec, x_spec = specs.split(",")
        offsets = [m_spec[i] for i, a in enumerate(layout) if not isinstance(a, Width)]
        F = math.prod(s for i, s in enumerate(shape) if i != axis)
        if not offsets:
            return None
        if any(letter not in x_spec for letter in offsets):
            raise self.refuse(ins, "a matrix with fixed axes that do not batch the vector")
        fixed = [i for i in range(len(shape)) if i != axis]
        grids = torch.meshgrid(*[torch.arange(shape[i], device=self.device) for i in fixed], indexing="ij")
        key = torch.zeros(F, dtype=torch.long, device=self.device)
        for letter in offsets:
            position = fixed.index(x_spec.index(letter))
            key = key * shape[fixed[position]] + grids[position].reshape(-1)
        return (key[:, None] == key[None, :]).to(self.dtype)

    def avg(self, ins: Avg) -> torch.Tensor:
        u = self.values[ins.vector]
        if not (isinstance(u, Product) and _zero_mean_factor(u)):
            return self._statistic(ins, u)
        ratio = self.program[ins.vector].layout[ins.axis].ratio
        scale = ins.scale.resolve(self.n) if ins.scale is not None else 1.0
        phi2 = scale**2 / (float(ratio) * self.n)
        shape = [s for i, s in enumerate(self.program[ins.vector].layout) if i != ins.axis]
        if ins.keepdim:
            shape.insert(ins.axis, 1)
        leaf = torch.zeros(shape, dtype=self.dtype, device=self.device, requires_grad=True)
        grams = tangent_grams(u) if self.tangents else {}
        self.readouts[ins.name] = ReadoutLaw(leaf, second_moment(u), grams, phi2)
        return leaf

    def _statistic(self, ins: Avg, u: Any) -> torch.Tensor:
        """An average over width other than a readout (a normalization's mean and variance): in the limit the
        expectation of a coordinate, a number per fixed entry, its fluctuation ``O(n^-1/2)``. It may only set
        the coefficients of functions of random vectors (their laws declare how); one that reaches the outputs
        would have a tangent this path does not carry, and is refused there."""
        if not isinstance(u, RANDOM):
            raise self.refuse(ins, "an average over width of a vector that is not random")
        if ins.scale is not None and ins.scale.power != 0:
            raise self.refuse(ins, "only readouts (the average of x ⊙ v for a zero-mean Gaussian v independent of "
                                   "x) are integrated exactly; other averages over width times a power of the "
                                   "width are not")
        scale = ins.scale.resolve(self.n) if ins.scale is not None else 1.0
        value = _unflat(mean_of(u)[:, None] * scale, _layout_shape(u), u.axis)
        self.statistics.add(ins.name)
        return value if ins.keepdim else value.squeeze(u.axis)

    def nonlin(self, ins: Nonlin) -> Any:
        if any(isinstance(self.values[n], Parameter) for n in self.inputs_of(ins)):
            raise self.refuse(ins, "a weight matrix used outside a matrix product")
        for name in self.inputs_of(ins):
            terms = self.values[name]
            if isinstance(terms, OffsetTerms):
                summed = self._offset_sum(ins, name, terms)
                if summed is not None:
                    return summed
                self.values[name] = self._product_of(terms.product)
        try:
            return self._law(ins)
        except (RuntimeError, TypeError, ValueError, IndexError) as error:
            raise self.refuse(ins, f"its function does not apply to the laws' tensors ({error})") from None

    def _law(self, ins: Nonlin) -> Any:
        names = [n for n in self.inputs_of(ins) if isinstance(self.values[n], RANDOM)]
        if not names:
            if any(n in self.statistics for n in self.inputs_of(ins)):
                self.statistics.add(ins.name)
            return self._apply(ins, self.values)
        law = ins.gaussian
        out_axis = width_axes(ins.layout)[0] if width_axes(ins.layout) else None
        if out_axis is None:
            raise self.refuse(ins, "a function of vectors that leaves the width axis")
        kind = law[0] if law else None
        if kind in ("affine", "multilinear") and law[1] is not None and not _only_at(ins, names, law[1]):
            raise self.refuse(ins, f"a random vector where the function is not {kind} (it is in arguments {law[1]})")
        values = [self.values[n] for n in names]
        if kind == "multilinear" and _repeated(ins, names):
            # x·x is no multilinear function of independent arguments: a nonlinear function of one vector
            if len(names) == 1 and isinstance(values[0], Gauss):
                return Mapped(("quadrature",), self._bound(ins, names[0]), values[0], out_axis, ins.differentiable)
            raise self.refuse(ins, "a product in which the same random vector appears more than once")
        if kind == "affine" or (kind == "multilinear" and len(names) == 1):
            if all(isinstance(v, Gauss) for v in values):
                return self._affine(ins, names, out_axis)
            if len(names) == 1:
                return self._linear(ins, names[0], out_axis)
            raise self.refuse(ins, "an affine function of several vectors, not all Gaussian")
        if kind == "multilinear" and len(names) == 2:
            settled = [n for n, v in zip(names, values, strict=True) if isinstance(v, Gauss) and not v.coef]
            if len(settled) == 1 and all(isinstance(v, Gauss) for v in values):
                return self._scaled(ins, names, settled[0], out_axis)
            return self._product(ins, names, out_axis)
        if kind in ("arc-cosine", "error function", "quadrature") and len(names) == 1:
            g = values[0]
            if not isinstance(g, Gauss) or not _first_arg_is(ins, names[0]):
                raise self.refuse(ins, "a nonlinear function of a non-Gaussian vector")
            if ins.differentiable and any(c.coefficient is None or not _same_gaussian(c.coefficient, g)
                                          for c in g.opaque.values()):
                raise self.refuse(ins, "a nonlinear function of a vector whose tangent has a random coefficient "
                                       "other than the vector itself (a gain initialized other than 1, or a bias "
                                       "other than 0, before the nonlinearity)")
            return Mapped(law, self._bound(ins, names[0]), g, out_axis, ins.differentiable)
        raise self.refuse(ins, "no Gaussian law is declared for this function of random vectors"
                          + ("" if law is None else f" that applies here ({law})"))

    # -- helpers ----------------------------------------------------------------------------------
    def _apply(self, ins: Nonlin, values: Mapping[str, Any]) -> Any:
        """``ins.fn`` on ``values``. Width-dependent sizes (a reshape to ``[B, n, H, W]``) take the size of the
        width axis of the tensors given (sources, factor columns); width-dependent constants are at ``n``."""
        columns = None
        for name in self.inputs_of(ins):
            value, axes = values.get(name), width_axes(self.program[name].layout)
            if torch.is_tensor(value) and axes and value.ndim == len(self.program[name].layout):
                columns = value.shape[axes[0]] / self.program[name].layout[axes[0]].ratio
                break
        key = ("arguments", None if columns is None else float(columns), self.n)  # a float hashes faster
        args, kwargs = self._program_fact(ins, key, lambda: (_at_width(_sizes(ins.args, columns), self.n),
                                                             _at_width(_sizes(dict(ins.kwargs), columns), self.n)))
        return ins.fn(*substitute(args, values, self.n), **substitute(kwargs, values, self.n))

    def _bound(self, ins: Nonlin, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The function of the Gaussian argument ``name`` alone, on ``[F, K]``: K values of each fixed entry,
        given to the function in the argument's layout with the width axis holding them (so that its other
        arguments, statistics per row, broadcast as they do at finite width)."""
        shape, axis = _layout_shape(self.values[name]), self.values[name].axis

        def fn(t: torch.Tensor) -> torch.Tensor:
            return _fixed_flat(self._apply(ins, {**self.values, name: _unflat(t, shape, axis)}), axis)
        return fn

    def _scaled(self, ins: Nonlin, names: list[str], settled: str, axis: int) -> Gauss:
        """A bilinear function of a Gaussian and a vector with no random part at initialization (a
        normalization's gain, initialized constant and trained): affine in the Gaussian with the gain's value,
        plus the gain's tangent, whose coefficient is the random other factor — kept by its Gram alone."""
        w = self.values[settled]
        random = next(n for n in names if n != settled)
        product = self._product(ins, names, axis)
        out = self._affine(ins, [random], axis, {settled: w.mean})
        y = self.values[random]
        moment = second_moment(y)
        for param, gram in tangent_grams(w).items():
            def through(side: torch.Tensor, gram: torch.Tensor = gram) -> torch.Tensor:
                return _bilinear(product, gram, side) if names[0] == settled else _bilinear(product, side, gram)
            full, structure = through(moment), through(torch.ones_like(moment))
            factored = full.shape == moment.shape and bool(torch.allclose(full, moment * structure, rtol=1e-12,
                                                                           atol=0))
            out.opaque[(param, ins.name)] = Opaque(full, y, structure) if factored else Opaque(full)
        return out

    def _affine(self, ins: Nonlin, names: list[str], axis: int, fixed: Mapping[str, torch.Tensor] | None = None
                ) -> Gauss:
        """``fixed``: arguments held at a value (a gain's, see :meth:`_scaled`)."""
        values = {n: self.values[n] for n in names}
        if not fixed and not any(v.opaque for v in values.values()) and self.structure(ins) is not None:
            return self._affine_kept(ins, values, axis)
        outer = self.values
        self.values = {**self.values, **(fixed or {})}
        try:
            return self._affine_of(ins, values, axis)
        finally:
            self.values = outer

    def _affine_kept(self, ins: Nonlin, values: Mapping[str, Gauss], axis: int) -> Gauss:
        """:meth:`_affine_of` of an instruction whose function cannot change between runs (every argument random),
        kept while its arguments' means and blocks are the same tensors as on the last run (a parameter's are, and
        so is all that is computed from them alone: a bias broadcast over rows): the function of the same tensors
        is the same tensors. Nothing writes into a mean or a block, so the kept ones are returned again."""
        parts = tuple((n, v.mean, tuple(v.coef.items()), tuple(v.tangent.items())) for n, v in values.items())
        kept = self._fact(ins, "affine", lambda: None)
        if kept is not None and _same_parts(kept[0], parts):
            mean, coef, tangent = kept[1]
            return Gauss(mean, dict(coef), dict(tangent), axis, self.metrics)
        out = self._affine_of(ins, values, axis)
        self.structure(ins).facts["affine"] = (parts, (out.mean, dict(out.coef), dict(out.tangent)))
        return out

    def _affine_of(self, ins: Nonlin, values: Mapping[str, Gauss], axis: int) -> Gauss:
        # the constant part, once on one column (the function acts column by column along the width axis)
        constant = self._apply(ins, {**self.values, **{n: torch.zeros_like(v.mean) for n, v in values.items()}})
        centered = all(not bool(v.mean.any()) for v in values.values())  # then the mean is the constant part
        mean = constant if centered else self._apply(ins, {**self.values, **{n: v.mean for n, v in values.items()}})
        constant = constant if bool(constant.any()) else None
        coef = self._blocks(ins, values, {n: v.coef for n, v in values.items()},
                            lambda start: self.metrics.sources[start][0], constant)
        tangent = {}
        if ins.differentiable:
            sizes = {key: _block_size(v, t) for v in values.values() for key, t in v.tangent.items()}
            tangent = self._blocks(ins, values, {n: v.tangent for n, v in values.items()}, sizes.get, constant)
        out = Gauss(mean, coef, tangent, axis, self.metrics)
        if ins.differentiable:
            self._carry_opaque(ins, values, out, constant)
        return out

    def _carry_opaque(self, ins: Nonlin, values: Mapping[str, Gauss], out: Gauss,
                      constant: torch.Tensor | None) -> None:
        """The Grams of tangents known by their Gram alone, through the function's linear part in their argument
        (``L G Lᵀ``; unchanged where the function leaves that argument unchanged)."""
        for name, v in values.items():
            for key, channel in v.opaque.items():
                if key in out.opaque or any(key in u.tangent or (u is not v and key in u.opaque)
                                            for u in values.values()):
                    raise self.refuse(ins, f"the tangent of {key[0]!r} reaches it along two paths, one with a "
                                           "random coefficient")
                if self._leaves_unchanged(ins, name):
                    out.opaque[key] = channel
                    continue

                def linear(t: torch.Tensor, name: str = name, v: Gauss = v) -> torch.Tensor:
                    zeros = {n: _pad(u.mean.new_zeros(u.mean.shape), u.axis, t.shape[v.axis]) * 0
                             for n, u in values.items() if n != name}
                    return self._linear_part(ins, {**zeros, name: t}, constant)
                out.opaque[key] = Opaque(_sandwich(linear, channel.gram, v, out.axis))

    def _blocks(self, ins: Nonlin, values: Mapping[str, Gauss], blocks: Mapping[str, Mapping[Any, Block]],
                size_of: Callable[[Any], int], constant: torch.Tensor | None) -> dict[Any, Block]:
        """The affine function's linear part on each family (or channel) of its arguments: an identity block
        stays one where the function leaves its argument unchanged; an argument without the family is zero."""
        out: dict[Any, Block] = {}
        for key in dict.fromkeys(k for n in values for k in blocks[n]):
            having = [n for n in values if key in blocks[n]]
            if len(having) == 1 and blocks[having[0]][key] is None and self._leaves_unchanged(ins, having[0]):
                out[key] = None
                continue
            parts = {}
            for n, v in values.items():
                block = blocks[n].get(key, 0)
                if block is None:
                    block = _unflat(torch.eye(v.mean.numel(), dtype=self.dtype, device=self.device),
                                    tuple(v.mean.shape), v.axis)
                elif not torch.is_tensor(block):
                    block = _pad(v.mean.new_zeros(v.mean.shape), v.axis, size_of(key)) * 0
                parts[n] = block
            out[key] = self._linear_part(ins, parts, constant)
        return out

    def _leaves_unchanged(self, ins: Nonlin, name: str) -> bool:
        """The function, with its other random arguments zero, is the identity in ``name`` on the fixed entries in
        their order (a reshape that keeps the order too): tried on one random column (a linear map other than the
        identity fixes a random vector with probability zero)."""
        return self._fact(ins, ("unchanged", name), lambda: self._find_unchanged(ins, name))

    def _find_unchanged(self, ins: Nonlin, name: str) -> bool:
        v = self.values[name]
        probe = torch.randn(v.mean.shape, generator=torch.Generator().manual_seed(0), dtype=self.dtype).to(self.device)
        zeros = {n: torch.zeros_like(self.values[n].mean) for n in self.inputs_of(ins)
                 if isinstance(self.values[n], Gauss)}
        image = self._apply(ins, {**self.values, **zeros, name: probe}) - self._apply(ins, {**self.values, **zeros})
        out_axis = width_axes(ins.layout)[0]
        return (image.ndim == len(ins.layout) and image.shape[out_axis] == 1 and image.numel() == probe.numel()
                and bool(torch.equal(_fixed_flat(image, out_axis), _fixed_flat(probe, v.axis))))

    def _linear(self, ins: Nonlin, name: str, axis: int) -> Linear:
        def constant_part() -> bool:
            zeros = torch.zeros(_layout_shape(self.values[name]), dtype=self.dtype, device=self.device)
            return bool(torch.as_tensor(self._apply(ins, {**self.values, name: zeros})).abs().max() > 0)
        if self._fact(ins, ("constant part", name), constant_part):
            raise self.refuse(ins, "an affine function with a constant part of a non-Gaussian vector")

        def fn(t: torch.Tensor) -> torch.Tensor:
            return self._apply(ins, {**self.values, name: t})
        shape = tuple(1 if i == axis else s for i, s in enumerate(ins.layout))
        return Linear(fn, self.values[name], axis, shape, ins.differentiable, shared=self.structure(ins))

    def _linear_part(self, ins: Nonlin, parts: Mapping[str, torch.Tensor],
                     constant: torch.Tensor | None) -> torch.Tensor:
        """The affine function on ``parts`` less its ``constant`` part (``None``: zero)."""
        value = self._apply(ins, {**self.values, **parts})
        return value if constant is None else value - constant

    def _product(self, ins: Nonlin, names: list[str], axis: int) -> Product:
        x, y = (self.values[n] for n in names)
        if _sources(x) & _sources(y) or _channels(x) & _channels(y):
            raise self.refuse(ins, "a product of two dependent random vectors")

        def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self._apply(ins, {**self.values, names[0]: a, names[1]: b})
        shape = tuple(1 if i == axis else s for i, s in enumerate(ins.layout))
        return Product(fn, x, y, axis, shape, ins.differentiable, shared=self.structure(ins))


def _same_parts(a: tuple, b: tuple) -> bool:
    """The same names, family and channel keys, and the same tensor objects (or ``None``) for each."""
    if len(a) != len(b):
        return False
    for (name, mean, coef, tangent), (name2, mean2, coef2, tangent2) in zip(a, b, strict=True):
        if name != name2 or mean is not mean2 or len(coef) != len(coef2) or len(tangent) != len(tangent2):
            return False
        for (k, t), (k2, t2) in zip(coef + tangent, coef2 + tangent2, strict=True):
            if k != k2 or t is not t2:
                return False
    return True


def _sizes(args: Any, columns: float | None) -> Any:
    """``args`` with every width-dependent size (:class:`WidthInt`) replaced by its value when the width axis
    holds ``columns`` entries (unchanged when ``columns`` is None)."""
    if columns is None:
        return args
    if isinstance(args, WidthInt):
        size = args.ratio * Fraction(columns).limit_denominator(2**20)
        if size.denominator != 1:
            raise ValueError(f"a width-dependent size {args} of {columns} columns is not whole")
        return int(size)
    if isinstance(args, list | tuple):
        return type(args)(_sizes(a, columns) for a in args)
    if isinstance(args, dict):
        return {k: _sizes(v, columns) for k, v in args.items()}
    return args


def _at_width(args: Any, n: int) -> Any:
    """``args`` with every width-dependent constant at width ``n`` (references to values kept)."""
    return map_args(args, lambda v: v.resolve(n) if isinstance(v, WidthInt | WidthPower) else v)


def _only_at(ins: Nonlin, names: list[str], positions: tuple[int, ...]) -> bool:
    """Every reference to ``names`` is a positional argument at one of ``positions``."""
    allowed = [ins.args[i] for i in positions if i < len(ins.args)]
    everywhere = list(refs_in((ins.args, ins.kwargs)))
    return all(everywhere.count(n) == sum(isinstance(a, Ref) and a.name == n for a in allowed) for n in names)


def _repeated(ins: Nonlin, names: list[str]) -> bool:
    """A random argument appears in more than one argument position (``mul(x, x)``)."""
    refs = list(refs_in((ins.args, ins.kwargs)))
    return any(refs.count(name) > 1 for name in names)


def _first_arg_is(ins: Nonlin, name: str) -> bool:
    refs = list(refs_in((ins.args, ins.kwargs)))
    return bool(ins.args) and isinstance(ins.args[0], Ref) and ins.args[0].name == name and refs.count(name) == 1


def _zero_mean_factor(u: Product) -> bool:
    """One factor is a zero-mean Gaussian: the cross-coordinate terms of the average vanish."""
    return any(isinstance(f, Gauss) and bool((f.mean == 0).all()) for f in (u.x, u.y))


# --------------------------------------------------------------------------------------------
# Kernels of the outputs
# --------------------------------------------------------------------------------------------


@attrs.frozen
class ExactKernels:
    """The output NNGP ``[J, J]`` and each trained parameter's NTK contribution ``[J, J]`` at width ``n``."""

    nngp: torch.Tensor
    ntk: Mapping[str, torch.Tensor]
    outputs: tuple[int, ...]


def kernels_at(setup: Any, Z: torch.Tensor, n: int, dtype: torch.dtype, device: torch.device,
               tangents: bool = True, kept: Mapping[str, bool] | None = None, structured: bool = True,
               workspace: bool = False) -> ExactKernels:
    """Run :class:`ExactInterpreter` on ``Z`` at width ``n``; the outputs' kernels through their Jacobian in
    the readouts (and in the trained scalars; ``tangents=False``: the NNGP alone). ``kept``: the parameters
    known to stay (their NTK summed, under :data:`STAYING`) or to vanish (left out) in the limit.
    ``structured=False``: convolutions over their patches (the generic matrix product), for comparison.
    ``workspace``: the ``[F, F]`` values in buffers kept for the next run of the same program and shapes
    (:class:`Workspace`): the kernels returned are then valid only until that run."""
    if not workspace:
        return _kernels_at(setup, Z, n, dtype, device, tangents, kept, structured)
    key = (n, dtype, str(device), tuple(Z.shape), Z.dtype, tangents, structured)
    _ACTIVE[:] = [_workspace(setup, key)]
    try:
        return _kernels_at(setup, Z, n, dtype, device, tangents, kept, structured)
    finally:
        _ACTIVE.clear()


def _kernels_at(setup: Any, Z: torch.Tensor, n: int, dtype: torch.dtype, device: torch.device,
                tangents: bool, kept: Mapping[str, bool] | None, structured: bool) -> ExactKernels:
    interp = ExactInterpreter(setup, n, dtype, device, tangents, kept, structured)
    interp.run(Z, stop=setup.total.forward_length)
    outputs = [interp.values[name] for name in setup.program.outputs]
    for name, value in zip(setup.program.outputs, outputs, strict=True):
        if not torch.is_tensor(value) or width_axes(setup.program[name].layout):
            raise NotGaussian(f"output %{name} is not a function of averages over width", name)
        if name in interp.statistics:
            raise NotGaussian(f"output %{name} depends on an average over width that is not a readout (its limit "
                              "is a number, but its tangent is not carried by the exact path)", name)
    f = torch.cat([o.reshape(-1) for o in outputs])
    if not f.requires_grad:
        raise NotGaussian("the outputs do not depend on any average over width or trained scalar")
    leaves = [r.leaf for r in interp.readouts.values()]
    scalars = list(interp.scalar_leaves.items())
    jacobians = _jacobians(f, leaves, [s for _, s in scalars])
    nngp = None
    ntk: dict[str, torch.Tensor] = {}
    for jac, law in zip(jacobians, interp.readouts.values(), strict=False):
        through = _kept_through(jac, law.factor)
        nngp = through(law.covariance) if nngp is None else nngp + through(law.covariance)
        for param, gram in law.grams.items():
            ntk[param] = ntk[param] + through(gram) if param in ntk else through(gram)
    for jac, (param, _) in zip(jacobians[len(leaves):], scalars, strict=True):
        channel = interp.channel(param)
        if channel is not None:
            part = interp._kappa(param) * (jac @ jac.T)
            ntk[channel] = ntk[channel] + part if channel in ntk else part
    if nngp is None:
        nngp = f.new_zeros(f.numel(), f.numel()).detach()
    return ExactKernels(nngp, ntk, tuple(outputs[0].shape[1:]))


def _kept_through(jac: torch.Tensor, factor: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`_through`, kept in the run's workspace while the Jacobian is the same (the usual case: the outputs'
    tail is the program's, not the inputs'); comparing the Jacobian costs less than finding its entries."""
    if not _ACTIVE:
        return _through(jac, factor)
    kept = _ACTIVE[0].constants.get(("through", factor))
    if kept is None or kept[0].shape != jac.shape or not torch.equal(kept[0], jac):
        kept = (jac, _through(jac, factor))
        _ACTIVE[0].constants[("through", factor)] = kept
    return kept[1]


def _through(jac: torch.Tensor, factor: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """``M ↦ factor · jac M jacᵀ`` (``factor ≥ 0``). Outputs that are each a multiple of one readout entry (a
    readout plus scalars: the usual tail) take their entries of ``M`` by indexing instead of two products."""
    entries = jac.nonzero()
    rows = torch.arange(jac.shape[0], device=jac.device)
    if entries.shape[0] != jac.shape[0] or not bool((entries[:, 0] == rows).all()):
        scaled = jac * factor
        return lambda M: scaled @ M @ jac.T
    index = entries[:, 1]
    weight = jac[entries[:, 0], index][:, None] * math.sqrt(factor)
    if not (index.numel() == jac.shape[1] and bool((index == torch.arange(len(index), device=index.device)).all())):
        return lambda M: weight * M[index][:, index] * weight.T
    if bool((weight == weight[0, 0]).all()):  # M itself at a unit scale: nothing writes into a kernel after
        scale = float(weight[0, 0]) ** 2
        return lambda M: _times(scale, M)
    return lambda M: weight * M * weight.T


def _jacobians(f: torch.Tensor, readouts: list[torch.Tensor], scalars: list[torch.Tensor]) -> list[torch.Tensor]:
    """``∂f/∂leaf`` as ``[J, leaf entries]`` for every leaf, in one batched backward pass over the one-hot
    cotangents; the outputs must be affine in the readouts (a nonlinear function of a Gaussian readout is not
    Gaussian: its covariance is not ``J Σ Jᵀ``)."""
    leaves = readouts + scalars
    basis = _identity(f.numel(), f)
    grads = torch.autograd.grad(f, leaves, basis, retain_graph=True, allow_unused=True, create_graph=True,
                                is_grads_batched=True)
    connected = [g for g in grads[: len(readouts)] if g is not None and g.requires_grad]
    if connected:
        second = torch.autograd.grad(sum(g.sum() for g in connected), readouts, retain_graph=True, allow_unused=True)
        if any(s is not None for s in second):  # connected, even if zero here (an odd function at 0)
            raise NotGaussian("the outputs are a nonlinear function of the averages over width; their law at "
                              "initialization is not Gaussian")
    return [f.new_zeros(f.numel(), t.numel()) if g is None else g.detach().reshape(f.numel(), -1)
            for g, t in zip(grads, leaves, strict=True)]


def _identity(size: int, like: torch.Tensor) -> torch.Tensor:
    """``eye(size)``, kept in the run's workspace when it has one (nothing writes into it)."""
    if not _ACTIVE:
        return torch.eye(size, dtype=like.dtype, device=like.device)
    key = (size, like.dtype, str(like.device))
    if key not in _ACTIVE[0].constants:
        _ACTIVE[0].constants[key] = torch.eye(size, dtype=like.dtype, device=like.device)
    return _ACTIVE[0].constants[key]


EXACT_WIDTHS = (2**10, 2**20)


def exact_kernel(setup: Any, Z: torch.Tensor, kind: str, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The limit ``n → ∞`` of the output kernel ``[J, J]`` and the outputs' shape per row. Each contribution
    (the NNGP, each parameter's NTK) is a power of ``n`` (the abcd factors and the program's width-dependent
    constants): a constant one is kept, a decaying one (an output bias under NTP) vanishes, and a growing one
    is refused. The power is a property of the program: it is read once from two widths (2^10 and 2^20) and
    remembered; after that the program runs once, at the larger width, with the NTK of the parameters that
    stay carried as one sum."""
    nngp, ntk, outputs = _limit_kernels(setup, Z, dtype, device, tangents=kind == "ntk")
    return (nngp if kind == "nngp" else ntk).clone(), outputs  # not the cached tensors themselves


_LAST: list = []  # the last inputs' kernels: the NNGP after the NTK of the same rows is free
_SCALING: list = []  # [setup, dtype, device, {parameter or NNGP: stays in the limit}] of the last program
NNGP = ""  # the NNGP's entry among the scalings (parameter names are never empty)


def _limit_kernels(setup: Any, Z: torch.Tensor, dtype: torch.dtype, device: torch.device,
                   tangents: bool) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    key = (digest(Z), dtype, str(device))
    if _LAST and _LAST[0] is setup and _LAST[1] == key and (_LAST[2] or not tangents):
        return _LAST[3]
    if not (_SCALING and _SCALING[0] is setup and _SCALING[1:3] == [dtype, str(device)]):
        _SCALING[:] = [setup, dtype, str(device), {}]
    kept: dict[str, bool] = _SCALING[3]
    _LAST.clear()  # its kernels may lie in the buffers this run deals out again
    large = kernels_at(setup, Z, EXACT_WIDTHS[1], dtype, device, tangents, kept, workspace=True)
    parts = {NNGP: large.nngp, **large.ntk}
    unknown = [name for name in parts if name != STAYING and kept.get(name) is None]
    if unknown:  # the powers of these contributions: from the same rows at the smaller width
        small = kernels_at(setup, Z, EXACT_WIDTHS[0], dtype, device, tangents, kept)  # once: no buffers kept
        smaller = {NNGP: small.nngp, **small.ntk}
        for name in unknown:
            what = "the NNGP" if name == NNGP else f"the NTK of {name!r}"
            stays = _scaling_of(what, smaller.get(name, torch.zeros_like(large.nngp)), parts[name])
            if stays is not None:
                kept[name] = stays
    limit = {name: k for name, k in parts.items() if name == STAYING or kept.get(name, True)}
    nngp = limit.pop(NNGP) if NNGP in limit else torch.zeros_like(large.nngp)
    ntk = None
    for name in sorted(limit):
        ntk = limit[name] if ntk is None else ntk + limit[name]
    ntk = ntk if ntk is not None else torch.zeros_like(nngp)
    result = (nngp, ntk if tangents else None, large.outputs)
    _LAST[:] = [setup, key, tangents, result]
    return result


def _scaling_of(what: str, small: torch.Tensor, large: torch.Tensor) -> bool | None:
    """Whether a contribution stays (the two widths agree to rounding of the dtype) or vanishes (it decays at
    least like ``n^-1/2`` between them); ``None`` when it is zero at both (its power unknown from these rows). A
    contribution that grows, or changes otherwise, has no limit here. Non-finite kernels (overflow) decide
    nothing: they raise, where ``inf <= c·inf`` would have called the contribution vanishing."""
    if not (bool(torch.isfinite(large).all()) and bool(torch.isfinite(small).all())):
        raise Diverged(f"the exact path met non-finite entries in {what} at initialization (inputs or parameters too "
                       "large for the dtype); use float64 or smaller inputs", value="kernel")
    top = max(float(large.abs().max()), float(small.abs().max()))
    if top == 0:
        return None
    tolerance = max(1e-9, 1e4 * torch.finfo(large.dtype).eps)
    if float((large - small).abs().max()) <= tolerance * top:
        return True
    if float(large.abs().max()) <= (EXACT_WIDTHS[0] / EXACT_WIDTHS[1]) ** 0.5 * float(small.abs().max()):
        return False
    raise NotGaussian(f"{what} is not a power of the width that converges (max {float(small.abs().max()):.3g} at "
                      f"n = {EXACT_WIDTHS[0]}, {float(large.abs().max()):.3g} at n = {EXACT_WIDTHS[1]})")
