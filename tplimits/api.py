"""The public verbs. Each resolves names (architectures, parametrizations, optimizers, losses) to the
objects the pipeline works with, here and nowhere else, then calls the pipeline:

``lower`` → :mod:`tplimits.core`; ``instantiate``, ``classify``, ``coord_check`` → :mod:`tplimits.training`;
``derive`` → :mod:`tplimits.limit`; ``linearize``, ``diagnose`` → :mod:`tplimits.diagnostics`. They share
their argument order and defaults: the architecture first, then keyword-only ``param`` (default μP) and
``optimizer`` (default Adam); ``diagnose`` compares parametrizations (default NTP and μP) under SGD.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from tplimits.core.frontend import Architecture, ArchitectureLike, ExampleInputs, as_tuple, lower_architecture
from tplimits.core.program import Program
from tplimits.diagnostics.diagnose import Diagnosis, diagnose_family
from tplimits.diagnostics.linearize import LinearizedModel
from tplimits.diagnostics.linearize import linearize as _linearize
from tplimits.errors import NoWidthWarning, TplimitsError, check_count, check_real
from tplimits.limit import runs
from tplimits.limit.limit import Limit
from tplimits.optimizers.base import TplimitsOptimizer, UpdateRule
from tplimits.registry import manager as registry
from tplimits.training.classify import Verdict, classify_program, optimizer_homogeneity
from tplimits.training.coordcheck import CoordCheckReport, coord_check_family
from tplimits.training.family import Family, lower_family
from tplimits.training.instantiate import instantiate_family
from tplimits.training.loss import Loss
from tplimits.training.model import ParametrizedModel
from tplimits.training.parametrize import Parametrization

Arch = str | ArchitectureLike | Family
"""A registered architecture name, an :class:`Architecture`, a callable ``width -> nn.Module``, an
``nn.Module`` (with ``base=``), or a :class:`Family` lowered before."""
Rules = Mapping[str, str | UpdateRule]


def _architecture(arch: Arch) -> ArchitectureLike | Family:
    return registry.architecture(arch) if isinstance(arch, str) else arch


def _update_rules(arch: ArchitectureLike, extra: Rules | None) -> dict[str, UpdateRule]:
    """The non-gradient rules by parameter pattern: the architecture's own, then ``extra``."""
    own = arch.update_rules if isinstance(arch, Architecture) else {}
    return {pattern: registry.optimizer(rule) for pattern, rule in {**own, **_rules(extra)}.items()}


def _rules(update_rules: Any) -> dict[str, str | UpdateRule]:
    """``update_rules`` checked: a mapping from parameter-name patterns to rules (names or UpdateRules)."""
    if update_rules is None:
        return {}
    if not isinstance(update_rules, Mapping) or not all(isinstance(k, str) for k in update_rules):
        raise TplimitsError(f"update_rules must be a mapping {{parameter pattern: rule}}, e.g. "
                            f"{{'*.decorrelation': 'decorrelation'}}, got {update_rules!r}")
    return dict(update_rules)


def lower(arch: Arch, example_inputs: ExampleInputs = None, base: nn.Module | None = None, **config: Any) -> Program:
    """Trace ``arch`` at two widths and lower it to a Tensor Program.

    >>> import tplimits as tpl
    >>> prog = tpl.lower("mlp", depth=2, d_in=4, d_out=1)
    >>> prog.parameters["layers.1.weight"].kind
    'matrix'
    """
    arch = _architecture(arch)
    if isinstance(arch, Family):
        return arch.program
    program = lower_architecture(arch, registry.lowering_rules(), example_inputs, base, **config)
    if not program.scales_with_width():
        warnings.warn(NoWidthWarning(
            "nothing in this model scales with width: the two traces agree on every shape, so its Tensor Program "
            "(and its limit) is the model itself; pass the width to its layers (a callable `width -> nn.Module` "
            "that uses it, or `base=` with a module of another width)"), stacklevel=2)
    return program


def family(arch: Arch, example_inputs: ExampleInputs = None, base: nn.Module | None = None,
           update_rules: Rules | None = None, **config: Any) -> Family:
    """``arch`` lowered once, with how to build it at any width (a :class:`Family` passes through)."""
    arch = _architecture(arch)
    if isinstance(arch, Family):
        return arch
    return lower_family(arch, registry.lowering_rules(), example_inputs, base,
                        update_rules=_update_rules(arch, update_rules), **config)


