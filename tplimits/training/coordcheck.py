"""Numeric coordinate check: how every program value scales with width, before and after training.

For each parametrization and width, the architecture is instantiated, trained for a few steps
with a plain torch loop, and the parametrized program is replayed at initialization and after
training. Every value of the program is recorded: its coordinate size ``√mean(x²)`` and the size
of its change from initialization, including values module hooks cannot see (attention logits,
normalization statistics). A log-log fit over widths gives each value's slope, and the verdict
compares the hidden-layer change slopes with the theory: ``-r`` of the parametrization's classification
(μP: 0, features move Θ(1); NTP: −1/2); growth flags an unstable parametrization.

The spectral diagnostic of seed 001 is reported too: for each weight matrix,
``‖ΔW‖₂ / √(fan_out / fan_in)``, width-independent under μP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from tplimits.core.interpret import FiniteInterpreter
from tplimits.core.ir import Avg, MatMul, Nonlin, Parameter, Regroup, Width
from tplimits.optimizers.base import UpdateRule
from tplimits.training.classify import classify_program, optimizer_homogeneity
from tplimits.training.family import Family
from tplimits.training.instantiate import instantiate_family
from tplimits.training.loss import Loss
from tplimits.training.model import effective_state, parametrized_program
from tplimits.training.parametrize import Parametrization


@attrs.frozen
class NodeRecord:
    """One program value across widths: sizes at init, after training, and of the change."""

    name: str
    kind: str
    op: str
    init: tuple[float, ...]
    final: tuple[float, ...]
    change: tuple[float, ...]
    init_slope: float
    change_slope: float
    change_by_step: tuple[tuple[float, ...], ...] = ()  # [step][width]: the change after each step


@attrs.frozen
class ParamReport:
    """The coordinate check of one parametrization."""

    parametrization: str
    widths: tuple[int, ...]
    nodes: tuple[NodeRecord, ...]
    spectral: dict[str, tuple[tuple[float, ...], float]]  # matrix -> (‖ΔW‖₂/√(out/in) per width, slope)
    loss: tuple[float, ...]
    verdict: str
    hidden_change_slopes: tuple[float, ...]
    output_names: tuple[str, ...] = ()

    def node(self, name: str) -> NodeRecord:
        return next(n for n in self.nodes if n.name == name)

    @property
    def outputs(self) -> tuple[NodeRecord, ...]:
        """The model's outputs (after the parametrization's output multiplier)."""
        return tuple(n for n in self.nodes if n.name in self.output_names)


@attrs.frozen
class CoordCheckReport:
    reports: dict[str, ParamReport]

    def __getitem__(self, name: str) -> ParamReport:
        return self.reports[name]

    def format(self) -> str:
        lines = []
        for name, rep in self.reports.items():
            lines.append(f"{name}: {rep.verdict}")
            lines.append(f"  widths {list(rep.widths)}; final loss per width {[f'{x:.3g}' for x in rep.loss]}")
            lines.append(f"  {'value':<38} {'kind':<7} {'init slope':>10} {'change slope':>12}")
            for node in rep.nodes:
                lines.append(f"  {node.name:<38} {node.kind:<7} {node.init_slope:>10.3f} {node.change_slope:>12.3f}")
            for matrix, (_, slope) in rep.spectral.items():
                lines.append(f"  spectral ‖ΔW‖/√(out/in) {matrix:<24} slope {slope:.3f}")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """mup-style coordinate check: per parametrization (rows), the size at initialization and the change
        after each step (columns) of every program value against width, log-log. Returns ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        reports = list(self.reports.values())
        steps = max(len(n.change_by_step) for r in reports for n in r.nodes)
        fig, axes = plt.subplots(len(reports), steps + 1, figsize=(3.2 * (steps + 1), 2.8 * len(reports)),
                                 squeeze=False, sharex=True)
        for i, rep in enumerate(reports):
            panels = [("size at init", [n.init for n in rep.nodes])]
            panels += [(f"change after step {t + 1}", [n.change_by_step[t] for n in rep.nodes]) for t in range(steps)]
            for j, (title, series) in enumerate(panels):
                ax = axes[i][j]
                for values in series:
                    if all(v > 0 for v in values):
                        ax.plot(rep.widths, values, "o-", markersize=2, linewidth=0.8)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_title(f"{rep.parametrization}: {title}", fontsize=9)
                if i == len(reports) - 1:
                    ax.set_xlabel("width n")
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path


