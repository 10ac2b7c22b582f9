"""The ket machinery shared by the limit engines: initial matrices as operators on kets (Def 2.6.5,
2.6.7) with their accumulated updates (Eq. 2.45), and :class:`KetInterpreter`, the program evaluated
on particles.

Kets are stored as particles: a vector of the program whose width axis has ratio ``r`` becomes a
tensor whose width axis has ``r·P`` entries, each an iid sample of the ket. Every matrix use is
brought to a canonical form ``[F, P_in, K]``: ``F`` enumerates the matrix's fixed axes (kernel
offsets; each offset is an independent matrix), ``K`` the components (inputs, positions) the
matrix is applied to at once.

``⟦W⟧|x⟩ = |Ŵx⟩ + |Ẇx⟩ + ΔW x``:

* hats (:class:`HatFamily`): per matrix and separately per direction (W, Wᵀ) an orthonormal basis
  ``E`` of the kets it has been applied to and iid ``N(0, 1)`` coordinates ``G`` in the other
  space; a new hat is ``G·⟨E, x⟩`` plus fresh Gaussians on the part of ``x`` outside the span,
  so hats of one family are jointly Gaussian with covariance ``⟨x|y⟩`` (Eq. 2.18);
* dots (Eq. 2.19): ``std · E' · Σ_i ∂x[i]/∂G'[i]`` with ``(E', G')`` the *other* direction's
  family. ``dots="autograd"`` differentiates each particle's ket with respect to its own
  Gaussians (every expectation detached); ``dots="stein"`` uses Gaussian integration by parts,
  ``E[∂x/∂G] = E[G x]`` (Remark 2.6.6), which needs no graph and works for any function;
* updates: ``linear`` rules (SGD, momentum) keep low-rank factors ``(A_s, B_s)`` with one
  coefficient per step, as coordinates on the two hat bases where the factor is a ket a hat sampled
  (the input ``W`` was applied to, the cotangent ``Wᵀ`` was applied to), else as columns; other
  rules keep grids of ``Q`` values trained by the finite-width optimizer itself (§11.4): the dense
  ``[P_out, P_in]`` grid against the same particle population, or
  (:class:`PairGrids`) two rectangular grids against a fixed copy population of ``P′`` particles,
  ``O(P·P′)`` instead of ``O(P²)``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from tplimits.core.interpret import FiniteInterpreter, row_sum
from tplimits.core.ir import (
    Avg,
    Constant,
    Input,
    Layout,
    MatMul,
    Nonlin,
    Regroup,
    Width,
    WidthInt,
    map_args,
    substitute,
    width_axes,
)
from tplimits.core.program import Program
from tplimits.core.pullback import Pullback, materialized
from tplimits.errors import Diverged, NotRepresentable, TplimitsError
from tplimits.limit.distributed import Shard, particle_sum
from tplimits.limit.gaussians import standard_normal
from tplimits.limit.runs import EXPLOSION, rms

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _to_letters(t: torch.Tensor, have: str, want: str, sizes: dict[str, int]) -> torch.Tensor:
    """``t`` (axes named by ``have``) as a tensor with axes ``want``: missing letters are broadcast,
    letters of ``have`` absent from ``want`` are summed."""
    kept = "".join(c for c in have if c in want)
    out = torch.einsum(f"{have}->{kept}", t) if kept != have else t
    shape = [sizes[c] for c in want]
    perm_source = "".join(c for c in want if c in kept)
    out = torch.einsum(f"{kept}->{perm_source}", out) if perm_source != kept else out
    view = [sizes[c] if c in kept else 1 for c in want]
    return out.reshape(view).expand(shape)


def _narrow(t: torch.Tensor, letters: str, letter: str, rows: slice) -> torch.Tensor:
    """``t`` (axes named by ``letters``) restricted to ``rows`` along the axis named ``letter``, if it has one."""
    if letter not in letters:
        return t
    return t[(slice(None),) * letters.index(letter) + (rows,)]


class MatMulPlan:
    """How one MatMul instruction maps its vector to the canonical ``[F, P_in, K]`` form and back."""

    def __init__(self, equation: str, name: str, matrix_layout: Layout, in_axis: int,
                 vector_shape: Sequence[int]) -> None:
        lhs, self.out_letters = equation.split("->")
        self.m_letters, self.x_letters = lhs.split(",")
        width = [i for i, spec in enumerate(matrix_layout) if isinstance(spec, Width)]
        if len(width) != 2 or in_axis not in width:
            raise TplimitsError(f"%{name}: the limit engine needs a matrix with two width axes "
                                f"(got layout {matrix_layout})")
        out_axis = width[0] if width[1] == in_axis else width[1]
        in_letter, out_letter = self.m_letters[in_axis], self.m_letters[out_axis]
        if in_letter in self.x_letters:
            self.direction, self.a, self.b = "forward", in_letter, out_letter
        else:
            self.direction, self.a, self.b = "transposed", out_letter, in_letter
        self.fixed = "".join(c for i, c in enumerate(self.m_letters) if i not in width)
        missing = [c for c in self.fixed if c not in self.x_letters]
        if missing:
            raise TplimitsError(f"%{name}: a fixed axis of the matrix is not an axis of the vector it multiplies "
                                f"({equation}); the limit engine cannot split it into independent matrices")
        self.components = "".join(c for c in self.x_letters if c not in self.fixed and c != self.a)
        self.sizes = dict(zip(self.x_letters, vector_shape, strict=True))
        self.n_fixed = 1
        for c in self.fixed:
            self.n_fixed *= self.sizes[c]
        self.n_components = 1
        for c in self.components:
            self.n_components *= self.sizes[c]
        self.equation = equation

    @classmethod
    def of(cls, ins: MatMul, matrix_layout: Layout, in_axis: int, vector_shape: Sequence[int]) -> MatMulPlan:
        return cls(ins.equation, ins.name, matrix_layout, in_axis, vector_shape)

    @classmethod
    def of_gradient_term(cls, equation: str, name: str, matrix_layout: Layout, in_axis: int,
                         vector_shape: Sequence[int]) -> MatMulPlan:
        """The plan of the use ``h = W x`` behind a gradient term ``einsum("h,x->W", dh, x)``."""
        lhs, m_letters = equation.split("->")
        out_letters, x_letters = lhs.split(",")
        return cls(f"{m_letters},{x_letters}->{out_letters}", name, matrix_layout, in_axis, vector_shape)

    def canonical(self, x: torch.Tensor, letters: str | None = None) -> torch.Tensor:
        """``x`` (axes ``letters``, default the vector's) as ``[F, P, K]``, the width letter being ``a`` or ``b``."""
        letters = self.x_letters if letters is None else letters
        width_letter = self.a if self.a in letters else self.b
        sizes = {**self.sizes, width_letter: x.shape[letters.index(width_letter)]}
        want = self.fixed + width_letter + self.components
        if self.fixed and x.requires_grad and all(x.stride(letters.index(c)) == 0 for c in self.fixed):
            # one vector for every fixed index (a convolution's cotangent, broadcast over kernel offsets): kept
            # one tensor, expanded, so autograd dots differentiate it once for all offsets (HatFamily.dot)
            one = x[tuple(slice(0, 1) if c in self.fixed else slice(None) for c in letters)]
            t = _to_letters(one, letters, want, {**sizes, **dict.fromkeys(self.fixed, 1)})
            return t.reshape(1, sizes[width_letter], self.n_components).expand(self.n_fixed, -1, -1)
        t = _to_letters(x, letters, want, sizes)
        return t.reshape(self.n_fixed, sizes[width_letter], self.n_components)

    def restore(self, y: torch.Tensor) -> torch.Tensor:
        """A canonical ``[F, P_out, K]`` result back to the MatMul's output axes."""
        sizes = {**self.sizes, self.b: y.shape[1]}
        shape = [sizes[c] for c in self.fixed] + [y.shape[1]] + [sizes[c] for c in self.components]
        have = self.fixed + self.b + self.components
        return torch.einsum(f"{have}->{self.out_letters}", y.reshape(shape))


class _Columns:
    """Tensors ``[..., k_i]`` joined along their last axis as they arrive.

    Without autograd the columns live in one buffer, so an append copies only the new columns and the
    concatenation is a view. The buffer grows geometrically until :meth:`reserve` sizes it for the rest of
    the run (a step's columns are known after one step), after which it never grows, so no append copies
    the old columns again. Differentiable columns (autograd dots) stay separate tensors, since they are
    the leaves gradients are taken against; their concatenation is cached until the next append.

    On a CPU (``device``) the columns of a *thin* store are also kept transposed (``[..., k_i, P]``, each column
    contiguous), for :meth:`reduce`: the BLAS runs ``Cᵀx`` for a ``x`` of few components (``K`` up to about
    128) from that layout 1.4–2.2× as fast as from ``[P, Σk]``, while the products the other way (``C @
    coefficients``) are fastest from the columns as they are, so both are kept, at twice the memory. With more
    components the two layouts run alike, so a store whose first append is wider than :attr:`THIN` columns (a
    convolution's ``batch × positions``) keeps no mirror and saves its memory and copies (docs/performance.md,
    "Sums over particles from rows"; which layout wins is the BLAS's property, measured by
    ``benchmarks/bench_limit.py thin``). The first append decides, as the kets a store reduces have as many
    components as the ones it stores; ``mirrored`` (a restored store) decides instead.
    """

    GROWTH = 1.5
    THIN = 128  # the most columns per append for which the mirror pays (measured: 1.4× at 128, 1.0× at 256)

    def __init__(self, differentiable: bool, device: torch.device, mirrored: bool | None = None) -> None:
        self.differentiable = differentiable
        self.may_mirror = device.type == "cpu" and not differentiable
        self.mirrored: bool | None = None if mirrored is None else self.may_mirror and mirrored  # None: undecided
        self.parts: list[torch.Tensor] = []
        self._joined: torch.Tensor | None = None
        self._mirror: torch.Tensor | None = None  # [..., capacity, P]: the columns as rows
        self._size = 0
        self.demand = 0  # the most columns asked for since the last reserve (appended or not)

    def append(self, t: torch.Tensor) -> None:
        if self.differentiable:
            self.parts.append(t)
            self._joined = None
            self._size += t.shape[-1]
            return
        if self.mirrored is None:
            self.mirrored = self.may_mirror and t.shape[-1] <= self.THIN
        new_size = self._size + t.shape[-1]
        if self._joined is None or new_size > self._joined.shape[-1]:
            self._grow(t, max(new_size, int(self.GROWTH * self._size)))
        self._joined[..., self._size: new_size] = t.detach()
        if self.mirrored:
            self._mirror[..., self._size: new_size, :] = t.detach().mT
        self._size = new_size

    def _grow(self, like: torch.Tensor, capacity: int) -> None:
        grown = like.new_empty(*like.shape[:-1], capacity)
        if self._joined is not None:
            grown[..., : self._size] = self._joined[..., : self._size]
        self._joined = grown
        if self.mirrored:
            mirror = like.new_empty(*like.shape[:-2], capacity, like.shape[-2])
            if self._mirror is not None:
                mirror[..., : self._size, :] = self._mirror[..., : self._size, :]
            self._mirror = mirror

    @property
    def capacity(self) -> int:
        """The columns the buffer holds room for (differentiable columns: those there are)."""
        return self._size if self.differentiable or self._joined is None else self._joined.shape[-1]

    def restore(self, t: torch.Tensor, capacity: int) -> None:
        """Fill an empty store with the saved columns ``t`` in a buffer of the saved ``capacity``: a view of the
        columns then has the saved strides, and the BLAS, whose rounding depends on them (a product with a
        ``[P, r]`` view of row stride 17 differs in the last bit from one of stride 16), sums as in the run a
        resumed one continues."""
        self.append(t)
        if not self.differentiable and capacity > self._joined.shape[-1]:
            self._grow(self._joined, capacity)

    def reserve(self, rounds: int, most: int | None = None) -> None:
        """Room for ``rounds`` more rounds asking as many columns as the ones since the last reserve (at most
        ``most`` columns in all), allocated now, so the buffer is not copied again."""
        want = self._size + self.demand * rounds
        want = want if most is None else min(want, most)
        self.demand = 0
        if not self.differentiable and self._joined is not None and want > self._joined.shape[-1]:
            self._grow(self._joined, want)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """``Cᵀx`` (detached) for the columns ``C`` ``[F, P, r]`` and ``x`` ``[F, P, K]``, a sum over particles:
        ``[F, r, K]``. Only when there are columns."""
        if self.mirrored:
            return self._mirror[..., : self._size, :] @ x.detach()
        return _reduce(self.cat().detach(), x.detach())

    def cat(self) -> torch.Tensor | None:
        if self._size == 0:
            return None
        if not self.differentiable:
            return self._joined[..., : self._size]
        if self._joined is None:
            self._joined = self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts, dim=-1)
        return self._joined