def instantiate(arch: Arch, *, width: int, param: str | Parametrization = "muP", optimizer: str | UpdateRule = "adam",
                lr: float = 1e-2, seed: int = 0, example_inputs: ExampleInputs = None, base: nn.Module | None = None,
                center: bool = False, weight_decay: float | None = None, clip: float | None = None,
                optimizer_options: Mapping[str, Any] | None = None, update_rules: Rules | None = None,
                **config: Any) -> tuple[ParametrizedModel, TplimitsOptimizer]:
    """The architecture at ``width`` under ``param`` and the optimizer that trains it.

    ``update_rules`` (``{pattern: rule}``, added to the architecture's own) names parameters that a
    non-gradient rule updates instead of ``optimizer`` (decorrelation matrices): they keep their own
    initialization, their rule's rate is scaled by ``n^-r`` of the hidden role (1 under μP), and the
    returned optimizer records their layers' inputs.

    >>> model, opt = instantiate("mlp", width=64, param="muP", optimizer="sgd", lr=0.1)
    >>> type(model).__name__
    'ParametrizedModel'
    """
    check_count("width", width, 1)
    check_real("lr", lr, 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TplimitsError(f"seed must be an integer, got {seed!r}")
    if not isinstance(center, bool):
        raise TplimitsError(f"center must be True or False, got {center!r}")
    param, rule = registry.parametrization(param), registry.optimizer(optimizer)
    weight_decay = _weight_decay(rule, weight_decay)
    _check_update_options(weight_decay, clip, param)
    rule.hyper(optimizer_options)  # unknown or ill-typed hyperparameters fail here, before lowering
    fam = family(arch, example_inputs, base, **config)
    extra = {pattern: registry.optimizer(r) for pattern, r in _rules(update_rules).items()}
    return instantiate_family(fam, width=width, param=param, rule=rule, lr=lr, seed=seed, center=center,
                              weight_decay=weight_decay, clip=clip, optimizer_options=optimizer_options,
                              update_rules=extra)


def classify(arch: Arch | Program, *, param: str | Parametrization = "muP", optimizer: str | UpdateRule = "adam",
             example_inputs: ExampleInputs = None, base: nn.Module | None = None, **config: Any) -> Verdict:
    """The classification of training ``arch`` under ``param`` with ``optimizer`` (Sec. 2.8).

    >>> classify("mlp", param="muP", optimizer="sgd").regime
    'feature learning'
    """
    program = arch if isinstance(arch, Program) else lower(arch, example_inputs, base, **config)
    rule = registry.optimizer(optimizer)
    return classify_program(program, registry.parametrization(param), homogeneity=optimizer_homogeneity(rule))


def coord_check(arch: Arch, *, params: Sequence[str | Parametrization] = ("SP", "NTP", "muP"),
                optimizer: str | UpdateRule = "sgd", loss: str | Loss | Callable = "mse",
                widths: Sequence[int] = (128, 256, 512, 1024, 2048), steps: int = 3, lr: float = 0.1,
                seeds: int = 2, example_inputs: ExampleInputs = None, base: nn.Module | None = None,
                tolerance: float = 0.1, **config: Any) -> CoordCheckReport:
    """Train ``arch`` under each parametrization at each width and report how every value scales, against
    the slope each parametrization's classification predicts (:mod:`tplimits.training.coordcheck`)."""
    _check_coord_check(params, widths, steps, lr, seeds, tolerance)
    resolved = _architecture(arch)
    inputs = example_inputs
    if inputs is None:
        if not isinstance(resolved, Architecture):
            raise TplimitsError("coord_check of a model that is not a registered architecture needs "
                                "`example_inputs=`")
        inputs = resolved.example_inputs(**config)
    fam = family(resolved, example_inputs, base, **config)
    return coord_check_family(fam, as_tuple(inputs), [registry.parametrization(p) for p in params],
                              registry.optimizer(optimizer), registry.loss(loss), widths, steps, lr, seeds, tolerance)


def _weight_decay(rule: UpdateRule, weight_decay: Any) -> Any:
    """``weight_decay``, or where it is ``None`` the rule's own default (``adamw``'s 1e-5; else 0): an
    explicit 0 must not be needed to get the rule the user named."""
    return rule.option_defaults.get("weight_decay", 0.0) if weight_decay is None else weight_decay


def _check_update_options(weight_decay: Any, clip: Any, param: Parametrization) -> None:
    """The options every update shares (Eq. 2.50's decoupled λ, Eq. 2.54's threshold θ)."""
    check_real("weight_decay", weight_decay, 0)
    if weight_decay > 1:
        raise TplimitsError(f"weight_decay is the decoupled lambda of Eq. 2.50, in [0, 1]; got {weight_decay!r}")
    if clip is not None:
        check_real("clip", clip, 0)
        if clip == 0:
            raise TplimitsError("clip (the threshold theta of Eq. 2.54) must be > 0, or None for no clipping")
        if param.update == "plain":  # Eq. 2.54 divides normalized updates by min(‖Q‖, θ·n^e); plain ones have no ν
            raise TplimitsError(f"clip={clip!r} (the threshold theta of Eq. 2.54) acts on normalized updates, and "
                                f"param {param.name!r} has plain ones: choose a parametrization with normalized "
                                "updates (e.g. 'muP-normalized', 'NTP-normalized'), or pass clip=None")


def _check_coord_check(params: Any, widths: Any, steps: Any, lr: Any, seeds: Any, tolerance: Any) -> None:
    """coord_check's own arguments, before anything is lowered or trained."""
    if not isinstance(params, Sequence) or isinstance(params, str) or not params:
        raise TplimitsError(f"params must be a non-empty sequence of parametrizations (e.g. ['SP', 'muP']), got "
                            f"{params!r}")
    if (not isinstance(widths, Sequence) or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths)
            or len(set(widths)) < 2):
        shown = list(widths) if isinstance(widths, Sequence) else widths
        raise TplimitsError(f"widths={shown!r}: a coordinate check fits slopes over at least two distinct "
                            "positive integer widths")
    check_count("steps", steps, 1)
    check_count("seeds", seeds, 1)
    check_real("lr", lr, 0)
    check_real("tolerance", tolerance, 0)


