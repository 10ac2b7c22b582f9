"""``tpl.derive``: the μ-limit of training an architecture, as an object that trains and checks itself.

>>> import torch, tplimits as tpl
>>> limit = tpl.derive("mlp", optimizer="sgd", param="muP", depth=2, d_in=4)
>>> X, y = torch.randn(3, 4), torch.randn(3, 1)
>>> traj = limit.train(X, y, steps=2, lr=0.5, particles=2**10, batches=2, progress=False)
>>> tuple(traj.outputs.shape)
(3, 3, 1)
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch
from tqdm.auto import tqdm

from tplimits.core.backprop import total_program
from tplimits.core.instantiate import Family, family, parametrized_program, rule_assignment
from tplimits.core.parametrize import Parametrization, classify_program, optimizer_homogeneity, parameter_roles
from tplimits.core.program import MatMul, Width, fn_name, width_axes
from tplimits.errors import TplimitsError
from tplimits.limit.engine import LimitSetup, ParticleNetwork, initial_values, standard_error
from tplimits.optimizers.base import UpdateRule
from tplimits.plugins.manager import loss as lookup_loss
from tplimits.plugins.manager import parametrization

DOTS = ("auto", "autograd", "stein")
NON_SMOOTH = ("relu", "hardtanh", "clamp", "abs", "sign", "threshold", "max", "min", "leaky", "hardswish",
              "hardsigmoid", "where", "floor", "round")
"""Functions whose derivative jumps: autograd sees no change of ψ' across the kink, while the dot-ket's
expected derivative has a point mass there (Stein's formula keeps it)."""
AUTOGRAD_MAX_COMPONENTS = 4  # autograd dots cost one backward pass per component of a matrix's input


@attrs.frozen
class Trajectory:
    """The limit's training run: every number with its Monte Carlo standard error.

    ``outputs[t]`` are the outputs on the training inputs before update ``t`` (``t = 0`` is the
    initialization, ``t = steps`` after the last update); ``loss[t]`` the loss on all training
    inputs; ``test_outputs`` the same on ``X_test`` (carried with zero error signal); ``kernels``
    the feature kernels ``⟨x|x⟩`` of the requested program values, ``[steps+1, K, K]`` over their
    ``K`` components. Standard errors come from ``batches`` independent particle systems.
    """

    outputs: torch.Tensor
    outputs_se: torch.Tensor
    loss: torch.Tensor
    loss_se: torch.Tensor
    test_outputs: torch.Tensor | None
    test_outputs_se: torch.Tensor | None
    kernels: Mapping[str, torch.Tensor]
    kernels_se: Mapping[str, torch.Tensor]
    particles: int
    batches: int
    dots: str
    seconds: float

    @property
    def steps(self) -> int:
        return self.outputs.shape[0] - 1


def batch_schedule(n_train: int, batch_size: int | None, steps: int, seed: int) -> list[torch.Tensor]:
    """The rows trained on at each step: all of them (``batch_size=None``), or consecutive batches of
    a fresh random permutation per epoch (the last, smaller batch of an epoch included)."""
    everything = torch.arange(n_train)
    if batch_size is None or batch_size >= n_train:
        return [everything] * steps
    if batch_size < 1:
        raise TplimitsError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    schedule: list[torch.Tensor] = []
    while len(schedule) < steps:
        schedule.extend(torch.randperm(n_train, generator=generator).split(batch_size))
    return schedule[:steps]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` for the duration of the block."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@attrs.define
class Limit:
    """The μ-limit (Thm 2.9.25 / 2.9.30) of training ``arch`` under ``param`` with ``optimizer``."""

    arch: Any
    param: Parametrization
    optimizer: str | UpdateRule
    rule: UpdateRule
    config: Mapping[str, Any]
    example_inputs: Any = None
    base: Any = None
    weight_decay: float = 0.0
    clip: float | None = None
    optimizer_options: Mapping[str, Any] = attrs.field(factory=dict)
    update_rules: Mapping[str, str] = attrs.field(factory=dict)
    _families: dict = attrs.field(factory=dict, repr=False)
    _setups: dict = attrs.field(factory=dict, repr=False)

    # -- the program for a given set of inputs ---------------------------------------------
    def family(self, inputs: torch.Tensor | None = None) -> Family:
        """The architecture lowered for ``inputs`` (programs are specialised to their batch size)."""
        key = None if inputs is None else (tuple(inputs.shape), inputs.dtype)
        if key not in self._families:
            example = self.example_inputs if inputs is None else (inputs,)
            self._families[key] = family(self.arch, example, self.base, **dict(self.config))
        return self._families[key]

    def setup(self, inputs: torch.Tensor | None = None) -> LimitSetup:
        key = None if inputs is None else (tuple(inputs.shape), inputs.dtype)
        if key in self._setups:
            return self._setups[key]
        fam = self.family(inputs)
        verdict = classify_program(fam.program, self.param, homogeneity=optimizer_homogeneity(self.rule))
        if verdict.regime != "feature learning" or not (verdict.stable and verdict.faithful):
            raise TplimitsError(
                f"tpl.derive computes the μ-limit (every layer updated maximally, Thm 2.9.25); {self.param.name} "
                f"with {self.rule.name} is {verdict.regime} (r = {verdict.r}), stable {verdict.stable}, faithful "
                f"{verdict.faithful}. Use param='muP' (or a μP variant).\n{verdict}")
        program = parametrized_program(fam.program, self.param)
        rules = rule_assignment(program, {**fam.update_rules, **dict(self.update_rules)})
        roles = parameter_roles(program)
        chosen = {name: self.param.for_parameter(name, role) for name, role in roles.items() if name not in rules}
        reference = fam.model(fam.program.width, seed=0)
        setup = LimitSetup(
            total=total_program(program),
            param=self.param,
            chosen=chosen,
            rules=rules,
            initial=initial_values(program, reference),
            rule=self.rule,
            hyper=dict(self.optimizer_options),
            weight_decay=self.weight_decay,
            clip=self.clip,
        )
        self._setups[key] = setup
        return setup

    # -- training ------------------------------------------------------------------------------
    def train(self, X: torch.Tensor, y: torch.Tensor, steps: int = 50, lr: float = 0.1, loss: Any = "mse",
              batch_size: int | None = None, X_test: torch.Tensor | None = None, particles: int = 2**14,
              seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64,
              batches: int = 4, dots: str = "auto", kernels: Sequence[str] = (), checkpoint: str | None = None,
              checkpoint_every: int = 10, progress: bool = True) -> Trajectory:
        """Train the limit on ``(X, y)`` for ``steps`` updates at learning rate ``lr`` (the same ``lr`` as
        ``tpl.instantiate(..., lr=lr)``), with ``particles`` particles split into ``batches``
        independent systems (for the standard errors).

        ``dots``: ``"autograd"`` (per-particle derivatives; linear update rules only), ``"stein"``
        (Gaussian integration by parts; any rule, no autograd graph) or ``"auto"`` (autograd where it
        applies and is affordable). ``checkpoint``: a file the run is saved to every
        ``checkpoint_every`` steps and resumed from if it exists (``stein`` dots only: an autograd
        graph cannot be saved).
        """
        loss_fn = lookup_loss(loss)
        X = torch.as_tensor(X)
        y = torch.as_tensor(y)
        if len(y) != len(X):
            raise TplimitsError(f"X has {len(X)} rows but y has {len(y)}")
        n_train = len(X)
        Z = X if X_test is None else torch.cat([X, torch.as_tensor(X_test).to(X.dtype)])
        lowering_inputs = Z.to(torch.get_default_dtype()) if Z.is_floating_point() else Z
        setup = self.setup(lowering_inputs)
        dots = self._resolve_dots(dots, setup)
        if batches < 1 or particles % batches:
            raise TplimitsError(f"particles ({particles}) must be a positive multiple of batches ({batches})")
        per_batch = particles // batches
        _check_particles(setup, per_batch)
        if checkpoint is not None and dots == "autograd":
            raise TplimitsError("checkpoints need dots='stein': an autograd graph over the training history "
                                "cannot be saved")
        schedule = batch_schedule(n_train, batch_size, steps, seed)
        start = time.perf_counter()
        saved = _load_checkpoint(checkpoint, steps, particles, batches, seed)
        finished: list[dict[str, list]] = saved["finished"] if saved else []
        bar = tqdm(total=batches * (steps + 1), disable=not progress, desc="μ-limit", unit="step")
        bar.update(len(finished) * (steps + 1))
        for b in range(len(finished), batches):
            net = ParticleNetwork(setup, per_batch, seed * 1_000_003 + b, dtype, device, dots, lr, steps)
            record: dict[str, list] = {"outputs": [], "kernels": {k: [] for k in kernels}}
            if saved and saved.get("current") is not None:
                net.load_state_dict(saved["current"]["net"])
                record = saved["current"]["record"]
                bar.update(len(record["outputs"]))
                saved["current"] = None
            for t in range(len(record["outputs"]), steps + 1):
                interp = net.forward((Z,))
                out = net.outputs(interp)
                record["outputs"].append(out.cpu())
                for name in kernels:
                    record["kernels"][name].append(_kernel(setup, interp, name).cpu())
                if t < steps:
                    chi = loss_fn.error_signal(out, y.to(device=out.device), schedule[t].to(out.device))
                    net.backward_and_update(interp, chi)
                    if checkpoint is not None and (t + 1) % checkpoint_every == 0:
                        _save_checkpoint(checkpoint, steps, particles, batches, seed, finished,
                                         {"net": net.state_dict(), "record": record})
                del interp
                bar.update(1)
            finished.append(record)
            if checkpoint is not None:
                _save_checkpoint(checkpoint, steps, particles, batches, seed, finished, None)
        bar.close()
        outs = torch.stack([torch.stack(r["outputs"]) for r in finished])  # [batches, steps+1, M, ...]
        y_cpu = y.to(outs.dtype) if y.is_floating_point() else y
        train_outs = outs[:, :, :n_train]
        losses = torch.stack([torch.stack([loss_fn(o, y_cpu) for o in r]) for r in train_outs])
        mean = train_outs.mean(0)
        kernel_means = {k: torch.stack([torch.stack(r["kernels"][k]) for r in finished]) for k in kernels}
        return Trajectory(
            outputs=mean,
            outputs_se=standard_error(train_outs),
            loss=torch.stack([loss_fn(o, y_cpu) for o in mean]),
            loss_se=standard_error(losses),
            test_outputs=None if X_test is None else outs[:, :, n_train:].mean(0),
            test_outputs_se=None if X_test is None else standard_error(outs[:, :, n_train:]),
            kernels={k: v.mean(0) for k, v in kernel_means.items()},
            kernels_se={k: standard_error(v) for k, v in kernel_means.items()},
            particles=particles,
            batches=batches,
            dots=dots,
            seconds=time.perf_counter() - start,
        )

    def _resolve_dots(self, dots: str, setup: LimitSetup) -> str:
        if dots not in DOTS:
            raise TplimitsError(f"dots must be one of {DOTS}, got {dots!r}")
        linear = self.rule.linear and self.param.update == "plain" and self.clip is None
        if dots == "autograd" and not linear:
            raise TplimitsError(
                f"dots='autograd' needs a linear update rule with plain updates; {self.rule.name} keeps a dense "
                "[P, P] grid of Q values whose dependence on each particle is not tracked. Use dots='stein'.")
        kinks = _non_smooth(setup)
        if dots == "autograd" and kinks:
            raise TplimitsError(
                f"dots='autograd' differentiates every function of the program, but {kinks[0]} has a derivative "
                "that jumps (its second derivative is a point mass autograd does not see); use dots='stein'")
        if dots != "auto":
            return dots
        cheap = _components(setup) <= AUTOGRAD_MAX_COMPONENTS
        return "autograd" if linear and cheap and not kinks else "stein"

    def check(self, X: torch.Tensor, y: torch.Tensor, widths: Sequence[int] = (128, 512, 2048), seeds: int = 8,
              steps: int = 50, lr: float = 0.1, **options: Any) -> Any:
        """Train finite-width models at ``widths`` (``seeds`` each) exactly as :meth:`train` trains the
        limit and compare; see :func:`tplimits.limit.check.check`."""
        from tplimits.limit.check import check

        return check(self, X, y, widths=widths, seeds=seeds, steps=steps, lr=lr, **options)


def _components(setup: LimitSetup) -> int:
    """The largest number of components (times fixed matrix axes) any matrix is applied to at once."""
    program = setup.program
    worst = 1
    for ins in program.instructions:
        if isinstance(ins, MatMul):
            layout = program[ins.vector].layout
            count = 1
            for spec in layout:
                if not isinstance(spec, Width):
                    count *= spec
            matrix = program[ins.matrix].layout
            for spec in matrix:
                if not isinstance(spec, Width):
                    count *= spec
            worst = max(worst, count)
    return worst


def _non_smooth(setup: LimitSetup) -> list[str]:
    """The program's instructions (forward and backward) whose function is not smooth."""
    found = []
    for ins in setup.program.instructions:
        fn = getattr(ins, "fn", None)
        if fn is not None and any(word in fn_name(fn).lower() for word in NON_SMOOTH):
            found.append(f"%{ins.name} ({fn_name(fn)})")
    return found


def _check_particles(setup: LimitSetup, per_batch: int) -> None:
    for ins in setup.program.instructions:
        for spec in getattr(ins, "layout", ()):
            if isinstance(spec, Width) and (spec.ratio * per_batch).denominator != 1:
                raise TplimitsError(f"%{ins.name} has a width axis of ratio {spec.ratio}: particles per batch "
                                    f"({per_batch}) must make it whole")
    if per_batch < 16:
        raise TplimitsError(f"{per_batch} particles per batch is too few for a Monte Carlo limit")


def _kernel(setup: LimitSetup, interp: Any, name: str) -> torch.Tensor:
    """``⟨x|x⟩`` of program value ``name`` over its components: [K, K]."""
    if name not in interp.values:
        raise TplimitsError(f"no program value %{name}; see `tpl.lower(...).format()` for the names")
    layout = setup.program[name].layout
    axes = width_axes(layout)
    if len(axes) != 1:
        raise TplimitsError(f"%{name} is not a vector (one width axis); it has layout {layout}")
    x = interp.values[name].detach()
    x = x.movedim(axes[0], -1)
    x = x.reshape(-1, x.shape[-1])
    return x @ x.T / x.shape[-1]


def _fingerprint(steps: int, particles: int, batches: int, seed: int) -> dict:
    return {"steps": steps, "particles": particles, "batches": batches, "seed": seed}


def _save_checkpoint(path: str, steps: int, particles: int, batches: int, seed: int, finished: list,
                     current: dict | None) -> None:
    tmp = f"{path}.tmp"
    torch.save({"config": _fingerprint(steps, particles, batches, seed), "finished": finished, "current": current},
               tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: str | None, steps: int, particles: int, batches: int, seed: int) -> dict | None:
    if path is None or not os.path.exists(path):
        return None
    saved = torch.load(path, weights_only=False)
    if saved["config"] != _fingerprint(steps, particles, batches, seed):
        raise TplimitsError(f"checkpoint {path!r} is of another run ({saved['config']}); remove it or pass the "
                            "same steps / particles / batches / seed")
    return saved


def derive(arch: Any, optimizer: Any = "adam", param: Any = "muP", example_inputs: Any = None, base: Any = None,
           *, weight_decay: float = 0.0, clip: float | None = None, optimizer_options: Mapping | None = None,
           update_rules: Mapping[str, str] | None = None, **config: Any) -> Limit:
    """The μ-limit of training ``arch`` (any form ``tpl.lower`` accepts) with ``optimizer`` under ``param``.

    ``weight_decay`` is the decoupled λ of Eq. 2.50, ``optimizer_options`` the update rule's
    hyperparameters (e.g. ``{"eps": 1e-8}``), ``update_rules`` extra non-gradient rules by parameter
    pattern, exactly as for :func:`tplimits.instantiate`.
    """
    from tplimits.optimizers import optimizer as lookup_rule

    rule = lookup_rule(optimizer) if isinstance(optimizer, str) else optimizer
    if not isinstance(rule, UpdateRule):
        raise TplimitsError(f"optimizer must be a registered name or an UpdateRule, got {type(optimizer).__name__}")
    rule.hyper(optimizer_options)  # unknown hyperparameters fail here, not after lowering
    limit = Limit(arch=arch, param=parametrization(param), optimizer=optimizer, rule=rule, config=dict(config),
                  example_inputs=example_inputs, base=base, weight_decay=weight_decay, clip=clip,
                  optimizer_options=dict(optimizer_options or {}), update_rules=dict(update_rules or {}))
    return limit