class _Coordinates:
    """Coordinate blocks ``[F, r_s, k_s]`` joined along their columns, each over the first ``r_s`` columns of a
    basis that only grows: read as one ``[F, rows, Σ k_s]`` matrix, zero below each block's own rows. The basis
    holds at most ``most_rows`` columns (its particles), so the rows never grow past them."""

    GROWTH = 1.5

    def __init__(self, most_rows: int) -> None:
        self.most_rows = most_rows
        self.buffer: torch.Tensor | None = None
        self.rows = 0
        self.cols = 0

    def append(self, block: torch.Tensor) -> None:
        F, r, k = block.shape
        rows, cols = max(self.rows, r), self.cols + k
        have = (0, 0) if self.buffer is None else self.buffer.shape[1:]
        if rows > have[0] or cols > have[1]:
            # each axis grows only when it must: the rows stop at the basis's size while the columns grow every
            # step, and growing both together made a [F, 5184, 5184] buffer for [F, 1024, 5120] coordinates
            grown = block.new_zeros(F, *(max(need, min(most, int(self.GROWTH * size))) if need > size else size
                                         for need, size, most in ((rows, have[0], self.most_rows),
                                                                  (cols, have[1], math.inf))))
            if self.buffer is not None:
                grown[:, : self.rows, : self.cols] = self.matrix()
            self.buffer = grown
        self.buffer[:, :r, self.cols: cols] = block
        self.rows, self.cols = rows, cols

    def matrix(self) -> torch.Tensor | None:
        return None if self.buffer is None else self.buffer[:, : self.rows, : self.cols]