def derive(arch: Arch, *, param: str | Parametrization = "muP", optimizer: str | UpdateRule = "adam",
           example_inputs: ExampleInputs = None, base: nn.Module | None = None, weight_decay: float | None = None,
           clip: float | None = None, optimizer_options: Mapping[str, Any] | None = None,
           update_rules: Rules | None = None, **config: Any) -> Limit:
    """The μ-limit of training ``arch`` (any form :func:`lower` accepts) with ``optimizer`` under ``param``.

    ``weight_decay`` is the decoupled λ of Eq. 2.50 (``None``: the rule's own default, 1e-5 for ``adamw``,
    else 0), ``optimizer_options`` the update rule's
    hyperparameters (e.g. ``{"eps": 1e-8}``), ``update_rules`` extra non-gradient rules by parameter
    pattern, exactly as for :func:`instantiate`.
    """
    rule, parametrization = registry.optimizer(optimizer), registry.parametrization(param)
    weight_decay = _weight_decay(rule, weight_decay)
    _check_update_options(weight_decay, clip, parametrization)
    rule.hyper(optimizer_options)  # unknown or ill-typed hyperparameters fail here, not after lowering
    resolved = _architecture(arch)
    if isinstance(resolved, Family):
        raise TplimitsError("derive takes an architecture (name, callable or module), not a lowered Family: the "
                            "limit lowers it again for each set of inputs")
    return Limit(arch=resolved, lowering_rules=registry.lowering_rules(), param=parametrization,
                 rule=rule, config=dict(config), example_inputs=example_inputs, base=base, weight_decay=weight_decay,
                 clip=clip, optimizer_options=dict(optimizer_options or {}),
                 update_rules=_update_rules(resolved, update_rules))


def make_optimizer(rule: str | UpdateRule, params: Iterable[torch.Tensor | dict[str, Any]], *, lr: float,
                   **options: Any) -> TplimitsOptimizer:
    """A :class:`TplimitsOptimizer` for ``rule`` (an :class:`UpdateRule` or a registered name).

    ``params`` are parameters or param groups; ``options`` are the group options
    (``GROUP_OPTIONS``) and the rule's hyperparameters, e.g.
    ``make_optimizer("adam", model.parameters(), lr=1e-3, betas=(0.9, 0.99))``.
    """
    return TplimitsOptimizer(params, registry.optimizer(rule), lr=lr, **options)


