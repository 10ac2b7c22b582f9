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
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch

from tplimits.errors import Diverged, TplimitsError
from tplimits.limit.runs import batch_schedule, blown_up, check_outputs, default_dtype, digest, explosion_bound
from tplimits.registry.manager import loss as lookup_loss
from tplimits.training.instantiate import instantiate_family

if TYPE_CHECKING:  # the Limit's check method calls this module
    from tplimits.limit.limit import Limit, Trajectory


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

    @property
    def agrees(self) -> bool:
        """The seed-averaged largest-width outputs are within ``tolerance`` standard errors of the limit."""
        return bool(self.mean_gap[-1] <= self.tolerance * self.mean_gap_se[-1])

    @property
    def converges(self) -> bool:
        """The gap shrinks with width at least as fast as ``width^max_slope``."""
        return self.slope <= self.max_slope

    @property
    def passed(self) -> bool:
        return self.converges and self.agrees

    def format(self) -> str:
        lines = [f"{'width':>8} {'gap':>10} {'± se':>9} {'mean gap':>10} {'± se':>9}"]
        for i, w in enumerate(self.widths):
            lines.append(f"{w:>8} {self.gap[i]:>10.4f} {self.gap_se[i]:>9.4f} {self.mean_gap[i]:>10.4f} "
                         f"{self.mean_gap_se[i]:>9.4f}")
        lines.append(f"fitted slope of the gap: {self.slope:.3f} (pass: <= {self.max_slope}); largest width within "
                     f"{self.mean_gap[-1] / self.mean_gap_se[-1]:.2f} standard errors (pass: <= {self.tolerance})")
        lines.append(f"limit: {self.limit.particles} particles in {self.limit.batches} batches, {self.limit.dots} "
                     f"dots, {self.limit.seconds:.1f} s; finite widths {self.seconds_finite:.1f} s")
        lines.append("PASSED" if self.passed else "FAILED")
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
                   center: bool = False) -> torch.Tensor:
    """Outputs ``[steps+1, len(Z), ...]`` of one finite-width model trained by the plain torch loop
    (``center``: of ``f − f_0``, as ``tpl.instantiate(..., center=True)``)."""
    loss_fn = lookup_loss(loss)
    lowering_inputs = Z.to(torch.get_default_dtype()) if Z.is_floating_point() else Z
    fam = limit.family(lowering_inputs)
    with default_dtype(dtype):
        model, opt = instantiate_family(fam, width=width, param=limit.param, rule=limit.rule, lr=lr, seed=seed,
                                        center=center, weight_decay=limit.weight_decay, clip=limit.clip,
                                        optimizer_options=limit.optimizer_options)
    model = model.to(dtype)
    inputs = Z.to(dtype) if Z.is_floating_point() else Z
    targets = y.to(dtype) if y.is_floating_point() else y
    bound = explosion_bound(y[:n_train])
    outputs = []
    for t in range(steps + 1):
        out = model(inputs)
        check_outputs(out[:n_train], bound, t, f"the finite model of width {width} (seed {seed})")
        outputs.append(out.detach())
        if t < steps:
            opt.zero_grad()
            rows = schedule[t]
            loss_fn(out[rows], targets[rows]).backward()
            opt.step()
    return torch.stack(outputs)[:, :n_train]


def _check_widths(widths: Sequence[int], seeds: int) -> None:
    """Before any work: at least two distinct positive widths and two seeds."""
    if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
        raise TplimitsError(f"widths must be positive integers, got {list(widths)}")
    if len(set(widths)) < 2 or len(set(widths)) != len(list(widths)):
        raise TplimitsError(f"widths={list(widths)}: a check needs at least two distinct widths (for a slope), "
                            "each once")
    if not isinstance(seeds, int) or seeds < 2:
        raise TplimitsError(f"seeds={seeds!r}: a check needs at least two seeds per width (for standard errors)")


