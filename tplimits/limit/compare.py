"""``Limit.compare``: which program value a limit and finite-width training part at first, and when.

The limit determines more than the outputs: every vector value of the total program (forward values
and their cotangents) has a limiting *feature kernel* ``⟨x|x⟩`` over its fixed coordinates (batch
rows, positions, …), every scalar value a limiting value. :func:`compare_values` trains ``seeds``
finite models per width (the loop of :func:`~tplimits.limit.check.finite_outputs`) and the limit's
independent systems side by side; at every step it reads those quantities from both — the same
program run by the :class:`~tplimits.core.interpret.FiniteInterpreter` on each model and by the
:class:`~tplimits.limit.kets.KetInterpreter` on the particles, in the same units (cotangents are
``n·∂F/∂x``) — and tests, per value and step, whether the finite seed average departs from the
limit's batch average by more than both standard errors allow.

The test: ``D`` is the RMS over a value's entries of ``mean_finite − mean_limit``, ``R`` the RMS of their
combined standard error, with Welch–Satterthwaite degrees of freedom ``ν``; a value *departs* when ``D /
R`` exceeds the Student-t quantile at ``alpha / (4T)`` (two-sided, Bonferroni over the ``T`` values ×
steps tested and the two tests of each, mean and spread) and ``D`` exceeds ``min_relative`` of the
value's own scale (the RMS of the limit's quantity over steps), so that a finite-width bias of a few
parts in a thousand, which many seeds resolve, is not a fault of the limit. The report names the
**first** departing value — the earliest step, then the earliest instruction of the program — with its op
and the user's source line: upstream of it the limit and training agree; it is where to look.

A value can also depart by its **spread**: the limit holds it deterministic (its systems differ by
Monte Carlo error, ``∝ P^-1/2``), but the finite seeds scatter by Θ(1) — their spread does not shrink
like ``width^-1/2`` between the smallest and largest width, and exceeds the limit's scaled to that
width (``σ_L·√(P/n)``). Each is a one-sided test on the log of a variance ratio (standard error
``√(2/(k−1))`` per variance of ``k`` samples); both must hold (an intersection–union test), at the same
Bonferroni level, with the spread above ``min_relative`` of the scale. Training then carries a random
Θ(1) quantity that the limit averages away — a sum over width of independent terms magnified by a
width power, which no mean comparison resolves because the seeds' scatter hides the bias.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import networkx as nx
import torch
from tqdm.auto import tqdm

from tplimits.core.interpret import FiniteInterpreter
from tplimits.core.ir import Avg, Instruction, MatMul, Nonlin, Parameter, Regroup, width_axes
from tplimits.core.program import Program
from tplimits.core.pullback import materialized
from tplimits.errors import Diverged, TplimitsError, check_real
from tplimits.limit.check import finite_steps
from tplimits.limit.distributed import SHARD, owned_systems, process_group, spread
from tplimits.limit.mu import LimitSetup
from tplimits.limit.runs import standard_error, student_t_tail
from tplimits.training.coordcheck import fit_slope

if TYPE_CHECKING:  # the Limit's compare method calls this module
    from tplimits.limit.limit import Limit

ENTRIES = 16
"""Fixed coordinates of a vector value kept in its kernel (evenly spaced): kernels are at most 16 × 16."""
SCALE_SLOPE = 0.25
"""A value whose finite-width size changes with width faster than ``width^±SCALE_SLOPE`` is not compared."""


@attrs.frozen
class Watched:
    """A program value whose limiting quantity is compared."""

    name: str
    index: int  # position in the total program
    op: str
    source: str
    direction: str  # "forward" or "backward"
    quantity: str  # "kernel" (vector values: ⟨x|x⟩) or "value" (scalar values)
    picks: tuple[int, ...]  # the fixed coordinates (flattened) kept

    def describe(self) -> str:
        where = f" at {self.source}" if self.source else ""
        return f"%{self.name} ({self.direction} {self.quantity}, op {self.op or '?'}{where})"


@attrs.frozen
class Departure:
    """A value whose finite seed average departs from the limit at a step."""

    value: Watched
    step: int
    z: float  # D / R (a spread departure: the log-variance z of its weaker test)
    relative: float  # D / the value's scale (a spread departure: the finite spread over the scale)
    kind: str = "seed average"  # "seed average": it departs; "spread": the seeds scatter, the limit does not

    def describe(self) -> str:
        if self.kind == "spread":
            return (f"{self.value.describe()} at step {self.step}: the finite seeds scatter by "
                    f"{100 * self.relative:.1f}% of its scale without shrinking with width, where the limit is "
                    f"deterministic (z {self.z:.1f})")
        return (f"{self.value.describe()} at step {self.step}: {self.z:.1f} standard errors, "
                f"{100 * self.relative:.1f}% of its scale")


@attrs.frozen
class FidelityReport:
    """Per width, step and watched value: the distance of the finite seed average from the limit."""

    values: tuple[Watched, ...]
    widths: tuple[int, ...]
    seeds: int
    particles: int
    batches: int
    distance: torch.Tensor  # [widths, steps, values]: D
    resolution: torch.Tensor  # [widths, steps, values]: R
    dof: torch.Tensor  # [widths, steps, values]: ν
    p_value: torch.Tensor  # [steps, values]: two-sided, of D / R at the largest width
    scale: torch.Tensor  # [values]: the RMS of the limit's quantity over steps
    determined: torch.Tensor  # [steps, values]: the value's finite size at that step is width-independent
    spread_p: torch.Tensor  # [steps, values]: p-value of the spread test (module docstring)
    spread: torch.Tensor  # [steps, values]: the finite seeds' spread at the largest width over the scale
    level: float  # the Bonferroni level a p-value must be below: alpha / tests
    alpha: float
    min_relative: float
    seconds: float

    @property
    def relative(self) -> torch.Tensor:
        """``D`` over each value's scale, ``[widths, steps, values]``."""
        return self.distance / self.scale.clamp_min(torch.finfo(self.scale.dtype).tiny)

    @property
    def z(self) -> torch.Tensor:
        """``D / R``, with ``R`` at least the rounding level of the value (deterministic values, equal on both
        sides up to rounding, have ``R = 0``)."""
        return self.distance / _resolved(self.resolution, self.scale)

    @property
    def departures(self) -> list[Departure]:
        """Every (value, step) that departs at the largest width, earliest step then program order first."""
        z, rel = self.z[-1], self.relative[-1]
        hits = (self.p_value < self.level) & (rel > self.min_relative) & self.determined
        found = [Departure(self.values[v], t, float(z[t, v]), float(rel[t, v]))
                 for t, v in hits.nonzero().tolist()]
        scattered = (self.spread_p < self.level) & (self.spread > self.min_relative) & self.determined
        found += [Departure(self.values[v], t, _normal_quantile(float(self.spread_p[t, v])), float(self.spread[t, v]),
                            "spread") for t, v in scattered.nonzero().tolist()]
        return sorted(found, key=lambda d: (d.step, d.value.index, d.kind))

    @property
    def first(self) -> Departure | None:
        """The first value where the limit and training part, or ``None`` where they agree everywhere."""
        hits = self.departures
        return hits[0] if hits else None

    def format(self, rows: int = 12) -> str:
        first = self.first
        compared = self.determined.any(0)
        skipped = [w.name for w, d in zip(self.values, compared.tolist(), strict=True) if not d]
        lines = [f"fidelity: {int(compared.sum())} of {len(self.values)} program values over "
                 f"{self.distance.shape[1]} steps; finite widths {list(self.widths)} × {self.seeds} seeds vs the limit "
                 f"({self.particles} particles in {self.batches} batches); a departure has p < {self.level:.2g} "
                 f"(α = {self.alpha}, Bonferroni) and D > {self.min_relative:.0%} of the value's scale"]
        if skipped:
            lines.append(f"not compared (integer values, or values whose size changes with width: no limit to hold): "
                         f"{', '.join('%' + n for n in skipped[:8])}{' …' if len(skipped) > 8 else ''}")
        lines.append("no program value departs from the limit at the largest width" if first is None
                     else f"FIRST DEPARTURE: {first.describe()}")
        lines.append(f"{'value':<44} {'step':>4} {'D/R':>7} {'p':>8} {'D/scale':>8}  per width")
        order = sorted((float(self.p_value[t, v]), t, v) for v in range(len(self.values))
                       for t in range(self.distance.shape[1]) if self.determined[t, v])
        for p, t, v in order[:rows]:
            per_width = " ".join(f"{float(self.relative[i, t, v]):.3f}" for i in range(len(self.widths)))
            lines.append(f"{'%' + self.values[v].name:<44} {t:>4} {float(self.z[-1, t, v]):>7.2f} {p:>8.2g} "
                         f"{float(self.relative[-1, t, v]):>8.3f}  {per_width}")
        lines.append(f"finite and limit runs: {self.seconds:.1f} s")
        return "\n".join(lines)

    def plot(self, path: str, program: Program | None = None, values: int = 8) -> str:
        """Relative distance vs step at the largest width for the first departing value and the values on
        its path from the inputs (``program``'s graph; else the largest distances); a PNG at ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        chosen = self._plotted(program, values)
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        steps = torch.arange(self.distance.shape[1])
        for v in chosen:
            ax.plot(steps, self.relative[-1, :, v], marker="o", label=f"%{self.values[v].name}")
        ax.set_xlabel("step")
        ax.set_ylabel("distance / scale")
        ax.set_yscale("log")
        ax.set_title(f"finite (width {self.widths[-1]}, {self.seeds} seeds) vs limit, per program value")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def _plotted(self, program: Program | None, count: int) -> list[int]:
        index = {w.name: i for i, w in enumerate(self.values)}
        first = self.first
        if first is not None and program is not None:
            upstream = nx.ancestors(program.graph, first.value.name)
            path = sorted((index[n] for n in upstream if n in index), key=lambda i: -self.values[i].index)
            return [index[first.value.name], *path[: count - 1]]
        worst = torch.where(self.determined, self.z[-1], -1.0).amax(0)
        return worst.argsort(descending=True)[:count].tolist()


def watched_values(setup: LimitSetup) -> list[Watched]:
    """The values of the total program the limit determines: vector and scalar parameters and every
    computed value (Nonlin, MatMul, Avg, Regroup) with floating entries, forward and backward."""
    program = setup.program
    watched = []
    for index, ins in enumerate(program.instructions):
        if not _computed(ins):
            continue
        axes = width_axes(ins.layout)
        fixed = math.prod(size for i, size in enumerate(ins.layout) if i not in axes)
        entries = ENTRIES if axes else ENTRIES * ENTRIES
        picks = torch.linspace(0, fixed - 1, min(fixed, entries)).round().long().unique().tolist()
        direction = "forward" if index < setup.total.forward_length else "backward"
        watched.append(Watched(ins.name, index, ins.origin.op, ins.origin.source, direction,
                               "kernel" if axes else "value", tuple(picks)))
    return watched


def _computed(ins: Instruction) -> bool:
    if isinstance(ins, Parameter):
        return ins.trainable and ins.kind != "matrix"
    return isinstance(ins, Nonlin | MatMul | Avg | Regroup)


def summaries(program: Program, watched: Sequence[Watched], values: dict[str, Any]) -> list[torch.Tensor]:
    """Each watched value's limiting quantity, flattened: its kernel over the picked fixed coordinates
    (the mean over the width axes of ``x_a x_b``) or its picked entries; nothing for an integer value. The
    same function reads the finite interpreter's values and the particles'."""
    out = []
    for w in watched:
        x = materialized(values[w.name])  # a per-coordinate pullback's values are formed for this reader
        if not (torch.is_tensor(x) and x.is_floating_point()):  # integer values (position ids, masks) are exact
            out.append(torch.zeros(0, dtype=torch.float64))
            continue
        x = x.detach().to(device="cpu", dtype=torch.float64)
        if bool(torch.isnan(x).any()):  # a distance over NaN would read as agreement
            raise Diverged(f"%{w.name} ({w.describe()}) has NaN entries: no comparison can be drawn from it",
                           value=w.name)
        x = torch.where(torch.isfinite(x), x, 0.0)  # masked attention logits (−inf) on both sides
        axes = width_axes(program[w.name].layout)
        if axes:
            x = x.movedim(axes, tuple(range(-len(axes), 0)))
            x = x.reshape(-1, math.prod(x.shape[-len(axes):]))[list(w.picks)]
            out.append((x @ x.T / x.shape[-1]).flatten())
        else:
            out.append(x.reshape(-1)[list(w.picks)])
    return out


def compare_values(limit: Limit, X: torch.Tensor, y: torch.Tensor, widths: Sequence[int] = (256, 1024), seeds: int = 8,
                   steps: int = 5, lr: float = 0.1, loss: Any = "mse", particles: int = 2**14, batches: int = 4,
                   seed: int = 0, dtype: torch.dtype = torch.float64, alpha: float = 0.01,
                   min_relative: float = 0.02, center: bool = False, progress: bool = True,
                   setup: LimitSetup | None = None, distributed: bool | None = None) -> FidelityReport:
    """Train the limit and ``seeds`` finite models per width side by side for ``steps`` updates and test
    every program value at each of them (module docstring). ``setup``: a modified copy of the limit's
    setup (to see what a change of the engine does), else the limit's own.

    Under a ``torch.distributed`` process group (``distributed`` as :meth:`Limit.train` takes it, but whole
    systems only) the limit's systems and the finite models are spread over the ranks, each run exactly as
    in one process, and every rank returns the same report."""
    _check_arguments(widths, seeds, alpha, min_relative)
    if distributed == SHARD:
        raise TplimitsError("compare spreads whole particle systems and finite models over the ranks; "
                            "distributed='shard' is not taken here: pass True (or None)")
    rank, size = process_group(distributed)
    start = time.perf_counter()
    run, own = limit._prepare(X, y, None, steps, lr, loss, None, particles, seed, device="cpu", dtype=dtype,
                              batches=batches, dots="auto", kernels=(), checkpoint=None, checkpoint_every=1,
                              center=center)
    setup = own if setup is None else setup
    if setup.regime != "feature learning":
        raise TplimitsError(f"compare follows the values of the μ-limit's particles; this limit is in the "
                            f"{setup.regime} regime (NTP-like), whose features do not move: use check")
    watched = watched_values(setup)
    widths = tuple(sorted(widths))
    models = [(w, s) for w in widths for s in range(seeds)]
    own = len(owned_systems(batches, rank, size)) * (steps + 1) + len(owned_systems(len(models), rank, size)) * steps
    bar = tqdm(total=own, disable=not progress, desc="compare", unit="step")
    limit_side = spread(batches, lambda b: _limit_run(limit, run, setup, watched, b, bar), rank, size)
    finite = spread(len(models), lambda i: _finite_run(limit, run, setup, watched, *models[i], bar), rank, size)
    finite_side = [finite[i * seeds: (i + 1) * seeds] for i in range(len(widths))]
    bar.close()
    return _report(watched, widths, seeds, run.particles, batches, limit_side, finite_side, alpha, min_relative,
                   time.perf_counter() - start)


def _limit_run(limit: Limit, run: Any, setup: LimitSetup, watched: Sequence[Watched], system: int,
               bar: Any) -> list[list[torch.Tensor]]:
    """The watched quantities of one independent system of the limit at each step before its update."""
    observed: list[list[torch.Tensor]] = []

    def observe(t: int, interp: Any) -> None:
        observed.append(summaries(setup.program, watched, interp.values))

    limit._train_system(setup, run, system, None, bar, (None, 1, {}), [], observe=observe)
    return observed


def _finite_run(limit: Limit, run: Any, setup: LimitSetup, watched: Sequence[Watched], width: int, seed: int,
                bar: Any) -> list[list[torch.Tensor]]:
    """The watched quantities of one finite model at each step before its update: its total program run
    with the error signal of that step."""
    observed = []
    targets = run.y.to(run.dtype) if run.y.is_floating_point() else run.y
    for t, model, out in finite_steps(limit, run.Z, run.y, run.n_train, width, seed, run.steps, run.lr, run.loss,
                                      run.schedule, run.dtype, run.center):
        if t == run.steps:
            break
        interp = FiniteInterpreter.from_model(setup.program, model.model)
        interp.cotangents = (run.examples.error_signal(run.loss, out, targets, run.schedule[t]),)
        with torch.no_grad():
            interp.run(run.Z.to(run.dtype) if run.Z.is_floating_point() else run.Z)
        observed.append(summaries(setup.program, watched, interp.values))
        bar.update(1)
    return observed


def _report(watched: list[Watched], widths: tuple[int, ...], seeds: int, particles: int, batches: int,
            limit_side: list, finite_side: list, alpha: float, min_relative: float, seconds: float) -> FidelityReport:
    steps = len(limit_side[0])
    shape = (len(widths), steps, len(watched))
    distance, resolution, dof = (torch.zeros(shape, dtype=torch.float64) for _ in range(3))
    scale = torch.zeros(len(watched), dtype=torch.float64)
    finite_scale = torch.zeros(len(widths), steps, len(watched), dtype=torch.float64)
    finite_spread = torch.zeros(len(widths), steps, len(watched), dtype=torch.float64)
    limit_spread = torch.zeros(steps, len(watched), dtype=torch.float64)
    for v in range(len(watched)):
        lim = torch.stack([torch.stack([system[t][v] for t in range(steps)]) for system in limit_side])
        if lim.shape[-1] == 0:  # an integer value: nothing to compare
            continue
        lim_mean, lim_se = lim.mean(0), standard_error(lim)  # [steps, entries]
        limit_spread[:, v] = lim.std(0).square().mean(-1).sqrt()
        scale[v] = lim_mean.square().mean().sqrt()
        for i, runs in enumerate(finite_side):
            fin = torch.stack([torch.stack([r[t][v] for t in range(steps)]) for r in runs])
            finite_scale[i, :, v] = fin.square().flatten(2).mean((0, 2)).sqrt()
            finite_spread[i, :, v] = fin.std(0).square().mean(-1).sqrt()
            fin_mean, fin_se = fin.mean(0), standard_error(fin)
            distance[i, :, v] = (fin_mean - lim_mean).square().mean(-1).sqrt()
            var_f, var_l = fin_se.square().mean(-1), lim_se.square().mean(-1)
            resolution[i, :, v] = (var_f + var_l).sqrt()
            # Welch–Satterthwaite; where both variances vanish (constants) any ν will do
            denominator = var_f.square() / (seeds - 1) + var_l.square() / (batches - 1)
            dof[i, :, v] = torch.where(denominator > 0, (var_f + var_l).square() / denominator.clamp_min(1e-300),
                                       float(seeds + batches - 2))
    floating = torch.tensor([limit_side[0][0][v].numel() > 0 for v in range(len(watched))])
    determined = _width_independent(widths, finite_scale) & floating
    spread_p, spread = _spread_test(widths, seeds, particles // batches, batches, finite_spread, limit_spread, scale)
    z = distance[-1] / _resolved(resolution[-1], scale)
    p_value = torch.ones(steps, len(watched), dtype=torch.float64)
    for t, v in (z > 1).nonzero().tolist():
        p_value[t, v] = 2 * student_t_tail(min(float(z[t, v]), 1e6), max(1.0, float(dof[-1, t, v])))
    return FidelityReport(tuple(watched), widths, seeds, particles, batches, distance, resolution, dof, p_value,
                          scale, determined, spread_p, spread, alpha / (2 * int(determined.sum().clamp_min(1))), alpha,
                          min_relative, seconds)


def _spread_test(widths: tuple[int, ...], seeds: int, per_system: int, systems: int, finite: torch.Tensor,
                 limit: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spread test of the module docstring: its p-value per step and value, and the finite spread at the
    largest width over the value's scale. ``finite``: ``[widths, steps, values]`` seed spreads; ``limit``:
    ``[steps, values]`` spreads over the systems of ``per_system`` particles."""
    spread = finite[-1] / scale.clamp_min(torch.finfo(torch.float64).tiny)
    if len(widths) < 2 or systems < 2:
        return torch.ones_like(spread), spread
    tiny = torch.finfo(torch.float64).tiny
    log_var = (finite.square() * torch.tensor(widths, dtype=torch.float64)[:, None, None]).clamp_min(tiny).log()
    seed_se = math.sqrt(2 / (seeds - 1))
    # H0 of the first test: the spread falls like width^-1/2, so width · variance is the same at both ends
    shrinks = (log_var[-1] - log_var[0]) / (seed_se * math.sqrt(2))
    # H0 of the second: the finite variance at width n is at most the limit's scaled by P/n
    limit_var = (limit.square() * per_system).clamp_min(tiny).log()
    exceeds = (log_var[-1] - limit_var) / math.sqrt(seed_se**2 + 2 / (systems - 1))
    weaker = torch.minimum(shrinks, exceeds)
    return 0.5 * torch.special.erfc(weaker / math.sqrt(2)), spread


