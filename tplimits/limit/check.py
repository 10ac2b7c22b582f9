"""``Limit.check``: the limit against finite-width training of the same models on the same data.

Each finite model is ``tpl.instantiate(arch, width, param, optimizer, lr, seed)`` trained by a
plain torch loop: at every step one forward pass on all inputs (training and test rows, so the
outputs recorded are those of the pass that is trained on), the loss on that step's batch rows,
``loss.backward()``, ``opt.step()`` — the very schedule :meth:`Limit.train` follows.

Two numbers per width, both with standard errors over seeds:

* ``gap``: the seed average of each model's RMS distance to the limit over every step and output.
  At finite width it is dominated by the ``Θ(n^{-1/2})`` fluctuations, so it must shrink with a
  log-log slope near ``-1/2``;
* ``mean_gap``: the RMS distance between the seed-averaged outputs and the limit, against
  ``mean_gap_se``, the RMS of their combined standard error (seeds and particles). At the largest
  width the limit must agree with the seed average within ``3`` of those.

Both are also judged against the trajectory's own scale ``S`` (:func:`trajectory_scale`: the RMS of
the limit's outputs or of their movement from initialization, whichever is larger), so that the
verdict does not depend on the units of the outputs: at the largest width the seed average must also
be within ``max_relative_gap · S`` of the limit (agreeing "within 3 standard errors" says nothing
when the standard errors are as large as the outputs themselves), and gaps below the numerical
resolution ``√eps · S`` are agreement (finite runs that equal the limit to rounding pass, with a
finite slope, instead of fitting a slope to rounding errors).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch

from tplimits.errors import Diverged, TplimitsError, check_real
from tplimits.limit.distributed import process_group, spread
from tplimits.limit.draws import share_draws
from tplimits.limit.runs import (
    Examples,
    batch_schedule,
    blown_up,
    check_dtype_device,
    check_outputs,
    data,
    default_dtype,
    digest,
    explosion_bound,
    rms,
    student_t_quantile,
)
from tplimits.registry.manager import loss as lookup_loss
from tplimits.training.coordcheck import fit_slope
from tplimits.training.instantiate import instantiate_family

if TYPE_CHECKING:  # the Limit's check method calls this module
    from tplimits.limit.limit import Limit, Trajectory

SHARED_DRAW_SEED = 0
"""The draw both sides take under ``check(..., shared_draws=True)`` (the draw of the limit's first system)."""


@attrs.frozen
class CheckReport:
    """Finite-width training against the limit, per width (see the module docstring)."""

    widths: tuple[int, ...]
    seeds: int
    limit: Trajectory
    finite_mean: torch.Tensor  # [widths, steps+1, M, ...] seed-averaged outputs
    finite_se: torch.Tensor
    gap: torch.Tensor  # [widths]
    gap_se: torch.Tensor
    mean_gap: torch.Tensor
    mean_gap_se: torch.Tensor
    slope: float
    max_slope: float
    tolerance: float
    seconds_finite: float
    scale: float = 1.0  # the trajectory's own scale S (trajectory_scale)
    resolution: float = 0.0  # gaps at or below it are rounding: sqrt(eps) * S
    max_relative_gap: float = 1.0
    floor: float = 0.0  # the limit's own Monte Carlo error in every seed's gap: RMS of its outputs' SE
    slope_se: float = 0.0  # the standard error of the slope, from the gaps' standard errors
    slope_t: float = 2.0  # the two-sided 95% quantile of Student's t with seeds - 1 degrees of freedom
    raw_slope: float = float("nan")  # the slope of the gaps themselves, floor included
    mixture: tuple[str, ...] = ()  # fixed-size random tensors each side drew independently (the limit: their mixture)

    @property
    def relative_gap(self) -> torch.Tensor:
        """``gap / S``: the gap per width in units of the trajectory's own scale."""
        return _relative(self.gap, self.scale)

    @property
    def relative_mean_gap(self) -> torch.Tensor:
        """``mean_gap / S``."""
        return _relative(self.mean_gap, self.scale)

    @property
    def exact(self) -> bool:
        """Every finite run equals the limit to numerical resolution (there is no gap to fit a slope to)."""
        return bool((self.gap <= self.resolution).all())

    @property
    def agrees(self) -> bool:
        """The seed-averaged largest-width outputs are within ``tolerance`` standard errors of the limit,
        and within ``max_relative_gap`` of the trajectory's scale."""
        if self.exact:
            return True
        within_se = bool(self.mean_gap[-1] <= self.tolerance * self.mean_gap_se[-1])
        return within_se and bool(self.relative_mean_gap[-1] <= self.max_relative_gap)

    @property
    def converges(self) -> bool:
        """The gap, less the limit's Monte Carlo error, shrinks with width at least as fast as
        ``width^max_slope`` — and what is left of it at the largest width is resolved (:attr:`floored`: a gap
        that the limit's own error explains has no slope to judge)."""
        return self.exact or (self.slope <= self.max_slope and not self.floored)

    @property
    def passed(self) -> bool:
        return self.converges and self.agrees

    @property
    def floored(self) -> bool:
        """What is left of the gap at the largest width once the limit's Monte Carlo error is removed,
        ``gap² − floor²``, is within two standard errors *of that removal* of zero: the limit's own error
        decides the result there. ``floor²`` is the mean of the squared errors over the ``E`` entries of the
        trajectory (outputs × steps, taken as independent): its relative error is ``√(2/E)`` for the
        realized error and ``√(2/((B−1)E))`` for its estimate from ``B`` batches. (The seeds' own scatter is
        in ``slope_se``.)"""
        gap = float(self.gap[-1])
        entries = self.limit.outputs.numel()
        batches = max(self.limit.batches, 2)
        floor_error = self.floor**2 * math.sqrt(2 * batches / ((batches - 1) * entries))
        return not self.exact and gap**2 - self.floor**2 <= 2 * floor_error

    @property
    def status(self) -> str:
        """``"passed"``, ``"failed"`` or ``"undecided"``: a check that did not pass but whose numbers cannot
        tell a slow approach from a wrong limit — the limit's Monte Carlo error floors the gap
        (:attr:`floored`: more particles), or the slope misses by less than its 95% margin, ``slope_t`` standard
        errors (more seeds or more widths) — is undecided, not failed."""
        if self.passed:
            return "passed"
        if self.agrees and (self.floored or self.slope - self.slope_t * self.slope_se <= self.max_slope):
            return "undecided"
        return "failed"

    def advice(self) -> str:
        """What would decide an undecided check."""
        if self.status != "undecided":
            return ""
        if self.floored:
            wanted = (2 * self.floor / max(float(self.gap[-1]), self.resolution, 1e-300)) ** 2
            return (f"the limit's Monte Carlo error ({self.floor:.3g}) is as large as the gap at width "
                    f"{self.widths[-1]}: train the limit with about {max(4.0, wanted):.0f}× more particles (its error "
                    "falls as particles^-1/2), or compare at smaller widths")
        return (f"the slope {self.slope:.3f} ± {self.slope_se:.3f} misses {self.max_slope} by less than its 95% margin "
                f"({self.slope_t:.2f} standard errors with {self.seeds} seeds): more seeds per width (its error falls "
                "as seeds^-1/2) or a wider range of widths")

    def format(self) -> str:
        lines = [f"{'width':>8} {'gap':>10} {'± se':>9} {'mean gap':>10} {'± se':>9}"]
        for i, w in enumerate(self.widths):
            lines.append(f"{w:>8} {self.gap[i]:>10.4f} {self.gap_se[i]:>9.4f} {self.mean_gap[i]:>10.4f} "
                         f"{self.mean_gap_se[i]:>9.4f}")
        lines.append(f"fitted slope of the gap: {self.slope:.3f} ± {self.slope_se:.3f} (pass: <= {self.max_slope}); "
                     f"largest width within "
                     f"{self.mean_gap[-1] / self.mean_gap_se[-1]:.2f} standard errors (pass: <= {self.tolerance})")
        lines.append(f"trajectory scale {self.scale:.4g}: largest width's mean gap {self.relative_mean_gap[-1]:.3g} "
                     f"of it (pass: <= {self.max_relative_gap})"
                     + ("; every gap is below the numerical resolution: exact agreement" if self.exact else ""))
        lines.append(f"limit: {self.limit.particles} particles in {self.limit.batches} batches, {self.limit.dots} "
                     f"dots, {self.limit.seconds:.1f} s; finite widths {self.seconds_finite:.1f} s")
        lines.append(f"the limit's Monte Carlo error in every gap: {self.floor:.4g} (removed before the slope is "
                     f"fitted; slope of the gaps themselves {self.raw_slope:.3f})")
        if self.mixture and self.status != "passed":
            lines.append(f"the limit is the mixture over the random draws of {', '.join(self.mixture)} (no width "
                         "axis): every seed keeps its own draw at every width, so its gap need not shrink; "
                         "check(..., shared_draws=True) compares both sides given one draw")
        lines.append({"passed": "PASSED", "failed": "FAILED"}.get(self.status, f"UNDECIDED: {self.advice()}"))
        return "\n".join(lines)

    def plot(self, path: str, outputs: int = 3) -> str:
        """Trajectories of the first ``outputs`` outputs (limit with ±2 SE bands, finite seed means) and the gap
        against width; saved as a PNG at ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        lim = self.limit.outputs.reshape(self.limit.outputs.shape[0], -1)
        lim_se = self.limit.outputs_se.reshape(lim.shape)
        fin = self.finite_mean.reshape(len(self.widths), lim.shape[0], -1)
        steps = torch.arange(lim.shape[0])
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for j in range(min(outputs, lim.shape[1])):
            c = colors[j % len(colors)]
            left.plot(steps, lim[:, j], color=c, lw=2, label="limit" if j == 0 else None)
            left.fill_between(steps, lim[:, j] - 2 * lim_se[:, j], lim[:, j] + 2 * lim_se[:, j], color=c, alpha=0.2)
            for i, w in enumerate(self.widths):
                left.plot(steps, fin[i, :, j], color=c, ls=":", alpha=0.35 + 0.65 * (i + 1) / len(self.widths),
                          label=f"width {w}" if j == 0 else None)
        left.set_xlabel("step")
        left.set_ylabel("output")
        left.set_title("outputs: limit (±2 se) and seed-averaged finite widths")
        left.legend(fontsize=8)
        w = torch.tensor(self.widths, dtype=torch.float64)
        right.errorbar(w, self.gap, yerr=self.gap_se, fmt="o-", label=f"gap (slope {self.slope:.2f})")
        right.errorbar(w, self.mean_gap, yerr=self.mean_gap_se, fmt="s--", label="gap of the seed mean")
        right.plot(w, self.mean_gap_se, "k:", label="its standard error")
        right.set_xscale("log")
        right.set_yscale("log")
        right.set_xlabel("width")
        right.set_title("distance to the limit")
        right.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def finite_outputs(limit: Limit, Z: torch.Tensor, y: torch.Tensor, n_train: int, width: int, seed: int, steps: int,
                   lr: float, loss: Any, schedule: Sequence[torch.Tensor], dtype: torch.dtype,
                   center: bool = False, draw_seed: int | None = None) -> torch.Tensor:
    """Outputs ``[steps+1, len(Z), ...]`` of one finite-width model trained by the plain torch loop
    (``center``: of ``f − f_0``, as ``tpl.instantiate(..., center=True)``; ``draw_seed``: its fixed-size random
    tensors are that seed's draw, :func:`~tplimits.limit.draws.share_draws`)."""
    outputs = [out.detach() for _, _, out in finite_steps(limit, Z, y, n_train, width, seed, steps, lr, loss,
                                                          schedule, dtype, center, draw_seed)]
    return limit.examples(Z).first(torch.stack(outputs), n_train, lead=1)


def finite_steps(limit: Limit, Z: torch.Tensor, y: torch.Tensor, n_train: int, width: int, seed: int, steps: int,
                 lr: float, loss: Any, schedule: Sequence[torch.Tensor], dtype: torch.dtype,
                 center: bool = False, draw_seed: int | None = None) -> Iterator[tuple[int, Any, torch.Tensor]]:
    """Train one finite-width model, yielding ``(t, model, outputs)`` after each forward pass, before the
    update of step ``t`` is taken (the last yield, ``t = steps``, has no update after it)."""
    loss_fn = lookup_loss(loss)
    fam = limit.family(Z)
    examples = Examples.of(fam.program)
    with default_dtype(dtype):
        model, opt = instantiate_family(fam, width=width, param=limit.param, rule=limit.rule, lr=lr, seed=seed,
                                        center=center, weight_decay=limit.weight_decay, clip=limit.clip,
                                        optimizer_options=limit.optimizer_options)
        if draw_seed is not None:
            share_draws(model, limit.setup(Z).draws, draw_seed, width)
    model = model.to(dtype)
    inputs = Z.to(dtype) if Z.is_floating_point() else Z
    targets = y.to(dtype) if y.is_floating_point() else y
    bound = explosion_bound(examples.first(y, n_train))
    for t in range(steps + 1):
        out = model(inputs)
        check_outputs(examples.first(out, n_train), bound, t, f"the finite model of width {width} (seed {seed})")
        yield t, model, out
        if t < steps:
            opt.zero_grad()
            examples.loss(loss_fn, out, targets, schedule[t]).backward()
            opt.step()


def _check_arguments(widths: Sequence[int], seeds: int, max_slope: float, tolerance: float, trajectory: Any,
                     dtype: torch.dtype) -> None:
    """Before any work: at least two distinct positive widths and two seeds, finite thresholds, a trajectory
    of :meth:`Limit.train` if one is given (the rest is checked by :meth:`Limit.train` or against the
    trajectory's identity)."""
    if not isinstance(widths, Sequence) or isinstance(widths, str):
        raise TplimitsError(f"widths must be a sequence of positive integers, got {widths!r}")
    if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
        raise TplimitsError(f"widths must be positive integers, got {list(widths)}")
    if len(set(widths)) < 2 or len(set(widths)) != len(list(widths)):
        raise TplimitsError(f"widths={list(widths)}: a check needs at least two distinct widths (for a slope), "
                            "each once")
    if not isinstance(seeds, int) or seeds < 2:
        raise TplimitsError(f"seeds={seeds!r}: a check needs at least two seeds per width (for standard errors)")
    check_real("max_slope", max_slope)
    check_real("tolerance", tolerance, 0)
    if trajectory is not None and not isinstance(getattr(trajectory, "identity", None), Mapping):
        raise TplimitsError(f"trajectory must be a Trajectory returned by Limit.train, got {type(trajectory).__name__}")
    check_dtype_device(dtype, "cpu")


def _check_trajectory(trajectory: Trajectory, X: torch.Tensor, y: torch.Tensor, tests: torch.Tensor, steps: int,
                      lr: float, loss: Any, center: bool = False, draw_seed: int | None = None) -> None:
    """A trajectory handed to :func:`check` must be of the run the check trains the finite models on (``tests``:
    its test examples, none without ``X_test``)."""
    if trajectory.batches < 2:
        raise TplimitsError("the trajectory given has no standard errors (batches=1); train it with batches >= 2")
    expected = {"steps": repr(steps), "lr": repr(lr), "loss": loss.name, "X": digest(X), "y": digest(y),
                "center": repr(center), "draw_seed": repr(draw_seed),
                "X_test": digest(tests)}
    differing = sorted(k for k, v in expected.items() if trajectory.identity.get(k) != v)
    if differing:
        raise TplimitsError(f"the trajectory given is of another run: its {', '.join(differing)} differ from this "
                            "check's arguments; train it with the same ones, or let check train the limit")


def check(limit: Limit, X: torch.Tensor, y: torch.Tensor, widths: Sequence[int] = (128, 512, 2048), seeds: int = 8,
          steps: int = 50, lr: float = 0.1, loss: Any = "mse", batch_size: int | None = None,
          X_test: torch.Tensor | None = None, dtype: torch.dtype = torch.float64, max_slope: float = -0.4,
          tolerance: float = 3.0, trajectory: Trajectory | None = None, progress: bool = True, center: bool = False,
          max_relative_gap: float = 1.0, shared_draws: bool = False, seed: int = 0,
          **train_options: Any) -> CheckReport:
    """Train the limit (or take ``trajectory``) and ``seeds`` finite models per width; compare (:func:`compare`).
    ``seed``: the limit's (its particle systems'); the finite models of every width take seeds ``0 … seeds − 1``.
    ``center`` trains both sides on ``f − f_0``. ``shared_draws``: a model's fixed-size tensors initialized at random
    (:mod:`tplimits.limit.draws`) take one draw on both sides (the limit's systems and every finite seed), so the
    check compares the limit conditional on that draw, whose per-seed gap shrinks with width; by default each seed
    and each system draws its own and the limit is the mixture over the law.

    Under a ``torch.distributed`` process group (``distributed`` among ``train_options``, as :meth:`Limit.train`
    takes it) the finite models are spread over the ranks too, model ``i`` of the ``(width, seed)`` pairs on rank
    ``i mod world size``, and gathered on every rank: each is trained exactly as in one process."""
    _check_arguments(widths, seeds, max_slope, tolerance, trajectory, dtype)
    check_real("max_relative_gap", max_relative_gap, 0)
    if not isinstance(shared_draws, bool):
        raise TplimitsError(f"shared_draws must be True or False, got {shared_draws!r}")
    draw_seed = SHARED_DRAW_SEED if shared_draws else None
    rank, size = process_group(train_options.get("distributed"))
    widths = tuple(sorted(widths))
    X, y = data("X", X), data("y", y)
    given = trajectory is not None
    if not given:
        trajectory = limit.train(X, y, steps=steps, lr=lr, loss=loss, batch_size=batch_size, X_test=X_test,
                                 seed=seed, dtype=dtype, progress=progress, center=center, draw_seed=draw_seed,
                                 **train_options)
    examples = limit.examples(X)
    Z = X if X_test is None else examples.join(X, torch.as_tensor(X_test).to(X.dtype))
    if given:
        _check_trajectory(trajectory, X, y, examples.after(Z, examples.count(X)), steps, lr, lookup_loss(loss), center,
                          draw_seed)
    bad = [t for t in range(steps + 1) if blown_up(trajectory.outputs[t], explosion_bound(y))]
    if bad:
        raise Diverged(f"the trajectory given diverged at step {bad[0]} (non-finite or exploding outputs); no verdict "
                       "can be drawn from it", step=bad[0], value="outputs", trajectory=trajectory)
    schedule = batch_schedule(examples.count(X), batch_size, steps, 0)
    start = time.perf_counter()
    models = [(w, seed) for w in widths for seed in range(seeds)]
    runs = torch.stack(spread(len(models), lambda i: finite_outputs(limit, Z, y, examples.count(X), *models[i], steps,
                                                                    lr, loss, schedule, dtype, center, draw_seed),
                                    rank, size))
    runs = runs.reshape(len(widths), seeds, *runs.shape[1:])  # [widths, seeds, steps+1, M, ...]
    seconds = time.perf_counter() - start
    report = compare(runs, trajectory, widths, max_slope=max_slope, tolerance=tolerance,
                     max_relative_gap=max_relative_gap, seconds_finite=seconds)
    mixture = () if shared_draws else tuple(sorted(limit.setup(Z).draws))
    return attrs.evolve(report, mixture=mixture)


def trajectory_scale(outputs: torch.Tensor) -> float:
    """The scale ``S`` a trajectory's gaps are judged against: the RMS over steps and outputs of
    ``outputs`` ``[steps+1, ...]`` or of their movement from step 0, whichever is larger (outputs that
    start at zero are measured by how far they move)."""
    return max(rms(outputs), rms(outputs - outputs[:1]))


def compare(runs: torch.Tensor, trajectory: Trajectory, widths: tuple[int, ...], max_slope: float = -0.4,
            tolerance: float = 3.0, max_relative_gap: float = 1.0, seconds_finite: float = 0.0) -> CheckReport:
    """The report of finite ``runs`` ``[widths, seeds, steps+1, ...]`` against the limit's ``trajectory``."""
    seeds = runs.shape[1]
    lim = trajectory.outputs.to(runs.dtype)
    lim_se = trajectory.outputs_se.to(runs.dtype)
    per_seed = (runs - lim).flatten(2).square().mean(-1).sqrt()  # [widths, seeds]
    gap = per_seed.mean(1)
    gap_se = per_seed.std(1) / math.sqrt(seeds)
    finite_mean = runs.mean(1)
    finite_se = runs.std(1) / math.sqrt(seeds)
    mean_gap = (finite_mean - lim).flatten(1).square().mean(-1).sqrt()
    mean_gap_se = (finite_se.square() + lim_se.square()).flatten(1).mean(-1).sqrt()
    scale = trajectory_scale(lim)
    resolution = math.sqrt(torch.finfo(runs.dtype).eps) * scale
    # every seed's gap contains the limit's own error (variance: its outputs' squared standard errors);
    # the finite-width part, whose slope is judged, is what is left of the squared gap
    floor = float(lim_se.square().mean().sqrt()) if bool(torch.isfinite(lim_se).all()) else 0.0
    tiny = max(resolution, torch.finfo(torch.float64).tiny)  # rounding-level gaps: a log of 0 has no slope
    g = gap.to(torch.float64)
    excess = (g.square() - floor**2).clamp_min(0).sqrt().clamp_min(tiny)
    slope = fit_slope(widths, excess.tolist())[0]
    raw_slope = fit_slope(widths, g.clamp_min(tiny).tolist())[0]
    # the slope is Σ_i c_i log(excess_i); d log(excess) = gap · d gap / excess²
    logw = torch.tensor(widths, dtype=torch.float64).log()
    c = (logw - logw.mean()) / (logw - logw.mean()).square().sum()
    slope_se = float((c.square() * (g * gap_se.to(torch.float64) / excess.square()).square()).sum().sqrt())
    return CheckReport(widths=widths, seeds=seeds, limit=trajectory, finite_mean=finite_mean, finite_se=finite_se,
                       gap=gap, gap_se=gap_se, mean_gap=mean_gap, mean_gap_se=mean_gap_se, slope=slope,
                       max_slope=max_slope, tolerance=tolerance, seconds_finite=seconds_finite, scale=scale,
                       resolution=resolution, max_relative_gap=max_relative_gap, floor=floor, slope_se=slope_se,
                       raw_slope=raw_slope,
                       slope_t=student_t_quantile(0.025, seeds - 1) if seeds > 1 else math.inf)


def _relative(gap: torch.Tensor, scale: float) -> torch.Tensor:
    """``gap / scale``; with no scale at all a zero gap is 0 and any other infinite."""
    if scale > 0:
        return gap / scale
    return torch.where(gap > 0, torch.inf, 0.0).to(gap.dtype)