def _check_trajectory(trajectory: Trajectory, X: torch.Tensor, y: torch.Tensor, X_test: Any, steps: int, lr: float,
                      loss: Any, center: bool = False) -> None:
    """A trajectory handed to :func:`check` must be of the run the check trains the finite models on."""
    if trajectory.batches < 2:
        raise TplimitsError("the trajectory given has no standard errors (batches=1); train it with batches >= 2")
    expected = {"steps": repr(steps), "lr": repr(lr), "loss": loss.name, "X": digest(X), "y": digest(y),
                "center": repr(center),
                "X_test": digest(X[:0] if X_test is None else torch.as_tensor(X_test).to(X.dtype))}
    differing = sorted(k for k, v in expected.items() if trajectory.identity.get(k) != v)
    if differing:
        raise TplimitsError(f"the trajectory given is of another run: its {', '.join(differing)} differ from this "
                            "check's arguments; train it with the same ones, or let check train the limit")


def check(limit: Limit, X: torch.Tensor, y: torch.Tensor, widths: Sequence[int] = (128, 512, 2048), seeds: int = 8,
          steps: int = 50, lr: float = 0.1, loss: Any = "mse", batch_size: int | None = None,
          X_test: torch.Tensor | None = None, dtype: torch.dtype = torch.float64, max_slope: float = -0.4,
          tolerance: float = 3.0, trajectory: Trajectory | None = None, progress: bool = True, center: bool = False,
          **train_options: Any) -> CheckReport:
    """Train the limit (or take ``trajectory``) and ``seeds`` finite models per width; compare. ``center``
    trains both sides on ``f − f_0``."""
    _check_widths(widths, seeds)
    widths = tuple(sorted(widths))
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    if trajectory is None:
        trajectory = limit.train(X, y, steps=steps, lr=lr, loss=loss, batch_size=batch_size, X_test=X_test,
                                 seed=0, dtype=dtype, progress=progress, center=center, **train_options)
    else:
        _check_trajectory(trajectory, X, y, X_test, steps, lr, lookup_loss(loss), center)
    bad = [t for t in range(steps + 1) if blown_up(trajectory.outputs[t], explosion_bound(y))]
    if bad:
        raise Diverged(f"the trajectory given diverged at step {bad[0]} (non-finite or exploding outputs); no verdict "
                       "can be drawn from it", step=bad[0], value="outputs", trajectory=trajectory)
    Z = X if X_test is None else torch.cat([X, torch.as_tensor(X_test).to(X.dtype)])
    schedule = batch_schedule(len(X), batch_size, steps, 0)
    start = time.perf_counter()
    runs = torch.stack([
        torch.stack([finite_outputs(limit, Z, y, len(X), w, seed, steps, lr, loss, schedule, dtype, center)
                     for seed in range(seeds)])
        for w in widths
    ])  # [widths, seeds, steps+1, M, ...]
    seconds = time.perf_counter() - start
    lim = trajectory.outputs.to(runs.dtype)
    lim_se = trajectory.outputs_se.to(runs.dtype)
    diff = runs - lim
    per_seed = diff.flatten(2).square().mean(-1).sqrt()  # [widths, seeds]
    gap = per_seed.mean(1)
    gap_se = per_seed.std(1) / math.sqrt(seeds)
    finite_mean = runs.mean(1)
    finite_se = runs.std(1) / math.sqrt(seeds)
    mean_gap = (finite_mean - lim).flatten(1).square().mean(-1).sqrt()
    mean_gap_se = (finite_se.square() + lim_se.square()).flatten(1).mean(-1).sqrt()
    logw = torch.tensor(widths, dtype=torch.float64).log()
    logg = gap.to(torch.float64).log()
    slope = float(((logw - logw.mean()) * (logg - logg.mean())).sum() / (logw - logw.mean()).square().sum())
    return CheckReport(widths=widths, seeds=seeds, limit=trajectory, finite_mean=finite_mean, finite_se=finite_se,
                       gap=gap, gap_se=gap_se, mean_gap=mean_gap, mean_gap_se=mean_gap_se, slope=slope,
                       max_slope=max_slope, tolerance=tolerance, seconds_finite=seconds)