def _normal_quantile(tail: float) -> float:
    """The ``z`` with ``P(Z > z) = tail`` for a standard normal."""
    return math.sqrt(2) * float(torch.special.erfinv(torch.tensor(1 - 2 * tail, dtype=torch.float64)))


def _resolved(resolution: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``R`` floored at the rounding level ``√eps · scale`` (and above zero)."""
    floor = (math.sqrt(torch.finfo(torch.float64).eps) * scale).clamp_min(torch.finfo(torch.float64).tiny)
    return torch.maximum(resolution, floor)


def _width_independent(widths: tuple[int, ...], finite_scale: torch.Tensor) -> torch.Tensor:
    """Which values, at which steps, have a finite-width scale (``[widths, steps, values]``) that does not
    change with width (log-log slope within ``SCALE_SLOPE``): those whose limit the particles hold. A value
    that shrinks or grows with width (an output bias under a ``1/n`` multiplier, the coordinates of a readout
    weight) has a limit of 0 or none; the particles' version of it is that value at ``n = P``, not a limit
    to compare with. Judged per step: μP's attention logits vanish at initialization and are Θ(1) once
    trained, so only their first step is left out."""
    if len(widths) < 2:
        return torch.ones(finite_scale.shape[1:], dtype=torch.bool)
    return torch.tensor([[abs(fit_slope(widths, finite_scale[:, t, v].tolist())[0]) <= SCALE_SLOPE
                          for v in range(finite_scale.shape[2])] for t in range(finite_scale.shape[1])])


def _check_arguments(widths: Sequence[int], seeds: int, alpha: float, min_relative: float) -> None:
    if isinstance(widths, str) or not isinstance(widths, Sequence) or not widths:
        raise TplimitsError(f"widths must be a non-empty sequence of positive integers, got {widths!r}")
    if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths) or len(set(widths)) != len(widths):
        raise TplimitsError(f"widths must be distinct positive integers, got {list(widths)}")
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 2:
        raise TplimitsError(f"seeds={seeds!r}: compare needs at least two seeds per width (for standard errors)")
    check_real("alpha", alpha, 0)
    if not alpha < 1:
        raise TplimitsError(f"alpha={alpha!r} must be a probability in (0, 1)")
    check_real("min_relative", min_relative, 0)