def fit_slope(widths: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    """The least-squares slope of ``log value`` against ``log width`` over the positive finite points (a
    width may repeat: one point per seed), and its standard error from the residuals (NaN with fewer than
    three points, or when the points are on one line at two widths only). ``(0, nan)`` when fewer than two
    points are positive and all are finite (nothing moves), ``(nan, nan)`` when a value is not finite."""
    pts = [(math.log(w), math.log(v)) for w, v in zip(widths, values, strict=True) if v > 0 and math.isfinite(v)]
    if len({x for x, _ in pts}) < 2:
        return (float("nan") if any(not math.isfinite(v) for v in values) else 0.0), float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    if len(pts) < 3:
        return slope, float("nan")
    residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in pts)
    return slope, math.sqrt(residual / (len(pts) - 2) / sxx)


def _slope(widths: Sequence[int], values: Sequence[float]) -> float:
    return fit_slope(widths, values)[0]


def coordinate_size(x: torch.Tensor) -> float:
    """Coordinate size √mean(x²) over the finite entries (masked attention logits are −inf)."""
    x = x.detach().double()
    x = x[torch.isfinite(x)]
    return float(x.pow(2).mean().sqrt()) if x.numel() else 0.0


def is_recorded(ins: Any) -> bool:
    """Whether the check records this instruction's value (every computed value, not inputs or parameters)."""
    return isinstance(ins, Nonlin | MatMul | Avg | Regroup)


def spectral_norm(matrix: torch.Tensor, iterations: int = 200, rtol: float = 1e-7) -> float:
    """‖matrix‖₂ of a 2-D tensor: exact (LAPACK) while its smaller side is at most 256, by power iteration on
    ``MᵀM`` from a fixed start otherwise (no SVD of a large matrix), to a relative change below ``rtol``."""
    m = matrix.detach().double()
    if min(m.shape) <= 256:
        return float(torch.linalg.matrix_norm(m, ord=2))
    v = torch.randn(m.shape[1], generator=torch.Generator().manual_seed(0), dtype=m.dtype).to(m.device)
    sigma = 0.0
    for _ in range(iterations):
        u = m @ v
        size = float(u.norm())
        if size == 0.0:
            return 0.0
        w = m.T @ (u / size)
        previous, sigma = sigma, float(w.norm())
        v = w / sigma
        if abs(sigma - previous) <= rtol * sigma:
            break
    return sigma


def spectral_ratio(before: torch.Tensor, after: torch.Tensor, layout: tuple) -> float:
    """‖ΔW‖₂ / √(fan_out / fan_in) with the matrix flattened to [fan_out, fan_in (× kernel)] (seed 001's
    spectral condition: Θ(1) under μP)."""
    delta = (after - before).detach().double()
    out_axis = next(i for i, a in enumerate(layout) if isinstance(a, Width))
    delta = delta.movedim(out_axis, 0).reshape(delta.shape[out_axis], -1)
    return spectral_norm(delta) / math.sqrt(delta.shape[0] / delta.shape[1])


def coord_check_family(fam: Family, inputs: tuple, params: Sequence[Parametrization], rule: UpdateRule, loss: Loss,
                       widths: Sequence[int] = (128, 256, 512, 1024, 2048), steps: int = 3, lr: float = 0.1,
                       seeds: int = 2, tolerance: float = 0.1) -> CoordCheckReport:
    """Train ``fam`` under each parametrization at each width on ``inputs`` (against fixed random targets,
    with ``loss``) and report how every value scales (see :func:`tplimits.coord_check`)."""
    reports = {}
    for param in params:
        reports[param.name] = _check_one(fam, param, rule, loss, list(widths), steps, lr, seeds, inputs, tolerance)
    return CoordCheckReport(reports)