def linearize(model: nn.Module) -> LinearizedModel:
    """The first-order Taylor model of ``model`` in its trainable parameters around their current values, an
    ``nn.Module`` whose parameters are the displacements; ``lin.optimizer_like(opt)`` trains it with the
    param groups of ``opt`` (the optimizer :func:`instantiate` returned): one loop, two models.

    >>> model, opt = instantiate("mlp", width=32, param="NTP", optimizer="sgd", d_in=3, d_out=1)
    >>> lin = linearize(model)
    >>> x = torch.randn(4, 3)
    >>> bool(torch.allclose(lin(x), model(x)))
    True
    """
    return _linearize(model)


def diagnose(arch: Arch, X: Any, y: Any, *,
             param: str | Parametrization | Sequence[str | Parametrization] = ("NTP", "muP"),
             optimizer: str | UpdateRule = "sgd", widths: Sequence[int] = (64, 256, 1024), seeds: int = 2,
             steps: int = 5, lr: float = 0.5, loss: str | Loss | Callable = "mse", example_inputs: ExampleInputs = None,
             base: nn.Module | None = None, optimizer_options: Mapping[str, Any] | None = None, columns: int = 16,
             limit: bool = False, progress: bool = False, **config: Any) -> Diagnosis:
    """Lazy or rich: train ``arch`` under each parametrization of ``param`` at each width (``seeds`` runs,
    ``steps`` full-batch steps on ``X``, ``y``) next to its linearization, and report the linearization
    gap, kernel drift, weak correlation, feature movement and spectral ratios with their fitted width
    exponents and a verdict (:mod:`tplimits.diagnostics.diagnose`). ``X`` is the model's one input
    (``example_inputs`` defaults to ``(X,)``); ``columns`` is the number of NTK columns computed at once.
    With ``limit=True``, each parametrization in the NT regime is also checked against its NT limit
    (:meth:`Limit.check` at the same widths, seeds, steps and lr, on ``f − f₀``: under NTP ``f₀`` is a
    random Θ(1) function the limit does not follow): the distance of the width-n trajectory to the
    limit's, next to the linearization gap."""
    params = [param] if isinstance(param, str | Parametrization) else param
    if not isinstance(params, Sequence) or not params:
        raise TplimitsError(f"param must be a parametrization or a non-empty sequence of them, got {param!r}")
    _check_coord_check(list(params), widths, steps, lr, seeds, 0.0)
    check_count("columns", columns, 1)
    X, y = runs.data("X", X), runs.data("y", y)
    resolved_params = [registry.parametrization(p) for p in params]
    names = [p.name for p in resolved_params]
    if len(set(names)) != len(names):
        raise TplimitsError(f"param lists a parametrization twice: {names}")
    rule, loss_fn = registry.optimizer(optimizer), registry.loss(loss)
    rule.hyper(optimizer_options)
    if rule.needs_activations:
        raise TplimitsError(f"optimizer {rule.name!r} is driven by layer inputs; a linearized model has none. "
                            "Diagnose a gradient-based optimizer.")
    inputs = as_tuple(example_inputs) if example_inputs is not None else (X,)
    fam = family(arch, inputs, base, **config)
    runs.Examples.of(fam.program).matched(X, y)  # along the batch axes the program records (sequence-first data)
    report = diagnose_family(fam, (X,), y, resolved_params, rule, loss_fn, list(widths), seeds, steps, lr, columns,
                             dict(optimizer_options or {}), progress)
    if not limit:
        return report
    results = dict(report.results)
    for p in resolved_params:
        if results[p.name].predicted == "operator":  # the regime whose limit is the NT limit
            nt = derive(arch, param=p, optimizer=rule, example_inputs=example_inputs, base=base,
                        optimizer_options=optimizer_options, **config)
            check = nt.check(X, y, widths=list(widths), seeds=max(seeds, 2), steps=steps, lr=lr, loss=loss_fn,
                             progress=progress, center=True)
            results[p.name] = attrs.evolve(results[p.name], limit_check=check)
    return Diagnosis(results)
