"""Lazy or rich: which regime training a model is in, at which width, and how fast it nears its limit.

For each parametrization, width and seed the model is trained for a few full-batch steps next to its
linearization (:mod:`.linearize`, the same optimizer's param groups), and five numbers are measured:

* **linearization gap**: ``max_t RMS(f_t − f_t^lin) / max_t RMS(f_t − f_0)`` on the training inputs;
* **kernel drift**: ``max_t ‖K_t − K_0‖_F / ‖K_0‖_F`` of the empirical NTK over the steps
  (:func:`.kernels.empirical_ntk`, weighted by the optimizer's per-parameter rates); its value after the
  last step is reported too, as **final kernel drift**;
* **weak correlation**: the second-order change of ``f`` along the first step relative to its
  first-order change (:func:`.kernels.weak_correlation`, seed 000);
* **feature movement**: the mean over hidden vector values of the program of their RMS per-coordinate
  change (read by the coordinate check's :func:`~tplimits.training.coordcheck.program_values`);
* **spectral ratio**: the mean over hidden matrices of ``‖ΔW‖₂ / √(fan_out/fan_in)`` (seed 001), and
  per parameter its relative change ``‖ΔW‖_F/‖W₀‖_F`` (the RMS change per coordinate if ``W₀ = 0``) and
  spectral ratio.

Each number's log-log slope against width (fitted over every run, with its standard error) names a
regime: ``lazy`` (slope ≤ −0.4: the NT limit, where training is its linearization), ``rich`` (|slope| ≤
0.15: Θ(1), features learn), ``grows`` (slope > 0.15: unstable) or ``between``. The verdict
compares them with one another and with the parametrization's classification.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
from tqdm.auto import tqdm

from tplimits.core.ir import Parameter, Width
from tplimits.diagnostics.kernels import empirical_ntk, weak_correlation
from tplimits.diagnostics.linearize import linearize
from tplimits.errors import Diverged, TplimitsError
from tplimits.limit.runs import check_outputs, explosion_bound, rms, standard_error
from tplimits.optimizers.base import TplimitsOptimizer, UpdateRule
from tplimits.training.classify import classify_program, optimizer_homogeneity
from tplimits.training.coordcheck import (
    coordinate_size,
    fit_slope,
    is_recorded,
    program_values,
    spectral_ratio,
)
from tplimits.training.family import Family
from tplimits.training.instantiate import instantiate_family
from tplimits.training.loss import Loss
from tplimits.training.model import effective_state, parametrized_program
from tplimits.training.parametrize import Parametrization

LAZY_SLOPE = -0.4
"""A slope at or below this: the quantity vanishes with width like the NT limit's n^-1/2 (or faster)."""
FLAT_SLOPE = 0.15
"""A slope within ±this: the quantity is Θ(1), as in the feature-learning limit."""

EXACT = 1e-12
"""A relative quantity at most this in every run is zero to rounding (a model linear in its parameters)."""

HEADLINE = ("linearization gap", "kernel drift", "weak correlation", "feature movement", "spectral ratio")
_EXPECTED = {"operator": "lazy", "feature learning": "rich"}


def regime_of(slope: float, slope_se: float = 0.0) -> str:
    """The regime a fitted slope points to (see the module's docstring); ``uncertain`` when both 0 and −1/2
    are within two standard errors of it (the fit cannot tell the regimes apart)."""
    if not math.isfinite(slope):
        return "undetermined"
    if abs(slope) < 2 * slope_se and abs(slope + 0.5) < 2 * slope_se:
        return "uncertain"
    if slope <= LAZY_SLOPE:
        return "lazy"
    if abs(slope) <= FLAT_SLOPE:
        return "rich"
    return "grows" if slope > 0 else "between"