def _check_one(fam: Family, param: Parametrization, rule: UpdateRule, loss_fn: Loss, widths: list[int], steps: int,
               lr: float, seeds: int, inputs: tuple, tolerance: float) -> ParamReport:
    program = parametrized_program(fam.program, param)
    recorded = [ins for ins in program if is_recorded(ins)]
    matrices = [ins for ins in program if isinstance(ins, Parameter) and ins.kind == "matrix" and ins.trainable]
    sums = {key: [[0.0] * len(widths) for _ in recorded] for key in ("init", "final", "change")}
    spectral = {m.target: [0.0] * len(widths) for m in matrices}
    by_step = [[[0.0] * len(widths) for _ in range(steps)] for _ in recorded]
    losses = [0.0] * len(widths)
    for wi, width in enumerate(widths):
        for seed in range(seeds):
            model, opt = instantiate_family(fam, width=width, param=param, rule=rule, lr=lr, seed=seed)
            target = _targets(model, inputs)
            before = program_values(program, model, inputs)
            weights0 = {m.target: effective_state(model.model, program)[m.target].detach().clone() for m in matrices}
            loss = torch.tensor(float("nan"))
            for t in range(steps):
                opt.zero_grad()
                loss = loss_fn(model(*inputs), target)
                loss.backward()
                opt.step()
                after = program_values(program, model, inputs)
                for k, ins in enumerate(recorded):
                    by_step[k][t][wi] += coordinate_size(_change(before[ins.name], after[ins.name])) / seeds
            state = effective_state(model.model, program)
            losses[wi] += float(loss.detach()) / seeds
            for k, ins in enumerate(recorded):
                sums["init"][k][wi] += coordinate_size(before[ins.name]) / seeds
                sums["final"][k][wi] += coordinate_size(after[ins.name]) / seeds
                sums["change"][k][wi] += coordinate_size(_change(before[ins.name], after[ins.name])) / seeds
            for m in matrices:
                spectral[m.target][wi] += spectral_ratio(weights0[m.target], state[m.target], m.layout) / seeds
    nodes = tuple(
        NodeRecord(ins.name, ins.kind, ins.origin.op, tuple(sums["init"][k]), tuple(sums["final"][k]),
                   tuple(sums["change"][k]), _slope(widths, sums["init"][k]), _slope(widths, sums["change"][k]),
                   tuple(tuple(step) for step in by_step[k]))
        for k, ins in enumerate(recorded)
    )
    spec = {name: (tuple(values), _slope(widths, values)) for name, values in spectral.items()}
    hidden = tuple(n.change_slope for n in nodes if n.kind == "vector")
    predicted = classify_program(fam.program, param, homogeneity=optimizer_homogeneity(rule)).feature_change_exponent
    return ParamReport(param.name, tuple(widths), nodes, spec, tuple(losses),
                       _verdict(predicted, hidden, nodes, tolerance), hidden, tuple(program.outputs))


def _change(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``after − before`` where both are finite (masked attention logits stay −inf), 0 elsewhere."""
    finite = torch.isfinite(before) & torch.isfinite(after)
    return torch.where(finite, after - before, 0.0)


def _targets(model: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        out = model(*inputs)
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(1234), dtype=out.dtype)


def program_values(program: Any, model: Any, inputs: tuple) -> dict[str, torch.Tensor]:
    """Every value of ``program`` (a parametrized program) replayed with ``model``'s effective parameters."""
    interp = FiniteInterpreter.from_model(program, model.model)
    with torch.no_grad():
        interp.run(*inputs)
    return {k: v.detach().clone() for k, v in interp.values.items() if torch.is_tensor(v)}


def _verdict(predicted: Any, hidden: Sequence[float], nodes: Sequence[NodeRecord], tolerance: float) -> str:
    """The change slopes against the theory's ``-r`` (``predicted``; None where it predicts no limit)."""
    if not hidden:
        return "no vector values to check"
    worst = max(hidden, key=abs)
    growing = [n.name for n in nodes if n.change_slope > tolerance or not math.isfinite(n.change_slope)]
    if predicted is not None:
        want = float(predicted)
        off = [s for s in hidden if abs(s - want) > tolerance]
        status = "as predicted" if not off else "OFF PREDICTION"
        return (f"{status}: vector change slopes in [{min(hidden):.3f}, {max(hidden):.3f}], "
                f"theory {want} ± {tolerance}")
    if growing:
        return f"GROWS with width: {len(growing)} values' changes grow (e.g. {growing[:3]}); max slope {worst:.3f}"
    return f"vector change slopes in [{min(hidden):.3f}, {max(hidden):.3f}]"