def _padded_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` for ``[..., r, c]`` tensors whose last two sizes may differ, each zero-padded to the larger."""
    rows, cols = max(a.shape[-2], b.shape[-2]), max(a.shape[-1], b.shape[-1])
    total = a.new_zeros(*a.shape[:-2], rows, cols)
    total[..., : a.shape[-2], : a.shape[-1]] = a
    total[..., : b.shape[-2], : b.shape[-1]] += b
    return total


class _Overlaps:
    """``EᵀE − D`` of a hat basis ``E`` (``D``: one on its used columns, zero on a fixed index's columns of zeros),
    ``[F, r, r]``, each block of columns entered one sample after it was added: its overlaps are a by-product of
    the next sample's sum over particles (:meth:`HatFamily.sample`), so keeping them costs no pass over the
    basis of its own."""

    GROWTH = 1.5

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.size = 0  # the columns whose overlaps with every earlier column are entered

    def enter(self, block: torch.Tensor) -> None:
        """The last ``k`` columns' products with all ``r`` columns, ``[F, r, k]`` (``r − k`` = the columns entered
        before)."""
        F, r, k = block.shape
        start = r - k
        if self.buffer is None or r > self.buffer.shape[1]:
            grown = block.new_zeros(F, *(2 * [max(r, int(self.GROWTH * self.size))]))
            if self.buffer is not None:
                grown[:, : self.size, : self.size] = self.matrix()
            self.buffer = grown
        deviation = block.clone()
        own = deviation[:, start:].diagonal(dim1=1, dim2=2)
        own -= (own > 0.5).to(own.dtype)  # a used column's norm is one, a column of zeros' zero
        self.buffer[:, :r, start:r] = deviation
        self.buffer[:, start:r, :start] = deviation[:, :start].mT
        self.size = r

    def matrix(self) -> torch.Tensor | None:
        return None if self.buffer is None else self.buffer[:, : self.size, : self.size]

    def coordinates(self, inner: torch.Tensor) -> torch.Tensor:
        """The coordinates ``c`` with ``Eᵀ(E c) = inner`` (``Eᵀx``) to first order in the deviation, whose
        square (about 10⁻²⁴ in float64) is far below rounding."""
        return inner - self.matrix() @ inner


Terms = list[tuple[torch.Tensor, torch.Tensor]]
"""``[(basis [F, P, r_i], coefficients [F, r_i, K])]``: the ket ``Σ_i basis_i @ coefficients_i``, left as
factors so all of one matrix application's terms are summed by :func:`_expand` in one pass."""


def _reduce(basis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``basisᵀ x`` for ``[F, P, r]`` and ``[F, P, K]`` (a sum over particles): ``[F, r, K]``.

    Used where the columns have no mirror (a GPU, autograd dots, wide stores); formed as ``(xᵀ basis)ᵀ``, which
    ran faster than ``basisᵀ x`` on every CPU measured (docs/performance.md, "Sums over particles from rows")."""
    return (x.mT @ basis).mT


def _expand(terms: Terms) -> torch.Tensor | None:
    """``Σ_i basis_i @ coefficients_i`` (:data:`Terms`): ``[F, P, K]``, contiguous; None for no terms.

    Every term after the first adds into the same result (no temporaries); with the columns in their
    ``[P, r]`` layout the BLAS runs these thin products faster than transposed (docs/performance.md, "Sums over
    particles from rows")."""
    total = None
    for basis, coefficients in terms:
        total = basis @ coefficients if total is None else total.baddbmm_(basis, coefficients)
    return total


JUMP_BANDWIDTH = 1.0  # the point mass's Gaussian width, in standard deviations of its argument, at one particle


def smoothed_jumps(x: torch.Tensor, dy: torch.Tensor, kinks: Sequence[tuple[float, float]],
                   particles: int) -> torch.Tensor:
    """A term of value zero whose derivative in ``x`` is ``dy · Σ_j size_j φ_ε(x − point_j)``: added to the
    pullback ``dy · f'(x)`` of a function whose derivative jumps by ``size_j`` at ``point_j`` (``Nonlin.kinks``),
    it gives autograd dots the point masses of ``f''`` that per-particle autograd misses, as Gaussian kernel
    density estimates over the particles (bias O(ε²), variance O(1/(εP)) per component).

    ``ε = JUMP_BANDWIDTH · std(x) · P^(-1/5)``, the rate that balances a kernel density estimate's squared
    bias and variance. Noise in such an estimate multiplies the component's own ket (``E[∂δ_k/∂Ĝ]`` along
    the directions of ``x_k``'s application), one number per component, where Stein's estimate adds noise
    along every direction of the family."""
    xd = x.detach()
    spread = xd.std() if xd.numel() > 1 else xd.new_tensor(1.0)
    eps = JUMP_BANDWIDTH * float(spread) * particles ** -0.2
    if not math.isfinite(eps) or eps <= 0:
        return torch.zeros_like(dy)
    total = None
    for point, size in kinks:
        cdf = torch.special.ndtr((x - point) / eps) * size
        total = cdf if total is None else total + cdf
    return (total - total.detach()) * dy.detach()


STEIN_PARTICLES_PER_DIRECTION = 32  # tests/test_conv_dots.py: 128 directions on 1024 particles biased a kernel 2×


class HatFamily:
    """The hat-kets of one initial matrix in one direction (W or Wᵀ), jointly Gaussian (Eq. 2.18)."""

    BATCHED_ENTRIES = 2 ** 22  # entries of the cotangents one batched autograd pass carries (autograd dots)
    DROP = 1e-10  # a residual direction with less than this share of the ket's energy is in the span already
    # Stein dots: a new direction carrying less than STEIN_SHARE / P of the ket's energy (P: the particles a Stein
    # sum runs over) is left out, hat and dot alike, where the system has STEIN_PARTICLES_PER_DIRECTION particles
    # for each of the ket's components (docs/limit.md, "Which directions a hat keeps"). The left-out part's Stein
    # dot biases the limit by about STEIN_SHARE^0.4 (digits under Adam: 0.0058 at 4, 0.0010 at 1/16, for 1.05× the
    # time of the reference case; docs/performance.md, "Hats of one matrix by default")
    STEIN_SHARE = 1 / 16
    SINGLE_PASS_OVERLAP = 1e-10  # the most overlap with the basis a new direction may have after one pass
    # Stein dots with the hats of one matrix (partner, _against_partner): the same limit at 0.63–0.65 of the
    # standard error, and no bias from few particles per component (docs/performance.md, "Hats of one matrix by
    # default"); False gives the independent hats of the earlier rounds, for comparison
    CONSISTENT = True

    def __init__(self, n_fixed: int, p_in: int, p_out: int, generator: torch.Generator, dtype: torch.dtype,
                 device: torch.device, track_grad: bool, shard: Shard | None = None, name: str = "a matrix") -> None:
        self.name = name  # for errors: the parameter and the direction
        self.n_fixed, self.p_in, self.p_out = n_fixed, p_in, p_out
        self.generator, self.dtype, self.device = generator, dtype, device
        self.track_grad = track_grad
        # the least share of a ket's energy a direction must carry to be kept: rounding under autograd dots; under
        # Stein dots more, as each direction kept adds Stein noise to every later dot, a bias downstream
        self.least_share = self.DROP if track_grad else max(self.DROP, self.STEIN_SHARE / p_out)
        self.shard = shard  # a sharded system: this rank's particles only, every sum over them all-reduced
        self.basis = _Columns(track_grad, device)  # E: [F, P_in, r], orthonormal (Euclidean) over input particles
        self.gaussians = _Columns(track_grad, device)  # G: [F, P_out, r], iid N(0, 1)
        # a family applied to few components at a time (thin) keeps EᵀE − I and projects with it in one pass
        # (_needs_second_pass); decided at the first sample
        self.lagged: bool | None = None
        self.overlaps = _Overlaps()
        self.second_passes = 0  # applications that took a second Gram–Schmidt pass (benchmarks read it)
        self.left_out = 0  # directions above rounding left out under Stein dots (least_share)
        # under Stein dots, the transpose's family (set by MatrixOperator): a new direction's Gaussians take their
        # components along its basis from its Gaussians, so that the matrix and its transpose agree
        # (:meth:`_against_partner`), and the last sampled ket's part outside the basis, the directions left out
        # (None: none), is all a dot is still needed for
        self._partner: weakref.ReferenceType[HatFamily] | None = None
        self.outside: torch.Tensor | None = None
        # the kets sampled since the last forget(), with their coordinates on E: [F, r, K], kept when the
        # matrix's updates are low-rank factors (MatrixOperator.add_factor) and not under autograd
        self.remembers = False
        self.sampled: list[tuple[torch.Tensor, torch.Tensor]] = []

    def sample(self, x: torch.Tensor, scale: float = 1.0) -> tuple[Terms, torch.Tensor | None]:
        """The hat of this matrix applied to ``x`` ([F, P_in, K]) for entry standard deviation ``scale``, as
        :data:`Terms` on this family's Gaussians (``[F, P_out, K]`` once expanded; no terms: zero), and
        ``Eᵀx`` on the basis as it was before (``[F, r, K]``; None for an empty basis).

        ``x`` lies in the span of the basis afterwards, up to the directions left out (:meth:`_kept`); where
        those are rounding only, its coordinates on it are kept until :meth:`forget`: a gradient factor that is
        this very ket is then held as coordinates (:meth:`coordinates`) instead of a ``[P, K]`` block."""
        xd = x.detach()
        self.outside = None
        self.basis.demand += x.shape[2]  # up to K new directions per application
        self.gaussians.demand += x.shape[2]
        if self.lagged is None:  # decided once, so a run keeps one scheme (and a resumed run the same)
            self.lagged = x.shape[2] <= _Columns.THIN
        E = self.basis.cat()
        terms: Terms = []
        inner = coef = None  # Eᵀx, and the coordinates of x's part in the span (equal for an orthonormal E)
        resid, rd = x, xd  # residuals (differentiable, detached): [F, P_in, K]
        if E is not None:
            Ed = E.detach()
            inner = self._inner(xd, Ed)
            if E.shape[-1] >= self.p_in:  # the basis spans the particles: x is in it, its residual only rounding
                terms.append((self.gaussians.cat(), inner * scale))
                self._remember(xd, inner)
                return terms, inner
            coef = self.overlaps.coordinates(inner) if self.lagged else inner
            rd = torch.baddbmm(xd, Ed, coef, alpha=-1)
        norm2 = particle_sum((xd * xd).sum(dim=(1, 2)), self.shard).clamp_min(torch.finfo(self.dtype).tiny)
        directions = self._residual_directions(rd, norm2)
        if E is not None and directions is not None and self._needs_second_pass(*directions, xd, norm2):
            self.second_passes += 1
            correction = particle_sum(self.basis.reduce(rd), self.shard)
            coef = coef + correction
            rd = rd.baddbmm_(Ed, correction, alpha=-1)
            directions = self._residual_directions(rd, norm2)
        if E is not None:
            resid = torch.baddbmm(x, E, coef, alpha=-1) if x.requires_grad or E.requires_grad else rd
            terms.append((self.gaussians.cat(), coef * scale))
        keep, spanned = None, True
        if directions is not None:
            keep, above_rounding = self._kept(directions[0], norm2)
            left_out = int((above_rounding & ~keep).sum())
            self.left_out += left_out
            spanned = left_out == 0  # else x's coordinates on the basis are not x
            if not spanned:
                self.outside = self._left_out_part(rd, directions[1], keep)
        if keep is None or not keep.any():  # every direction is in the span already (for every fixed index)
            if spanned:
                self._remember(xd, coef)
            return terms, inner
        evals, vecs = directions
        new_directions = keep.any(dim=0)
        room = self.p_in - (0 if E is None else E.shape[-1])
        surplus = int(new_directions.sum()) - room
        if surplus > 0:  # more directions than the particles hold: the smallest (eigh ascends) are rounding
            new_directions[new_directions.nonzero().flatten()[:surplus]] = False
        keep, evals, vecs = keep[:, new_directions], evals[:, new_directions], vecs[..., new_directions]
        root = torch.where(keep, evals.clamp_min(0).sqrt(), torch.zeros_like(evals))
        inv_root = torch.where(keep, 1 / root.clamp_min(torch.finfo(self.dtype).tiny), torch.zeros_like(evals))
        # made as rows ([F, k, P], contiguous): _Columns copies new columns fastest from there
        E_new = ((vecs * inv_root[:, None, :]).mT @ resid.mT).mT
        R = (vecs * root[:, None, :]).transpose(1, 2)
        G_new = self._paired_gaussians(x.shape[2], vecs)
        if self.partner is not None:
            G_new = self._against_partner(G_new, E_new)
        if self.track_grad:
            G_new.requires_grad_(True)
        self.basis.append(E_new)
        self.gaussians.append(G_new)
        terms.append((G_new, R * scale))
        if spanned:
            self._remember(xd, R if coef is None else torch.cat([coef, R], dim=1))
        return terms, inner

    def _paired_gaussians(self, components: int, vecs: torch.Tensor) -> torch.Tensor:
        """The Gaussians of the new directions ``E_new = resid · V Λ^-1/2`` (``vecs``: ``V``, ``[F, K, k]``): iid
        ``N(0, 1)`` drawn per component of the ket, ``H`` (``[F, P_out, K]``), then ``H V``, iid too (``V``'s
        columns are orthonormal). Eigenvectors of (nearly) equal eigenvalues are fixed only up to a rotation,
        which rounding chooses; ``E_new`` and ``H V`` turn together, so the hats ``H V Vᵀ …`` do not depend on
        it, and a sharded system (its sums in another order) draws the unsharded one's hats."""
        H = standard_normal((self.n_fixed, self.p_out, components), self.generator, self.dtype, self.device)
        if self.shard is not None:  # drawn whole, as in one process, and cut to this rank's rows
            H = self.shard.rows(H, 1)
        return H @ vecs

    @property
    def partner(self) -> HatFamily | None:
        """The transpose's family (hats of one matrix), held weakly: the two refer to each other, and the cycle
        would keep both, with their column stores, alive after their matrix until the garbage collector ran (on a
        GPU, a finished system's memory under the next one's)."""
        return None if self._partner is None else self._partner()

    @partner.setter
    def partner(self, family: HatFamily | None) -> None:
        self._partner = None if family is None else weakref.ref(family)

    def _against_partner(self, G_new: torch.Tensor, E_new: torch.Tensor) -> torch.Tensor:
        """The Gaussians of new directions ``E_new`` with their components along the transpose's basis ``E'``
        replaced by that family's: ``G_new + E'(G'ᵀE_new − E'ᵀG_new)``. A matrix ``W`` has one number
        ``e'ᵀWe`` per pair of directions, which both ``(We)`` and ``(Wᵀe')`` carry; drawn independently, every
        pair would carry two, and a ket's Stein dot would add the noise of every direction of ``E'`` whatever
        the ket's share along it. The directions already in ``E'`` are known functions of the past, and ``G'``
        and ``G_new`` stay iid Gaussian apart from the numbers the two directions share."""
        partner = self.partner.basis.cat()
        if partner is None:
            return G_new
        along = particle_sum(self.partner.basis.reduce(G_new), self.shard)  # E'ᵀG_new: [F, r', k]
        shared = particle_sum(self.partner.gaussians.reduce(E_new), self.shard)  # G'ᵀE_new: [F, r', k]
        return torch.baddbmm(G_new, partner, shared - along)

    @staticmethod
    def _left_out_part(residual: torch.Tensor, vecs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The part of ``residual`` ([F, P, K]) along the eigen-directions ``vecs`` ([F, K, K]) not kept."""
        left = vecs * (~keep)[:, None, :]
        return residual @ left @ left.mT

    def _inner(self, xd: torch.Tensor, Ed: torch.Tensor) -> torch.Tensor:
        """``Eᵀx`` ([F, r, K]). A lagged family sums the columns the last sample added along with ``x`` (one
        product of ``K + k`` columns instead of a second pass over the basis of ``k``) and enters their
        overlaps (:class:`_Overlaps`)."""
        added = Ed.shape[-1] - self.overlaps.size
        if not self.lagged or added == 0:
            return particle_sum(self.basis.reduce(xd), self.shard)
        sums = particle_sum(self.basis.reduce(torch.cat([xd, Ed[..., -added:]], dim=2)), self.shard)
        self.overlaps.enter(sums[..., xd.shape[2]:])
        return sums[..., : xd.shape[2]]

    def _remember(self, x: torch.Tensor, coordinates: torch.Tensor | None) -> None:
        if self.remembers and not self.track_grad and coordinates is not None:
            self.sampled.append((x, coordinates))

    def coordinates(self, x: torch.Tensor) -> torch.Tensor | None:
        """The coordinates ``[F, r, K]`` on the basis of ``x`` when it is (bit for bit) a ket sampled since the
        last :meth:`forget`; else None."""
        for sampled, coordinates in self.sampled:
            same = sampled.shape == x.shape and torch.equal(sampled, x.detach())
            if self.shard is not None:  # every rank decides alike
                same = not self.shard.any(not same)
            if same:
                return coordinates
        return None

    def forget(self) -> None:
        self.sampled.clear()

    def _residual_directions(self, residual: torch.Tensor,
                             norm2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The eigenvalues ``[F, K]`` and eigenvectors ``[F, K, K]`` of the residual's Gram matrix (every rank:
        the same); None when its trace, the largest eigenvalue's bound, leaves no direction to keep."""
        gram = particle_sum(residual.mT @ residual, self.shard)
        if bool((gram.diagonal(dim1=1, dim2=2).sum(dim=1) <= self.DROP * norm2).all()):
            return None
        try:
            return torch.linalg.eigh(gram)
        except torch.linalg.LinAlgError as error:
            raise TplimitsError(
                f"{self.name}: the Gram matrix of the new hat directions ([{gram.shape[0]}, {gram.shape[1]}, "
                f"{gram.shape[2]}], {self.dtype}) has no eigendecomposition ({error}). Run the limit in float64 "
                "(dtype=torch.float64, the default) or with fewer components per step") from None

    def _kept(self, evals: torch.Tensor, norm2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of the residual's directions (``evals`` ``[F, K]``) a sample keeps, and which are above rounding:
        those carrying more than :attr:`least_share` of the ket's energy ``norm2``, where the particles suffice
        for Stein dots over its ``K`` components (below that, where a run is warned of their bias, leaving
        directions out would add to it), else those above rounding."""
        shares = evals / norm2[:, None]
        above_rounding = shares > self.DROP
        if self.p_out < STEIN_PARTICLES_PER_DIRECTION * evals.shape[1]:
            return above_rounding, above_rounding
        return shares > self.least_share, above_rounding

    def _needs_second_pass(self, evals: torch.Tensor, vecs: torch.Tensor, x: torch.Tensor,
                           norm2: torch.Tensor) -> bool:
        """Whether one classical Gram–Schmidt pass leaves a new direction too far from orthogonal to the basis.

        One pass leaves the residual an overlap with the basis of about ``(eps + δ)·‖x_j‖`` along each
        eigen-direction ``j`` of the residual (``δ``: the error of the projection's coordinates); normalizing a
        direction that kept a fraction ``ρ_j`` of its norm (``ρ_j² = λ_j / vⱼᵀ xᵀx vⱼ``) multiplies that by
        ``1/ρ_j``. Kets that move little per step keep ``ρ`` near ``10⁻³``.

        * A lagged family projects with its basis's known overlaps (:class:`_Overlaps`), so ``δ`` is rounding
          too: the second pass is needed only when ``eps/ρ_j`` passes :attr:`SINGLE_PASS_OVERLAP` (float32, or
          a ket all but in the span).
        * Otherwise ``δ`` is the basis's own deviation from orthonormality, which would grow by ``1/ρ`` at every
          step: the pass is taken when a direction has lost more than half of its energy (``λ_j < ½ vⱼᵀ xᵀx
          vⱼ``), the "twice is enough" criterion.
        """
        kept = self._kept(evals, norm2)[0]
        if not kept.any():
            return False
        energy = particle_sum(x.mT @ x, self.shard)  # [F, K, K]
        along = ((energy @ vecs) * vecs).sum(dim=1)  # vⱼᵀ xᵀx vⱼ, [F, K]
        if self.lagged:
            eps = torch.finfo(self.dtype).eps
            inverse_share = (along / evals.clamp_min(torch.finfo(self.dtype).tiny)).clamp_min(0).sqrt()  # 1/ρ_j
            return bool((kept & (eps * inverse_share > self.SINGLE_PASS_OVERLAP)).any())
        return bool((kept & (evals < 0.5 * along)).any())

    def dot(self, x: torch.Tensor, mode: str, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``scale · E · Σ_i ∂x[i]/∂G[i]`` for ``x`` living in this family's *output* space ([F, P_out, K]): the
        dot-ket of the opposite direction's matrix applied to ``x``, as one of :data:`Terms`; None when this
        family is still empty."""
        E = self.basis.cat()
        if E is None:
            return None
        if mode == "stein":
            S = self.gaussians.reduce(x)
        else:
            S = self._expected_derivatives(x)
            if S is None:
                return None
        return E, particle_sum(S, self.shard) * scale

    def _expected_derivatives(self, x: torch.Tensor) -> torch.Tensor | None:
        """``Σ_i ∂x[f, i, k]/∂G[f, i, r]`` → [F, r, K] by reverse-mode autograd, one pass per (f, k)."""
        if not x.requires_grad:
            return None
        leaves = self.gaussians.parts
        F, P, K = x.shape
        shared = F > 1 and x.stride(0) == 0  # one tensor for every fixed index (MatMulPlan.canonical)
        out = x[:1] if shared else x
        rows = out.shape[0] * K
        eye = torch.eye(rows, dtype=x.dtype, device=x.device).reshape(rows, out.shape[0], 1, K)
        chunk = max(1, self.BATCHED_ENTRIES // max(1, out.numel()))  # one batched pass's cotangents stay bounded
        parts = [self._sums_of_derivatives(out, leaves, eye[j: j + chunk].expand(-1, -1, P, -1))
                 for j in range(0, rows, chunk)]
        blocks = []
        for c, leaf in enumerate(leaves):
            if parts[0][c] is None:
                blocks.append(torch.zeros(F, leaf.shape[2], K, dtype=x.dtype, device=x.device))
                continue
            g = torch.cat([p[c] for p in parts]).reshape(out.shape[0], K, F, leaf.shape[2])  # [f_out, k, f_leaf, r]
            diag = g[0].transpose(0, 1) if shared else torch.stack([g[f, :, f, :] for f in range(F)])  # [F, K, r]
            blocks.append(diag.transpose(1, 2))
        return torch.cat(blocks, dim=1).detach()

    @staticmethod
    def _sums_of_derivatives(x: torch.Tensor, leaves: list[torch.Tensor],
                             cotangents: torch.Tensor) -> list[torch.Tensor | None]:
        """``Σ_i`` of each leaf's gradient against each of a batch of ``cotangents`` ([B, *x.shape]): per leaf
        ``[B, F, r]`` (None where ``x`` does not depend on it). Particles do not depend on each other's
        Gaussians, so a cotangent that is one on a component at every particle gives every particle's own
        derivative at once."""
        try:
            grads = torch.autograd.grad(x, leaves, grad_outputs=cotangents, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
        except RuntimeError:  # an op without a batching rule: one pass per cotangent
            per = [torch.autograd.grad(x, leaves, grad_outputs=c, retain_graph=True, allow_unused=True)
                   for c in cotangents]
            grads = [None if per[0][c] is None else torch.stack([p[c] for p in per]) for c in range(len(leaves))]
        return [None if g is None else g.sum(dim=2) for g in grads]


class PairGrids:
    """The accumulated update of one matrix under a nonlinear rule against a copy population (§11.1, §11.4):
    the first ``c_in`` input particles and the first ``c_out`` output particles (particles are iid, so these
    are a random subset, and the same ones at every step: the copy index stays fixed over time).

    ``W x`` sums over input particles: ``forward[f, i, c]`` pairs every output particle ``i`` with input copy
    ``c``, and ``(W x)[i] ≈ (P_in / c_in) Σ_c forward[f, i, c] x[c]``. ``Wᵀ z`` sums over output particles, so
    it has its own grid ``transposed[f, c, j]`` of output copies ``c`` against every input particle ``j``.
    Each grid carries its own optimizer state (the caller's); both see the same gradient entries as the
    dense grid ``[P_out, P_in]`` has at those pairs, so the copy grids are columns and rows of it until the
    first update they feed back through. Canonical ``[F, ·, ·]`` layout.

    Sharded (``shard``), each rank keeps the rows of ``forward`` of its output particles and the columns of
    ``transposed`` of its input particles, and the copies' rows of a ket reach every rank (:meth:`copy_rows`).
    """

    def __init__(self, n_fixed: int, p_out: int, p_in: int, copies: int, dtype: torch.dtype,
                 device: torch.device, shard: Shard | None = None) -> None:
        self.p_out, self.p_in = p_out, p_in
        self.c_out, self.c_in = min(copies, p_out), min(copies, p_in)
        self.shard = shard
        rows_out, rows_in = (p_out, p_in) if shard is None else (shard.local_size(p_out), shard.local_size(p_in))
        self.forward = torch.zeros(n_fixed, rows_out, self.c_in, dtype=dtype, device=device)
        self.transposed = torch.zeros(n_fixed, self.c_out, rows_in, dtype=dtype, device=device)

    def copy_rows(self, xc: torch.Tensor, count: int) -> torch.Tensor:
        """The first ``count`` particles (the copies) of a canonical ket ``[F, P, K]``, on every rank."""
        return xc[:, :count] if self.shard is None else self.shard.first_rows(xc, count)

    def term(self, xc: torch.Tensor, forward: bool, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``scale`` times the accumulated update (trained units) on a canonical ket, as one of :data:`Terms`
        (``[F, P_in, K] -> [F, P_out, K]`` forward, ``[F, P_out, K] -> [F, P_in, K]`` transposed): the grid
        and the copies' rows, so that :func:`_expand` forms the product with the particles along its result's
        rows, 3–4× faster than ``grid @ copies`` (docs/performance.md, "Adam path and the finite optimizer step")."""
        if forward:
            return self.forward, self.copy_rows(xc, self.c_in) * (scale * self.p_in / self.c_in)
        return self.transposed.mT, self.copy_rows(xc, self.c_out) * (scale * self.p_out / self.c_out)

    def apply(self, xc: torch.Tensor, forward: bool) -> torch.Tensor:
        """The accumulated update (trained units) on a canonical ket: ``[F, P_in, K] -> [F, P_out, K]``
        forward, ``[F, P_out, K] -> [F, P_in, K]`` transposed."""
        return _expand([self.term(xc, forward)])

    def gradient(self, which: str, out_factor: torch.Tensor, in_factor: torch.Tensor, rows: slice = slice(None),
                 copies: tuple[torch.Tensor, torch.Tensor] | None = None,
                 buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``rows`` of grid ``which``'s gradient ``out_factor · in_factorᵀ`` at its pairs (canonical factors
        ``[F, P_out, K]`` and ``[F, P_in, K]``, every term's components joined along ``K``). ``copies``: the
        factors' copy rows (``copy_rows``) when already gathered. ``buffer``: a 1-d tensor the result is written
        into (grown when too small), so that a tiled update makes no fresh tile per call; the result is then a
        view of it, valid until the next call."""
        out_copies, in_copies = copies or (self.copy_rows(out_factor, self.c_out), self.copy_rows(in_factor, self.c_in))
        left, right = (out_factor[:, rows], in_copies.mT) if which == "forward" else (out_copies[:, rows], in_factor.mT)
        if buffer is None:
            return left @ right
        shape = (left.shape[0], left.shape[1], right.shape[2])
        if buffer.numel() < math.prod(shape):
            buffer.resize_(math.prod(shape))
        return torch.bmm(left, right, out=buffer[: math.prod(shape)].view(shape))

    def norm_scale(self, which: str) -> float:
        """The dense grid's norm over the norm of grid ``which`` (its sample of the dense grid's entries)."""
        return (self.p_in / self.c_in if which == "forward" else self.p_out / self.c_out) ** 0.5

    def grids(self) -> dict[str, torch.Tensor]:
        return {"forward": self.forward, "transposed": self.transposed}


class MatrixOperator:
    """``⟦W_t⟧`` for one matrix parameter: its initial operator plus the updates accumulated so far.

    ``init`` is ``("gaussian", std)`` (the effective entry standard deviation at width P),
    ``("identity", c)`` or ``("zero", 0)``. ``scale`` is the abcd multiplier between the trained tensor
    and the matrix the model uses; updates are kept in trained units. ``dense``: a nonlinear rule's grids of
    ``Q`` values are kept, against every particle (the dense grid) or, with ``copies`` fewer than the
    particles of an axis, against that copy population (:class:`PairGrids`). A sharded system (``shard``)
    keeps its grids as pair grids, sharded by particle rows; with no fewer copies than particles they hold the
    dense grid's entries twice (rows and columns), each rank a ``1/ranks`` share. ``low_rank``: the updates are
    low-rank factors (a linear rule), so the hats keep each step's coordinates for :meth:`add_factor`, and
    those coordinates fold into dense cores on the two bases (:meth:`_fold_if_cheaper`), so the updates' cost
    stops growing with the steps.
    """

    MEMORY_RANK = 1e-12  # a direction of the rule's memory below this share of its largest is rounding
    MEMORY_SPAN = 1e-9  # the most a change to folded steps may leave outside the memory's span, relatively

    def __init__(self, name: str, shape: Sequence[int], in_axis: int, out_axis: int, init: tuple[str, float],
                 scale: float, dense: bool, generator: torch.Generator, dtype: torch.dtype, device: torch.device,
                 dots: str, copies: int | None = None, shard: Shard | None = None, low_rank: bool = False) -> None:
        self.name = name
        self.shape = tuple(shape)
        self.in_axis, self.out_axis = in_axis, out_axis
        self.p_in, self.p_out = shape[in_axis], shape[out_axis]
        self.n_fixed = 1
        for i, s in enumerate(shape):
            if i not in (in_axis, out_axis):
                self.n_fixed *= s
        self.kind, self.init_value = init
        if self.kind == "identity" and (self.p_in != self.p_out or self.n_fixed != 1):
            raise TplimitsError(f"parameter {name!r}: an identity initialization needs a square matrix")
        self.scale = scale
        self.init_scale = 1.0  # (1 - weight decay)^t · (rule rescalings) on the initial operator
        self.dots = dots
        self.shard = shard
        self.families: dict[str, HatFamily] = {}
        if self.kind == "gaussian":
            track = dots == "autograd"
            self.families = {
                "forward": HatFamily(self.n_fixed, self.p_in, self.p_out, generator, dtype, device, track, shard,
                                     f"parameter {name!r} (W)"),
                "transposed": HatFamily(self.n_fixed, self.p_out, self.p_in, generator, dtype, device, track, shard,
                                        f"parameter {name!r} (Wᵀ)"),
            }
            for family in self.families.values():
                family.remembers = low_rank  # a family under autograd dots keeps nothing (HatFamily._remember)
            if self.families["forward"].CONSISTENT and not track:  # autograd dots need iid Gaussian leaves
                self.families["forward"].partner = self.families["transposed"]
                self.families["transposed"].partner = self.families["forward"]
        paired = dense and (shard is not None or copies is not None and copies < max(self.p_in, self.p_out))
        self.dense = torch.zeros(self.shape, dtype=dtype, device=device) if dense and not paired else None
        self.pairs = None
        if paired:
            pair_copies = max(self.p_in, self.p_out) if copies is None else copies
            self.pairs = PairGrids(self.n_fixed, self.p_out, self.p_in, pair_copies, dtype, device, shard)
        self.device = device
        self.out_factors = _Columns(dots == "autograd", device)  # A = [A_s]_s: [F, P_out, Σ k_s]
        self.in_factors = _Columns(dots == "autograd", device)  # B = [B_s]_s: [F, P_in, Σ k_s]
        self.factor_steps: list[int] = []  # the step of each column of A and B
        self._column_steps: torch.Tensor | None = None
        # factors that are kets the hats sampled, held as their coordinates on the hat bases (add_factor):
        # A_s = E_T α_s on the transposed family's basis, B_s = E_F β_s on the forward family's
        self.out_coordinates, self.in_coordinates = _Coordinates(self.p_out), _Coordinates(self.p_in)
        self.coordinate_steps: list[int] = []
        self._coordinate_steps: torch.Tensor | None = None
        # the coordinates fold into a dense core on the two bases, Σ_s c_s α_s β_sᵀ ([F, r_T, r_F]), bounded by
        # the bases where the coordinates grow by K every step. A rule's later changes to folded steps'
        # coefficients lie in the span of its memory over them (the per-step tensors of its state, ``memory``,
        # set by the engine after each step): one more core per direction of that span (:meth:`add_increments`)
        self.core: torch.Tensor | None = None
        self.folded: torch.Tensor | None = None  # [steps], bool: the steps whose coordinates are in the cores
        self.modes: torch.Tensor | None = None  # [m, steps]: orthonormal over the folded steps, zero elsewhere
        self.mode_cores: torch.Tensor | None = None  # [m, F, r_T, r_F]: Σ_s modes[j, s] α_s β_sᵀ
        self.rule_name, self.memory = "", []  # set_memory: the rule's per-step state tensors after its last step
        self.coefficients = torch.zeros(0, dtype=dtype, device=device)  # one per step, trained units

    # -- applying the operator ------------------------------------------------------------------
    def apply(self, plan: MatMulPlan, x: torch.Tensor) -> torch.Tensor:
        """``⟦W⟧`` (or its transpose, as ``plan`` says) on the vector ``x`` of the MatMul's layout."""
        xc, forward = plan.canonical(x), plan.direction == "forward"
        grids = [] if self.pairs is None else [self.pairs.term(xc.detach(), forward, self.scale)]
        out = plan.restore(self.apply_canonical(xc, forward, grids))
        if self.dense is not None:
            out = out + self.scale * torch.einsum(plan.equation, self.dense, x)
        return out

    def apply_canonical(self, xc: torch.Tensor, forward: bool,
                        grids: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> torch.Tensor:
        """The initial operator and the low-rank updates on a canonical ``[F, P, K]`` ket (no dense grid): the
        hat, the dot, the updates and the copy grids' ``grids`` (:meth:`PairGrids.term`) as :data:`Terms`, summed
        by one :func:`_expand`."""
        terms: Terms = []
        y = None
        if self.kind == "gaussian":
            own, other = self.families["forward" if forward else "transposed"], \
                self.families["transposed" if forward else "forward"]
            scale = self.init_value * self.init_scale
            hat, inner = own.sample(xc, scale)
            terms += hat
            # with consistent hats (HatFamily.partner) only the part of x the hat left out needs a dot
            dotted = xc if own.partner is None else own.outside
            dot = None if dotted is None else other.dot(dotted, self.dots, scale)
            # on the other family's basis, as the dot is: one coefficient matrix for all of them
            for low in self._low_rank_coordinates(inner, forward):
                if dot is None:
                    basis = other.basis.cat()
                    dot = basis, low.new_zeros(low.shape[0], basis.shape[-1], low.shape[2])
                dot[1][:, : low.shape[1]] += low
            if dot is not None:
                terms.append(dot)
        elif self.kind == "identity":
            y = xc * (self.init_value * self.init_scale)
        low = self._low_rank(xc, forward)
        if low is not None:
            terms.append(low)
        expanded = _expand(terms + list(grids))
        if expanded is not None:
            y = expanded if y is None else y + expanded
        if y is None:
            p = self.p_out if forward else self.p_in
            y = xc.new_zeros(xc.shape[0], p if self.shard is None else self.shard.local_size(p), xc.shape[2])
        return y

    def _low_rank(self, xc: torch.Tensor, forward: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The accumulated low-rank updates on a canonical ket, as one of :data:`Terms`; None before any."""
        A, B = self.out_factors.cat(), self.in_factors.cat()
        if A is None:
            return None
        if self._column_steps is None:
            self._column_steps = torch.tensor(self.factor_steps, device=xc.device)
        coef = self.coefficients[self._column_steps] * self.scale
        if forward:
            inner = particle_sum(self.in_factors.reduce(xc), self.shard)  # ⟨x_s|x⟩, an expectation
            return A, coef[None, :, None] * inner
        inner = particle_sum(self.out_factors.reduce(xc), self.shard)
        return B, coef[None, :, None] * inner

    def _low_rank_coordinates(self, inner: torch.Tensor | None, forward: bool) -> list[torch.Tensor]:
        """The low-rank updates held as coordinates (:meth:`add_factor`) on a ket whose coordinates on this
        direction's hat basis are ``inner`` (``Eᵀx``): their coefficients ``[F, r, K]`` on the other direction's
        basis (the folded core's and the later steps' coordinates', each over its own first ``r`` columns), from
        products of ``r × Σk`` matrices only (``A_s B_sᵀ x = E_T α_s β_sᵀ (E_Fᵀ x)``) and of the core's ``r_T ×
        r_F``; none before any update."""
        self._fold_if_cheaper()
        if not self.coordinate_steps and self.core is None:
            return []
        source, target = (self.in_coordinates, self.out_coordinates) if forward else \
            (self.out_coordinates, self.in_coordinates)
        core = None if self.core is None else (self.core if forward else self.core.mT)  # [F, target, source]
        if inner is None or inner.shape[1] < max(source.rows, 0 if core is None else core.shape[2]):
            raise TplimitsError(f"parameter {self.name!r}: a low-rank update refers to hat directions this "
                                "application has not seen (an internal inconsistency of the limit engine)")
        parts = [] if core is None else [core @ (inner[:, : core.shape[2]] * self.scale)]
        if self.coordinate_steps:
            coef = self.coefficients[self._steps_of_coordinates()] * self.scale
            along = source.matrix().mT @ inner[:, : source.rows]  # ⟨B_s|x⟩ (forward), [F, Σk, K]
            parts.append(target.matrix() @ (coef[None, :, None] * along))
        return parts

    def _steps_of_coordinates(self) -> torch.Tensor:
        if self._coordinate_steps is None:
            self._coordinate_steps = torch.tensor(self.coordinate_steps, device=self.coefficients.device)
        return self._coordinate_steps

    def _fold_if_cheaper(self) -> None:
        """Fold the coordinates into the cores once applying them (``Σk·(r_T + r_F)`` per component) costs as much
        as a core would (``r_T·r_F``). Their coefficients are set up to what the rule's memory may still change
        (the step that recorded the last of them has been taken): the core takes each step's coefficient, the
        mode cores its entries of the memory's directions, carried over from the earlier folds' mode cores for
        the steps folded before."""
        rows_t, rows_f, cols = self.out_coordinates.rows, self.in_coordinates.rows, self.out_coordinates.cols
        if not cols or cols * (rows_t + rows_f) < rows_t * rows_f:
            return
        steps = self._steps_of_coordinates()
        folded = torch.zeros_like(self.coefficients, dtype=torch.bool) if self.folded is None else self.folded.clone()
        folded[steps] = True
        modes = self._memory_directions(folded)
        carried = self._carried_mode_cores(modes)
        weights = torch.cat([self.coefficients[steps][None], modes[:, steps]])  # [1 + m, Σk]
        out, inn = self.out_coordinates.matrix(), self.in_coordinates.matrix()
        blocks = torch.stack([(out * w) @ inn.mT for w in weights])  # [1 + m, F, r_T, r_F]
        earlier = None if self.core is None else torch.cat([self.core[None], carried])
        cores = blocks if earlier is None else _padded_sum(earlier, blocks)
        self.core, self.mode_cores = cores[0], cores[1:]
        self.folded, self.modes = folded, modes
        self.out_coordinates, self.in_coordinates = _Coordinates(self.p_out), _Coordinates(self.p_in)
        self.coordinate_steps, self._coordinate_steps = [], None

    def _memory_directions(self, folded: torch.Tensor) -> torch.Tensor:
        """An orthonormal basis ``[m, steps]`` of the rule's memory over the ``folded`` steps (zero elsewhere):
        the directions along which its later steps may change those steps' coefficients."""
        if not self.memory:
            return self.coefficients.new_zeros(0, folded.numel())
        memory = torch.stack(self.memory) * folded
        _, values, directions = torch.linalg.svd(memory, full_matrices=False)
        kept = values > self.MEMORY_RANK * values.max().clamp_min(torch.finfo(values.dtype).tiny)
        return directions[kept] * folded

    def _carried_mode_cores(self, modes: torch.Tensor) -> torch.Tensor | None:
        """The new directions' cores over the steps folded before, from the old directions' cores (None before the
        first fold): a linear rule's memory of those steps only moves within its span at their fold (checked)."""
        if self.folded is None:
            return None
        old = self.folded
        along = modes[:, old] @ self.modes[:, old].mT  # [m_new, m_old]
        missed = modes[:, old] - along @ self.modes[:, old]
        if missed.numel() and float(missed.abs().max()) > self.MEMORY_SPAN:  # directions of unit norm
            raise TplimitsError(self._outside_memory())
        return torch.einsum("nm,mfab->nfab", along, self.mode_cores)

    def add_increments(self, increments: torch.Tensor) -> None:
        """A step's changes ``[steps]`` to every step's coefficient: the folded steps' reach the core through the
        mode cores, which requires them in the span of the memory those steps were folded with."""
        self.coefficients = self.coefficients + increments
        if self.folded is None:
            return
        change = increments[self.folded]
        weights = self.modes[:, self.folded] @ change
        missed = change - weights @ self.modes[:, self.folded]
        if missed.numel() and float(missed.abs().max()) > self.MEMORY_SPAN * float(change.abs().max()):
            raise TplimitsError(self._outside_memory())
        if weights.numel():
            self.core = self.core + torch.einsum("m,mfab->fab", weights, self.mode_cores)

    def set_memory(self, rule: str, memory: list[torch.Tensor]) -> None:
        """The per-step tensors of the state of ``rule`` (named in errors) after its last step."""
        self.rule_name, self.memory = rule, memory

    def _outside_memory(self) -> str:
        return (f"update rule {self.rule_name!r} changes the coefficients of earlier steps of parameter "
                f"{self.name!r} along directions its state does not hold: the limit engine folds a linear rule's "
                "past steps into cores on the directions of its memory, the tensors of its state shaped like the "
                "gradient. Keep the rule's memory there (not in Python numbers or other objects)")

    def scale_coefficients(self, factor: float | torch.Tensor) -> None:
        """Multiply every step's coefficient by ``factor`` (weight decay, a rule's rescaling), the folded core's
        too (the mode cores are directions for later changes, not coefficients)."""
        self.coefficients = self.coefficients * factor
        if self.core is not None:
            self.core = self.core * factor

    # -- updates ------------------------------------------------------------------------------
    def add_factor(self, out_factor: torch.Tensor, in_factor: torch.Tensor, step: int, weight: float = 1.0) -> None:
        """Record the term ``weight · out_factor · in_factorᵀ`` (both canonical) of the gradient of step ``step``.

        Factors that are the very kets this step's hats sampled (the input of ``W`` and the cotangent
        ``Wᵀ`` was applied to) are kept as their coordinates on the two hat bases: no ``[P, K]`` columns to
        store, and their products with a ket cost ``r × Σk`` instead of ``P × Σk`` per component."""
        if self.families:  # no coordinates are kept under autograd dots, so those factors stay columns
            alpha = self.families["transposed"].coordinates(out_factor)
            beta = None if alpha is None else self.families["forward"].coordinates(in_factor)
            if beta is not None:
                self.out_coordinates.append(alpha * weight)
                self.in_coordinates.append(beta)
                self.coordinate_steps.extend([step] * out_factor.shape[-1])
                self._coordinate_steps = None
                return
        out_factor = out_factor * weight if weight != 1.0 else out_factor
        for columns, factor in ((self.out_factors, out_factor), (self.in_factors, in_factor)):
            columns.demand += factor.shape[-1]
            columns.append(factor)
        self.factor_steps.extend([step] * out_factor.shape[-1])
        self._column_steps = None

    def forget_applications(self) -> None:
        """Drop the coordinates the hats kept of this step's kets (after the step's factors are recorded)."""
        for family in self.families.values():
            family.forget()

    def reserve(self, rounds: int) -> None:
        """Room in every column store (hat bases, their Gaussians, low-rank factors) for ``rounds`` more steps
        asking as many columns as the steps since the last reserve, so none is copied to grow again; a hat
        basis holds at most as many columns as its input space has particles."""
        for family in self.families.values():
            family.basis.reserve(rounds, family.p_in)
            family.gaussians.reserve(rounds, family.p_in)
        self.out_factors.reserve(rounds)
        self.in_factors.reserve(rounds)

    def ensure_steps(self, steps: int) -> None:
        have = self.coefficients.numel()
        if have < steps:
            self.coefficients = torch.nn.functional.pad(self.coefficients, (0, steps - have))
            if self.folded is not None:
                self.folded = torch.nn.functional.pad(self.folded, (0, steps - have))
                self.modes = torch.nn.functional.pad(self.modes, (0, steps - have))

    def dense_gradient(self, terms: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
                       rows: slice = slice(None)) -> torch.Tensor:
        """Σ einsum(equation, dh, x) over a gradient's terms, materialized (the finite-width formula), for
        the entries ``rows`` of the matrix's output axis."""
        total = None
        for equation, dh, x in terms:
            lhs, m_letters = equation.split("->")
            row_letter = m_letters[self.out_axis]
            operands = [_narrow(t.detach(), letters, row_letter, rows) for t, letters in zip((dh, x), lhs.split(","),
                                                                                              strict=True)]
            part = torch.einsum(equation, *operands)
            total = part if total is None else total + part
        return total

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The operator's tensors (not copies: the caller snapshots them)."""

        def joined(columns: _Columns) -> torch.Tensor | None:
            t = columns.cat()
            return None if t is None else t.detach()

        return {"families": {k: {"basis": joined(f.basis), "gaussians": joined(f.gaussians),
                                 "mirrored": (f.basis.mirrored, f.gaussians.mirrored),
                                 "capacity": (f.basis.capacity, f.gaussians.capacity),
                                 "lagged": f.lagged, "overlaps": f.overlaps.matrix()}
                             for k, f in self.families.items()},
                "factors_mirrored": (self.out_factors.mirrored, self.in_factors.mirrored),
                "factors_capacity": (self.out_factors.capacity, self.in_factors.capacity),
                "dense": self.dense, "pairs": None if self.pairs is None else self.pairs.grids(),
                "out_factors": joined(self.out_factors), "in_factors": joined(self.in_factors),
                "factor_steps": list(self.factor_steps), "coefficients": self.coefficients,
                "coordinates": {"out": self.out_coordinates.matrix(), "in": self.in_coordinates.matrix(),
                                "steps": list(self.coordinate_steps), "core": self.core, "folded": self.folded,
                                "modes": self.modes, "mode_cores": self.mode_cores},
                "init_scale": self.init_scale}

    def load_state_dict(self, state: dict) -> None:
        def columns(t: torch.Tensor | None, differentiable: bool, mirrored: bool, capacity: int) -> _Columns:
            # the saved layout, not the one the joined columns' width would choose: a resumed run sums in the
            # same order as the one it continues
            restored = _Columns(differentiable, self.device, mirrored if t is not None else None)
            if t is not None:
                restored.restore(t, capacity)
            return restored

        for k, f in self.families.items():
            saved = state["families"][k]
            mirrored = saved.get("mirrored", (True, True))  # a checkpoint from before thin stores: all mirrored
            capacity = saved.get("capacity", (0, 0))  # before saved capacities: the columns' own width
            f.basis = columns(saved["basis"], f.track_grad, mirrored[0], capacity[0])
            f.gaussians = columns(saved["gaussians"], f.track_grad, mirrored[1], capacity[1])
            f.lagged, f.overlaps = saved.get("lagged", False), _Overlaps()  # before lagged families: two passes
            if saved.get("overlaps") is not None:
                f.overlaps.buffer, f.overlaps.size = saved["overlaps"], saved["overlaps"].shape[1]
        self.dense = state["dense"]
        if self.pairs is not None:
            self.pairs.forward, self.pairs.transposed = state["pairs"]["forward"], state["pairs"]["transposed"]
        differentiable = self.dots == "autograd"
        mirrored, capacity = state.get("factors_mirrored", (True, True)), state.get("factors_capacity", (0, 0))
        self.out_factors = columns(state["out_factors"], differentiable, mirrored[0], capacity[0])
        self.in_factors = columns(state["in_factors"], differentiable, mirrored[1], capacity[1])
        self.factor_steps = list(state["factor_steps"])
        self._column_steps = None
        self.out_coordinates, self.in_coordinates = _Coordinates(self.p_out), _Coordinates(self.p_in)
        saved = state.get("coordinates") or {"out": None, "in": None, "steps": []}
        for store, block in ((self.out_coordinates, saved["out"]), (self.in_coordinates, saved["in"])):
            if block is not None:
                store.append(block)
        self.coordinate_steps = list(saved["steps"])
        self._coordinate_steps = None
        self.core = saved.get("core")
        self.folded, self.modes, self.mode_cores = (saved.get(k) for k in ("folded", "modes", "mode_cores"))
        if self.core is not None and self.folded is None:  # folded before memory was kept, under SGD: none to carry
            self.folded = torch.zeros_like(state["coefficients"], dtype=torch.bool)
            self.modes = state["coefficients"].new_zeros(0, self.folded.numel())
            self.mode_cores = self.core.new_zeros(0, *self.core.shape)
        self.coefficients = state["coefficients"]
        self.init_scale = state["init_scale"]


class OperatorAction:
    """A deterministic operator (identity or zero initialization plus updates) as the
    :class:`~tplimits.optimizers.base.MatrixAction` a non-gradient rule is written against: rows
    ``[K, P]`` of particles in, rows out."""

    def __init__(self, operator: MatrixOperator) -> None:
        if operator.kind == "gaussian" or operator.n_fixed != 1 or operator.dense is not None \
                or operator.pairs is not None:
            raise TplimitsError(f"parameter {operator.name!r}: a non-gradient rule needs a single matrix with a "
                                "deterministic initialization (identity or zero), updated by its rule alone")
        self.operator = operator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.operator.apply_canonical(x.T[None], True)[0].T

    def transpose(self, z: torch.Tensor) -> torch.Tensor:
        return self.operator.apply_canonical(z.T[None], False)[0].T


class KetInterpreter(FiniteInterpreter):
    """The program on particles: width ``P``, matrices as operators, Avg deterministic.

    Sharded (``shard``), the values hold this rank's rows of every width axis: Avg is an all-reduced sum,
    a width-dependent size (a view of heads) is this rank's, a width-dependent constant the whole system's.
    """

    def __init__(self, program: Program, state: Mapping[str, Any], particles: int, dtype: torch.dtype,
                 device: torch.device, plans: dict[str, MatMulPlan], step: int = 0, shard: Shard | None = None) -> None:
        super().__init__(program, state, particles)
        self.dtype, self.device = dtype, device
        self.plans = plans
        self.step = step  # the training step, for the error of a run that diverges
        self.shard = shard

    def input(self, ins: Input) -> Any:
        return _cast(super().input(ins), self.dtype, self.device)

    def constant(self, ins: Constant) -> Any:
        return _cast(ins.value, self.dtype, self.device)

    def avg(self, ins: Avg) -> torch.Tensor:
        with torch.no_grad():  # an average is deterministic: no ket's dependence is carried through it
            if self.shard is None:
                return super().avg(ins)
            local, rows = row_sum(self.values[ins.vector], ins.axis, ins.keepdim)
            out = self.shard.sum(local) / (rows * self.shard.ranks)
        return out if ins.scale is None else out * ins.scale.resolve(self.n)

    def substituted(self, args: Any) -> Any:
        if self.shard is None:
            return super().substituted(args)
        return super().substituted(_sizes_at(args, self.n // self.shard.ranks))

    def regroup(self, ins: Regroup) -> Any:
        if self.shard is not None and ins.name not in self.shard.checked:
            self._check_shardable(ins)
        return self.apply(ins)

    def _check_shardable(self, ins: Regroup) -> None:
        """Raise unless ``ins`` keeps every rank's rows its own (it relabels contiguous blocks): evaluated once
        on coordinate codes of the whole system and on this rank's rows of them, the rank's rows of the first
        result must be the second."""
        whole, mine = dict(self.values), dict(self.values)
        for name in ins.inputs:
            value, layout = self.values[name], self.program[name].layout
            if not torch.is_tensor(value) or not width_axes(layout):
                continue
            shape = [size * self.shard.ranks if isinstance(spec, Width) else size
                     for size, spec in zip(value.shape, layout, strict=True)]
            whole[name] = torch.arange(value.numel() * self.shard.ranks, dtype=torch.float64,
                                       device=value.device).reshape(shape)
            mine[name] = self.shard.width_rows(whole[name], layout)
        full = ins.fn(*substitute(ins.args, whole, self.n), **substitute(dict(ins.kwargs), whole, self.n))
        values, self.values = self.values, mine
        try:
            local = self.apply(ins)
        finally:
            self.values = values
        if not torch.equal(self.shard.width_rows(full, ins.layout), local):
            raise NotRepresentable(f"%{ins.name} ({ins.origin.describe() or 'the program'}) regroups a width axis "
                                   "in interleaved blocks; distributed='shard' splits every block of particles "
                                   "into contiguous rows and cannot run it. Use distributed=True (whole systems "
                                   "per rank) or False")
        self.shard.checked.add(ins.name)

    def evaluate(self, ins: Nonlin) -> torch.Tensor:
        # no cut on kets: a cut gradient (``.detach()``) leaves the value's dependence on earlier kets, which
        # autograd dots differentiate, as it is; the backward half of the total program has no path through it
        value = self.apply(ins)
        if ins.kinks and torch.is_tensor(value) and value.requires_grad and isinstance(ins.fn, Pullback) \
                and not ins.fn.per_coordinate:
            x, dy = (self.values[a.name] for a in (ins.args[0], ins.args[-1]))
            value = value + smoothed_jumps(x, dy, ins.kinks, self.n)
        # a constant built in forward from no value (an LSTM's zero state, traced with the dtype then in force)
        # takes the system's dtype and device, as inputs and folded constants do
        return value if ins.inputs else _cast(value, self.dtype, self.device)

    def matmul(self, ins: MatMul) -> torch.Tensor:
        operator = self.values[ins.matrix]
        if not isinstance(operator, MatrixOperator):
            raise TplimitsError(f"%{ins.name} multiplies by %{ins.matrix}, which the limit engine holds as a "
                                "tensor, not an operator")
        x = materialized(self.values[ins.vector])
        overflowing = _overflowing(x)
        if self.shard is not None:  # every rank takes the same branch
            overflowing = self.shard.any(overflowing)
        if overflowing:  # before the hat's Gram matrix turns it into a linear-algebra failure
            self.raise_diverged(self.first_blown_up())
        return operator.apply(self.plan(ins), x)

    def scales(self) -> dict[str, float]:
        """The RMS of every tensor value computed so far (a reference for :meth:`first_blown_up`). A per-coordinate
        pullback's values, formed only when read, are not formed for it: the Avg over them stands for them."""
        if self.shard is not None:
            return {name: size for name, (_, size) in self._whole_statistics().items()}
        return {name: rms(v) for name, v in self.values.items() if torch.is_tensor(v)}

    def first_blown_up(self, reference: Mapping[str, float] | None = None) -> str | None:
        """The first value, in program order, that is not finite (or overflowing), or else whose RMS exceeds
        ``EXPLOSION`` times its RMS in ``reference``."""
        whole = None if self.shard is None else self._whole_statistics()
        for ins in self.program.instructions:
            value = self.values.get(ins.name)
            if not torch.is_tensor(value):
                continue
            if whole[ins.name][0] if whole is not None else _overflowing(value):
                return ins.name
        for ins in self.program.instructions:
            value, before = self.values.get(ins.name), (reference or {}).get(ins.name, 0.0)
            if not torch.is_tensor(value) or before <= 0:
                continue
            if (whole[ins.name][1] if whole is not None else rms(value)) > EXPLOSION * before:
                return ins.name
        return None

    def _whole_statistics(self) -> dict[str, tuple[bool, float]]:
        """(overflowing, RMS) of every tensor value of a sharded system, over all its particles: two
        all-reduces for all the values at once."""
        names = [name for name, v in self.values.items() if torch.is_tensor(v)]
        sharded = [bool(width_axes(self.program[name].layout)) for name in names]
        stats = torch.zeros(2, len(names), dtype=torch.float64, device=self.shard.device)
        peaks = torch.zeros(len(names), dtype=torch.float64, device=self.shard.device)
        for i, name in enumerate(names):
            value = self.values[name].detach()
            if not value.numel():
                continue
            square = value.double().square()
            share = 1.0 if sharded[i] else 1.0 / self.shard.ranks  # a value every rank holds whole counts once
            stats[:, i] = torch.stack([square.sum() * share, square.new_tensor(value.numel() * share)])
            peaks[i] = value.double().abs().amax().nan_to_num(nan=math.inf) if value.is_floating_point() else 0.0
        dist.all_reduce(stats, group=self.shard.group)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=self.shard.group)
        bound = {name: torch.finfo(self.values[name].dtype).max ** 0.25 if self.values[name].is_floating_point()
                 else math.inf for name in names}
        return {name: (not float(peaks[i]) <= bound[name],
                       math.sqrt(float(stats[0, i] / stats[1, i])) if float(stats[1, i]) else 0.0)
                for i, name in enumerate(names)}

    def raise_diverged(self, name: str | None, trajectory: object = None) -> None:
        """Raise :class:`Diverged` at this step, naming value ``name`` (None: an output)."""
        where = "an output" if name is None else f"%{name} ({self.program[name].origin.describe() or 'the program'})"
        raise Diverged(f"the limit diverged at step {self.step}: {where} is the first value that blew up (non-finite, "
                       f"or {EXPLOSION:g} times its size at initialization). Try a smaller lr; see docs/limit.md, "
                       "'Divergence'.", step=self.step, value=name, trajectory=trajectory)

    def plan(self, ins: MatMul) -> MatMulPlan:
        """How ``ins`` brings its vector to the canonical form (cached per instruction: shapes are fixed)."""
        plan = self.plans.get(ins.name)
        if plan is None:
            operator = self.values[ins.matrix]
            plan = self.plans[ins.name] = MatMulPlan.of(ins, self.program[ins.matrix].layout, operator.in_axis,
                                                        self.values[ins.vector].shape)
        return plan


def _sizes_at(args: Any, rows: int) -> Any:
    """``args`` with every width-dependent size resolved at ``rows`` particles (a shard's); width-dependent
    constants stay, for the whole system's width."""
    return map_args(args, lambda a: a.resolve(rows) if isinstance(a, WidthInt) else a)


def _cast(value: Any, dtype: torch.dtype, device: torch.device) -> Any:
    if torch.is_tensor(value):
        if value.is_floating_point():
            return value.to(device=device, dtype=dtype)
        return value.to(device=device)
    return value


def _overflowing(x: torch.Tensor) -> bool:
    """Non-finite entries, or entries whose square sums would overflow the dtype (a diverged ket); one
    reduction (a NaN maximum compares false)."""
    if not x.is_floating_point() or not x.numel():
        return False
    return not float(x.detach().abs().amax()) <= torch.finfo(x.dtype).max ** 0.25