@attrs.frozen
class Measure:
    """One quantity across widths: seed mean and standard error per width, every run's value, the fitted
    log-log slope with its standard error, and the regime it points to (``exact``: zero in every run)."""

    name: str
    widths: tuple[int, ...]
    mean: tuple[float, ...]
    se: tuple[float, ...]
    runs: tuple[tuple[int, float], ...]
    slope: float
    slope_se: float
    regime: str

    @classmethod
    def fit(cls, name: str, widths: Sequence[int], runs: Sequence[tuple[int, float]]) -> Measure:
        values = [v for _, v in runs]
        if not all(math.isfinite(v) for v in values):
            bad = next(w for w, v in runs if not math.isfinite(v))
            raise Diverged(f"{name} is not finite at width {bad}: training diverged or a derivative overflowed; "
                           "try a smaller lr or fewer steps", value=name)
        mean, se = [], []
        for width in widths:
            mine = torch.tensor([v for w, v in runs if w == width], dtype=torch.float64)
            mean.append(float(mine.mean()))
            se.append(float(standard_error(mine)))
        if max(abs(v) for v in values) <= EXACT:
            return cls(name, tuple(widths), tuple(mean), tuple(se), tuple(runs), float("nan"), float("nan"), "exact")
        slope, slope_se = fit_slope([w for w, _ in runs], values)
        return cls(name, tuple(widths), tuple(mean), tuple(se), tuple(runs), slope, slope_se,
                   regime_of(slope, slope_se))

    def describe(self) -> str:
        if self.regime == "exact":
            return "0 at every width (exact)"
        return f"slope {self.slope:+.2f} ± {_fmt(self.slope_se)} -> {self.regime}"


def _fmt(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "n/a"


@attrs.frozen
class ParamDiagnosis:
    """The diagnosis of one parametrization: the headline measures (:data:`HEADLINE`), per parameter its
    relative change and spectral ratio, per hidden program value its movement, and the verdict."""

    parametrization: str
    optimizer: str
    predicted: str
    widths: tuple[int, ...]
    measures: dict[str, Measure]
    parameters: dict[str, dict[str, Measure]]
    features: dict[str, Measure]
    regime: str
    contradictions: tuple[str, ...]
    limit_check: Any = None  # the NT limit against the same widths (a CheckReport), when asked for and it exists

    def __getitem__(self, name: str) -> Measure:
        if name not in self.measures:
            raise TplimitsError(f"no measure {name!r}; the measures are {list(self.measures)}")
        return self.measures[name]

    @property
    def verdict(self) -> str:
        head = f"{self.parametrization} ({self.optimizer}): {self.regime}; the classification predicts {self.predicted}"
        return head + "".join(f"\n  ! {c}" for c in self.contradictions)


def _judge(measures: dict[str, Measure], predicted: str) -> tuple[str, tuple[str, ...]]:
    """The regime the headline measures point to together, and every contradiction (between measures,
    with the classification)."""
    kinds = {name: ("lazy" if m.regime == "exact" else m.regime) for name, m in measures.items()}
    noisy = [name for name, kind in kinds.items() if kind in ("uncertain", "undetermined")]
    kinds = {name: kind for name, kind in kinds.items() if name not in noisy}
    found = set(kinds.values())
    regime = found.pop() if len(found) == 1 else "mixed" if found else "uncertain"
    contradictions = []
    if noisy:
        contradictions.append(f"too noisy to judge: {', '.join(noisy)} (0 and -1/2 both within two standard errors "
                              "of the slope); use more seeds or a wider range of widths")
    if regime == "mixed":
        groups: dict[str, list[str]] = {}
        for name, kind in kinds.items():
            groups.setdefault(kind, []).append(name)
        contradictions.append("the measures disagree: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items()))
    expected = _EXPECTED.get(predicted)
    if expected is not None and regime not in (expected, "uncertain"):
        off = [name for name, kind in kinds.items() if kind != expected]
        contradictions.append(f"the classification predicts {predicted} ({expected}), but {', '.join(off)} "
                              f"{'does' if len(off) == 1 else 'do'} not point there")
    return regime, tuple(contradictions)


@attrs.frozen
class Diagnosis:
    """What :func:`tplimits.diagnose` returns: one :class:`ParamDiagnosis` per parametrization."""

    results: dict[str, ParamDiagnosis]

    def __getitem__(self, name: str) -> ParamDiagnosis:
        if name not in self.results:
            raise TplimitsError(f"no parametrization {name!r} in this diagnosis; it has {list(self.results)}")
        return self.results[name]

    def format(self) -> str:
        lines = []
        for diag in self.results.values():
            lines.append(diag.verdict)
            header = "  " + f"{'measure':<20}" + "".join(f"{'n=' + str(w):>20}" for w in diag.widths) + "   fit"
            lines.append(header)
            for m in diag.measures.values():
                cells = "".join(f"{f'{mu:.3g} ± {_fmt_se(se)}':>20}" for mu, se in zip(m.mean, m.se, strict=True))
                lines.append(f"  {m.name:<20}{cells}   {m.describe()}")
            for name, per in diag.parameters.items():
                parts = [f"{k} {m.describe()}" for k, m in per.items()]
                lines.append(f"  {name}: " + "; ".join(parts))
            if diag.limit_check is not None:
                gaps = ", ".join(f"{g:.3g}" for g in diag.limit_check.relative_gap.tolist())
                lines.append(f"  distance to the NT limit (relative to its scale) per width: {gaps}; slope "
                             f"{diag.limit_check.slope:+.2f}")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Each headline measure against width, log-log, seed mean ± SE and the fitted line; one column per
        parametrization (side by side). Returns ``path``."""
        return plot_diagnosis(self, path)


def _fmt_se(se: float) -> str:
    return f"{se:.2g}" if math.isfinite(se) else "n/a"


def plot_diagnosis(diagnosis: Diagnosis, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    columns = list(diagnosis.results.values())
    # one y scale per row: a flat μP line next to a falling NTP line is the contrast to see
    fig, axes = plt.subplots(len(HEADLINE), len(columns), figsize=(4.2 * len(columns), 2.6 * len(HEADLINE)),
                             squeeze=False, sharex=True, sharey="row")
    for j, diag in enumerate(columns):
        axes[0][j].set_title(f"{diag.parametrization} ({diag.optimizer})")
        for i, name in enumerate(HEADLINE):
            ax, m = axes[i][j], diag.measures[name]
            ax.set_xscale("log")
            ax.set_ylabel(name if j == 0 else "")
            if m.regime == "exact":
                ax.text(0.5, 0.5, "0 (exact)", transform=ax.transAxes, ha="center")
                continue
            ax.set_yscale("log")
            se = [s if math.isfinite(s) else 0.0 for s in m.se]
            ax.errorbar(m.widths, m.mean, yerr=se, fmt="o", capsize=3)
            w0, w1 = min(m.widths), max(m.widths)
            logs = [math.log(mu) for mu, w in zip(m.mean, m.widths, strict=True) if mu > 0]
            if logs and math.isfinite(m.slope):
                centre = sum(logs) / len(logs) - m.slope * sum(math.log(w) for w in m.widths) / len(m.widths)
                xs = [w0, w1]
                ax.plot(xs, [math.exp(centre) * x ** m.slope for x in xs], "-",
                        label=f"slope {m.slope:+.2f} ± {_fmt(m.slope_se)}")
                ax.legend(fontsize=8)
        axes[-1][j].set_xlabel("width n")
        axes[-1][j].set_xticks(diag.widths, [str(w) for w in diag.widths])
        axes[-1][j].xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


@attrs.frozen
class Setup:
    """What every run of a diagnosis shares."""

    fam: Family
    inputs: tuple
    targets: torch.Tensor
    rule: UpdateRule
    loss: Loss
    steps: int
    lr: float
    columns: int
    optimizer_options: dict[str, Any]


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, setup: Setup) -> None:
    opt.zero_grad()
    setup.loss(model(*setup.inputs), setup.targets).backward()
    opt.step()


def _output(model: torch.nn.Module, setup: Setup, step: int, what: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(*setup.inputs)
    if not torch.is_tensor(out):
        raise TplimitsError(f"diagnose needs a model whose output is a tensor, got {type(out).__name__}")
    check_outputs(out, explosion_bound(setup.targets), step, what)
    return out.detach()


def _kernel_weights(model: torch.nn.Module, opt: TplimitsOptimizer) -> dict[str, float]:
    """Each trained tensor's ``lr_scale · grad_scale``: the kernel of an SGD step of this parametrization."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return {name_of[id(p)]: g["lr_scale"] * g["grad_scale"] for g in opt.param_groups for p in g["params"]
            if id(p) in name_of}


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _one_run(setup: Setup, param: Parametrization, width: int, seed: int) -> dict[str, Any]:
    """Train the model at ``width`` next to its linearization and measure it (see the module docstring)."""
    model, opt = instantiate_family(setup.fam, width=width, param=param, rule=setup.rule, lr=setup.lr, seed=seed,
                                    optimizer_options=setup.optimizer_options)
    lin = linearize(model)
    lin_opt = lin.optimizer_like(opt)
    fn, theta0, weights = lin.function(*setup.inputs), lin.point(), _kernel_weights(model, opt)
    kernel0 = empirical_ntk(fn, theta0, weights, setup.columns).detach()
    program = parametrized_program(setup.fam.program, param)
    values0 = program_values(program, model, setup.inputs)
    state0 = {k: v.detach().clone() for k, v in effective_state(model.model, program).items()}
    f0 = _output(model, setup, 0, "the model")
    gap, moved, correlation, drift = 0.0, 0.0, 0.0, []
    for t in range(setup.steps):
        theta = _parameters(model)
        _step(model, opt, setup)
        _step(lin, lin_opt, setup)
        direction = {k: v - theta[k] for k, v in _parameters(model).items()}
        correlation += weak_correlation(fn, theta, direction) / setup.steps
        f_t = _output(model, setup, t + 1, "the model")
        gap = max(gap, rms(f_t - _output(lin, setup, t + 1, "its linearization")))
        moved = max(moved, rms(f_t - f0))
        kernel = empirical_ntk(fn, _parameters(model), weights, setup.columns).detach()
        drift.append(float((kernel - kernel0).norm() / kernel0.norm()))
    values = program_values(program, model, setup.inputs)
    features = {ins.name: coordinate_size(values[ins.name] - values0[ins.name])
                for ins in program if is_recorded(ins) and ins.kind == "vector" and ins.name in values}
    return {"linearization gap": gap / moved if moved > 0 else 0.0,
            "kernel drift": max(drift, default=0.0),
            "final kernel drift": drift[-1] if drift else 0.0,
            "weak correlation": correlation,
            "features": features,
            "parameters": _parameter_changes(program, state0, effective_state(model.model, program))}


def _parameter_changes(program: Any, before: dict[str, torch.Tensor],
                       after: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per trained parameter: ``‖ΔW‖_F/‖W₀‖_F`` (``RMS(ΔW)`` if ``W₀ = 0``), and for a parameter with a
    width axis and two or more axes, the spectral ratio ``‖ΔW‖₂/√(fan_out/fan_in)`` (and whether it is a
    hidden matrix)."""
    changes = {}
    for ins in program:
        if not isinstance(ins, Parameter) or not ins.trainable or ins.target not in before:
            continue
        w0, w1 = before[ins.target].detach().double(), after[ins.target].detach().double()
        size, change = float(w0.norm()), float((w1 - w0).norm())
        # a zero-initialized parameter has no size to be relative to: its per-coordinate (RMS) change is the
        # width-independent number (a Frobenius norm of n Θ(1) coordinates grows like √n)
        entry = {"relative change": change / size} if size > 0 else {"RMS change": change / math.sqrt(w0.numel())}
        if w0.ndim >= 2 and any(isinstance(a, Width) for a in ins.layout):
            entry["spectral ratio"] = spectral_ratio(w0, w1, ins.layout)
            entry["hidden"] = ins.kind == "matrix"
        changes[ins.target] = entry
    return changes


def _summarize(param: Parametrization, rule: UpdateRule, fam: Family, widths: list[int],
               runs: list[tuple[int, dict[str, Any]]]) -> ParamDiagnosis:
    def measure(name: str, get: Callable[[dict[str, Any]], float]) -> Measure:
        return Measure.fit(name, widths, [(w, get(r)) for w, r in runs])

    first = runs[0][1]
    hidden = [k for k, e in first["parameters"].items() if e.get("hidden")]
    spectral = hidden or [k for k, e in first["parameters"].items() if "spectral ratio" in e]
    headline = {name: measure(name, lambda r, name=name: r[name]) for name in HEADLINE[:3]}
    headline["feature movement"] = measure("feature movement",
                                           lambda r: sum(r["features"].values()) / max(len(r["features"]), 1))
    headline["spectral ratio"] = measure(
        "spectral ratio", lambda r: sum(r["parameters"][k]["spectral ratio"] for k in spectral) / max(len(spectral), 1))
    parameters = {
        name: {key: measure(key, lambda r, name=name, key=key: r["parameters"][name][key])
               for key in ("relative change", "RMS change", "spectral ratio") if key in entry}
        for name, entry in first["parameters"].items()
    }
    features = {name: measure(name, lambda r, name=name: r["features"][name]) for name in first["features"]}
    verdict = classify_program(fam.program, param, homogeneity=optimizer_homogeneity(rule))
    regime, contradictions = _judge(headline, verdict.regime)
    # reported next to the headline, not judged: the maximum over steps already speaks for the drift
    measures = {**headline, "final kernel drift": measure("final kernel drift", lambda r: r["final kernel drift"])}
    return ParamDiagnosis(param.name, rule.name, verdict.regime, tuple(widths), measures, parameters, features,
                          regime, contradictions)


def _check_targets(setup: Setup, param: Parametrization, width: int) -> None:
    """The loss accepts the model's outputs and the targets (checked once, at the smallest width)."""
    model, _ = instantiate_family(setup.fam, width=width, param=param, rule=setup.rule, lr=setup.lr)
    with torch.no_grad():
        out = model(*setup.inputs)
        if not torch.is_tensor(out):
            raise TplimitsError(f"diagnose needs a model whose output is a tensor, got {type(out).__name__}: wrap "
                                "the model so that its forward returns the tensor to train (e.g. the logits)")
        try:
            setup.loss(out, setup.targets)
        except (RuntimeError, ValueError, IndexError) as error:
            raise TplimitsError(f"the loss {setup.loss.name!r} cannot compare the model's outputs (shape "
                                f"{tuple(out.shape)}) with y (shape {tuple(setup.targets.shape)}): {error}") from None


def diagnose_family(fam: Family, inputs: tuple, targets: torch.Tensor, params: Sequence[Parametrization],
                    rule: UpdateRule, loss: Loss, widths: Sequence[int], seeds: int, steps: int, lr: float,
                    columns: int = 16, optimizer_options: dict[str, Any] | None = None,
                    progress: bool = False) -> Diagnosis:
    """Diagnose ``fam`` trained on ``inputs`` against ``targets`` under each parametrization at each width
    (see :func:`tplimits.diagnose`, which checks the arguments)."""
    setup = Setup(fam, inputs, targets, rule, loss, steps, lr, columns, dict(optimizer_options or {}))
    _check_targets(setup, params[0], min(widths))
    jobs = [(p, w, s) for p in params for w in widths for s in range(seeds)]
    bar = tqdm(total=len(jobs), disable=not progress, desc="diagnose", unit="run")
    runs: dict[str, list[tuple[int, dict[str, Any]]]] = {p.name: [] for p in params}
    for param, width, seed in jobs:
        bar.set_postfix_str(f"{param.name} n={width} seed={seed}")
        runs[param.name].append((width, _one_run(setup, param, width, seed)))
        bar.update()
    bar.close()
    return Diagnosis({p.name: _summarize(p, rule, fam, list(widths), runs[p.name]) for p in params})
