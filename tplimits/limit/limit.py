"""The μ-limit of training an architecture, as an object that trains and checks itself
(``tpl.derive`` builds it).

>>> import torch, tplimits as tpl
>>> limit = tpl.derive("mlp", optimizer="sgd", param="muP", depth=2, d_in=4)
>>> X, y = torch.randn(3, 4), torch.randn(3, 1)
>>> traj = limit.train(X, y, steps=2, lr=0.5, particles=2**10, batches=2, progress=False)
>>> tuple(traj.outputs.shape)
(3, 3, 1)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
import pickle
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch
from tqdm.auto import tqdm

from tplimits.core.backprop import total_program
from tplimits.core.frontend import ArchitectureLike, ExampleInputs
from tplimits.core.ir import MatMul, Nonlin, Width, concrete_shape, fn_name, width_axes
from tplimits.core.program import Program
from tplimits.errors import CheckpointError, Diverged, TplimitsError
from tplimits.limit import check as checking
from tplimits.limit.mu import LimitSetup, ParticleNetwork, initial_values
from tplimits.limit.runs import batch_schedule, blown_up, digest, explosion_bound, standard_error
from tplimits.optimizers.base import UpdateRule
from tplimits.registry.manager import loss as lookup_loss
from tplimits.training.classify import bottleneck_message, bottlenecks, classify_program, optimizer_homogeneity
from tplimits.training.family import Family, lower_family
from tplimits.training.loss import Loss
from tplimits.training.model import parametrized_program
from tplimits.training.optim import rule_assignment
from tplimits.training.parametrize import Parametrization, parameter_roles

DOTS = ("auto", "autograd", "stein")
AUTOGRAD_MAX_COMPONENTS = 4  # autograd dots cost one backward pass per component of a matrix's input


@attrs.frozen
class Trajectory:
    """The limit's training run: every number with its Monte Carlo standard error.

    ``outputs[t]`` are the outputs on the training inputs before update ``t`` (``t = 0`` is the
    initialization, ``t = steps`` after the last update); ``loss[t]`` the loss on all training
    inputs; ``test_outputs`` the same on ``X_test`` (carried with zero error signal); ``kernels``
    the feature kernels ``⟨x|x⟩`` of the requested program values, ``[steps+1, K, K]`` over their
    ``K`` components. Standard errors come from ``batches`` independent particle systems (NaN with one
    system: there is none). ``identity`` records everything that determined the run (as a checkpoint does).
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
    identity: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def steps(self) -> int:
        return self.outputs.shape[0] - 1


@attrs.frozen
class _Run:
    """One call of :meth:`Limit.train`, its arguments checked and converted."""

    X: torch.Tensor
    y: torch.Tensor
    Z: torch.Tensor  # training rows, then test rows
    n_train: int
    steps: int
    lr: float
    loss: Loss
    schedule: list[torch.Tensor]
    particles: int
    batches: int
    seed: int
    dtype: torch.dtype
    device: torch.device
    dots: str
    kernels: tuple[str, ...]
    tested: bool  # X_test given: its rows follow the training rows in Z
    bound: float  # the outputs' RMS beyond which the run counts as diverged

    @property
    def per_batch(self) -> int:
        return self.particles // self.batches


@attrs.define
class Limit:
    """The μ-limit (Thm 2.9.25 / 2.9.30) of training ``arch`` under ``param`` with ``rule``.

    ``arch`` is resolved (an Architecture, a callable ``width -> nn.Module`` or a module with ``base``),
    ``lowering_rules`` the ops' rules, ``update_rules`` the non-gradient rules by parameter pattern.
    """

    arch: ArchitectureLike
    lowering_rules: Mapping[Any, Callable]
    param: Parametrization
    rule: UpdateRule
    config: Mapping[str, Any]
    example_inputs: ExampleInputs = None
    base: torch.nn.Module | None = None
    weight_decay: float = 0.0
    clip: float | None = None
    optimizer_options: Mapping[str, Any] = attrs.field(factory=dict)
    update_rules: Mapping[str, UpdateRule] = attrs.field(factory=dict)
    _families: dict = attrs.field(factory=dict, repr=False)
    _setups: dict = attrs.field(factory=dict, repr=False)

    # -- the program for a given set of inputs ---------------------------------------------
    def family(self, inputs: torch.Tensor | None = None) -> Family:
        """The architecture lowered for ``inputs`` (programs are specialised to their batch size)."""
        key = None if inputs is None else (tuple(inputs.shape), inputs.dtype)
        if key not in self._families:
            example = self.example_inputs if inputs is None else (inputs,)
            self._families[key] = lower_family(self.arch, self.lowering_rules, example, self.base,
                                               update_rules=self.update_rules, **dict(self.config))
        return self._families[key]

    def setup(self, inputs: torch.Tensor | None = None) -> LimitSetup:
        """Everything the particle systems need for ``inputs``, after checking the regime."""
        key = None if inputs is None else (tuple(inputs.shape), inputs.dtype)
        if key in self._setups:
            return self._setups[key]
        fam = self.family(inputs)
        verdict = classify_program(fam.program, self.param, homogeneity=optimizer_homogeneity(self.rule))
        if verdict.regime != "feature learning" or not (verdict.stable and verdict.faithful):
            raise TplimitsError(
                f"tpl.derive computes the μ-limit (every layer updated maximally, Thm 2.9.25); {self.param.name} "
                f"with {self.rule.name} is {verdict.regime} (r = {verdict.r}), stable {verdict.stable}, faithful "
                f"{verdict.faithful}. Use a parametrization in the feature learning regime (μP or a μP variant)."
                f"\n{verdict}")
        _refuse_random_sums(fam.program, self.param)
        program = parametrized_program(fam.program, self.param)
        rules = rule_assignment(program, fam.update_rules)
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
    def train(self, X: torch.Tensor, y: torch.Tensor, steps: int = 50, lr: float = 0.1,
              loss: str | Loss | Callable = "mse", batch_size: int | None = None, X_test: torch.Tensor | None = None,
              particles: int = 2**14, seed: int = 0, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float64, batches: int = 4, dots: str = "auto", kernels: Sequence[str] = (),
              checkpoint: str | None = None, checkpoint_every: int = 10, progress: bool = True) -> Trajectory:
        """Train the limit on ``(X, y)`` for ``steps`` updates at learning rate ``lr`` (the same ``lr`` as
        ``tpl.instantiate(..., lr=lr)``), with ``particles`` particles split into ``batches``
        independent systems (for the standard errors).

        ``dots``: ``"autograd"`` (per-particle derivatives; linear update rules only), ``"stein"``
        (Gaussian integration by parts; any rule, no autograd graph) or ``"auto"`` (autograd where it
        applies and is affordable). ``checkpoint``: a file the run is saved to every
        ``checkpoint_every`` steps and resumed from if it exists (``stein`` dots only: an autograd
        graph cannot be saved).
        """
        run, setup = self._prepare(X, y, X_test, steps, lr, loss, batch_size, particles, seed, device, dtype,
                                   batches, dots, kernels, checkpoint, checkpoint_every)
        start = time.perf_counter()
        identity = self._identity(run, setup)
        saved = _load_checkpoint(checkpoint, identity)
        finished: list[dict[str, list]] = saved["finished"] if saved else []
        bar = tqdm(total=batches * (steps + 1), disable=not progress, desc="μ-limit", unit="step")
        bar.update(len(finished) * (steps + 1))
        for b in range(len(finished), batches):
            current = saved.pop("current", None) if saved else None
            finished.append(self._train_system(setup, run, b, current, bar, (checkpoint, checkpoint_every, identity),
                                               finished))
            if checkpoint is not None:
                _save_checkpoint(checkpoint, identity, finished, None)
        bar.close()
        return attrs.evolve(_trajectory(run, finished, time.perf_counter() - start), identity=identity)

    def _prepare(self, X: Any, y: Any, X_test: Any, steps: int, lr: float, loss: Any, batch_size: int | None,
                 particles: int, seed: int, device: Any, dtype: torch.dtype, batches: int, dots: str,
                 kernels: Sequence[str], checkpoint: str | None, checkpoint_every: int) -> tuple[_Run, LimitSetup]:
        """Every argument checked (before any lowering or training), converted, and the setup for the inputs."""
        loss_fn = lookup_loss(loss)
        _check_numbers(steps=steps, lr=lr, batch_size=batch_size, particles=particles, batches=batches, seed=seed,
                       checkpoint_every=checkpoint_every)
        _check_dtype_device(dtype, device)
        X, y = _data("X", X), _data("y", y)
        if len(y) != len(X):
            raise TplimitsError(f"X has {len(X)} rows but y has {len(y)}")
        Z = X
        if X_test is not None:
            X_test = _data("X_test", X_test)
            if X_test.shape[1:] != X.shape[1:]:
                raise TplimitsError(f"X_test has rows of shape {tuple(X_test.shape[1:])}, X of {tuple(X.shape[1:])}")
            Z = torch.cat([X, X_test.to(X.dtype)])
        setup = self.setup(Z.to(torch.get_default_dtype()) if Z.is_floating_point() else Z)
        dots = self._resolve_dots(dots, setup)
        if batches < 1 or particles % batches:
            raise TplimitsError(f"particles ({particles}) must be a positive multiple of batches ({batches})")
        _check_particles(setup, particles // batches)
        self._check_memory(setup, particles, batches, dtype, torch.device(device))
        if checkpoint is not None and dots == "autograd":
            raise TplimitsError("checkpoints need dots='stein': an autograd graph over the training history "
                                "cannot be saved")
        if checkpoint is not None and not os.path.isdir(os.path.dirname(os.path.abspath(checkpoint))):
            raise TplimitsError(f"checkpoint={checkpoint!r}: its directory does not exist; create it first")
        schedule = batch_schedule(len(X), batch_size, steps, seed)
        run = _Run(X, y, Z, len(X), steps, lr, loss_fn, schedule, particles, batches, seed, dtype, torch.device(device),
                   dots, tuple(kernels), X_test is not None, explosion_bound(y))
        return run, setup

    def _train_system(self, setup: LimitSetup, run: _Run, b: int, current: dict | None, bar: Any,
                      saving: tuple[str | None, int, dict], finished: list) -> dict[str, list]:
        """Train independent system ``b`` (resuming from ``current``), recording outputs and kernels;
        ``saving`` is (checkpoint path, every how many steps, the run's identity)."""
        checkpoint, checkpoint_every, identity = saving
        net = ParticleNetwork(setup, run.per_batch, run.seed * 1_000_003 + b, run.dtype, run.device, run.dots,
                              run.lr, run.steps)
        record: dict[str, list] = {"outputs": [], "kernels": {k: [] for k in run.kernels}}
        if current is not None:
            net.load_state_dict(current["net"])
            record = current["record"]
            bar.update(len(record["outputs"]))
        reference = None
        for t in range(len(record["outputs"]), run.steps + 1):
            try:
                interp = net.forward((run.Z,))
            except Diverged as error:  # seen inside the forward pass: add what was computed before it
                raise Diverged(str(error), step=error.step, value=error.value,
                               trajectory=_partial(run, record)) from None
            out = net.outputs(interp)
            reference = interp.scales() if reference is None else reference
            if blown_up(out, run.bound):
                interp.raise_diverged(interp.first_blown_up(reference), _partial(run, record))
            record["outputs"].append(out.cpu())
            for name in run.kernels:
                record["kernels"][name].append(_kernel(setup, interp, name).cpu())
            if t < run.steps:
                chi = run.loss.error_signal(out, run.y.to(device=out.device), run.schedule[t].to(out.device))
                net.backward_and_update(interp, chi)
                if checkpoint is not None and (t + 1) % checkpoint_every == 0:
                    _save_checkpoint(checkpoint, identity, finished, {"net": net.state_dict(), "record": record})
            del interp
            bar.update(1)
        return record

    def _check_memory(self, setup: LimitSetup, particles: int, batches: int, dtype: torch.dtype,
                      device: torch.device) -> None:
        """Refuse, before allocating, dense [P, P] grids (nonlinear rules) that cannot fit in memory."""
        if self.rule.linear and self.param.update == "plain" and self.clip is None:
            return
        grids = 1 + sum(torch.is_tensor(v) for v in self.rule.init_state(torch.zeros(1)).values())
        per_particle_squared = sum(math.prod(concrete_shape(setup.program.parameters[name].layout, 1))
                                   for name, abcd in setup.chosen.items()
                                   if setup.program.parameters[name].kind == "matrix")
        unit = grids * per_particle_squared * torch.empty((), dtype=dtype).element_size()
        need = unit * (particles // batches) ** 2
        have = _memory(device)
        if unit and need > have:
            fits = batches * int(math.isqrt(int(have // unit)))
            raise TplimitsError(f"particles={particles}: {self.rule.name}'s dense grids of Q values need about "
                                f"{need / 2**30:.3g} GiB per system ({grids} grids per hidden matrix, "
                                f"{particles // batches} particles per system), more than the {have / 2**30:.3g} GiB "
                                f"of {device.type} memory here; at most about {fits} particles fit")

    def _identity(self, run: _Run, setup: LimitSetup) -> dict[str, str]:
        """Everything that determines a run, as text: what a checkpoint must have been written by."""
        return {
            "library": importlib.metadata.version("tplimits"),
            "program": hashlib.sha256(setup.total.program.format().encode()).hexdigest(),
            "param": repr(self.param),
            "optimizer": self.rule.name,
            "optimizer_options": repr(sorted(self.optimizer_options.items())),
            "weight_decay": repr(self.weight_decay),
            "clip": repr(self.clip),
            "update_rules": repr(sorted((k, v.name) for k, v in setup.rules.items())),
            "lr": repr(run.lr),
            "loss": run.loss.name,
            "X": digest(run.X),
            "y": digest(run.y),
            "X_test": digest(run.Z[run.n_train:]),
            "schedule": digest(torch.cat(run.schedule)) if run.schedule else "",
            "steps": repr(run.steps),
            "particles": repr(run.particles),
            "batches": repr(run.batches),
            "seed": repr(run.seed),
            "dtype": str(run.dtype),
            "dots": run.dots,
            "kernels": repr(run.kernels),
        }

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
              steps: int = 50, lr: float = 0.1, **options: Any) -> checking.CheckReport:
        """Train finite-width models at ``widths`` (``seeds`` each) exactly as :meth:`train` trains the
        limit and compare; see :func:`tplimits.limit.check.check`."""
        return checking.check(self, X, y, widths=widths, seeds=seeds, steps=steps, lr=lr, **options)


FLOAT_DTYPES = (torch.float32, torch.float64)


def _refuse_random_sums(program: Program, param: Parametrization) -> None:
    """The engine takes every Avg as a deterministic number: a bottleneck's sum must have a + b >= 1 (with
    a + b = 1/2 it is stable but stays a random Θ(1) scalar in the limit)."""
    for name, fed in bottlenecks(program).items():
        abcd = param.for_parameter(name, "output")
        if abcd.a + abcd.b < 1:
            raise TplimitsError(f"tpl.derive computes the μ-limit, where every average over the width axis is a "
                                f"deterministic number; {bottleneck_message(program, name, fed, abcd)}")


def _memory(device: torch.device) -> int:
    """Bytes of memory the device has (all of it: the estimate it is compared with is a lower bound)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_numbers(**values: Any) -> None:
    """The numeric arguments of a run: whole numbers where counts are meant, finite and in range."""
    counts = {"steps": 0, "particles": 16, "batches": 1, "checkpoint_every": 1, "batch_size": 1}
    for name, minimum in counts.items():
        value = values[name]
        if value is None and name == "batch_size":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise TplimitsError(f"{name} must be an integer >= {minimum}, got {value!r}")
    lr = values["lr"]
    if not isinstance(lr, int | float) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
        raise TplimitsError(f"lr must be a finite number >= 0, got {lr!r}")
    if not isinstance(values["seed"], int):
        raise TplimitsError(f"seed must be an integer, got {values['seed']!r}")


def _check_dtype_device(dtype: Any, device: Any) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TplimitsError(f"dtype={dtype!r}: the limit engine runs in {[str(d) for d in FLOAT_DTYPES]} "
                            "(half precision cannot hold the Gram matrices of the hats)")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise TplimitsError(f"device={device!r} is not a torch device (use 'cpu' or 'cuda')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TplimitsError(f"device={str(device)!r}, but CUDA is not available here; use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise TplimitsError(f"device={str(device)!r}: the limit engine runs on 'cpu' or 'cuda'")


def _data(name: str, value: Any) -> torch.Tensor:
    """``value`` as a tensor with at least one row and only finite entries."""
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TplimitsError(f"{name} must be a tensor (or array) of numbers, got {type(value).__name__}") from None
    if t.ndim == 0 or len(t) == 0:
        raise TplimitsError(f"{name} has no rows (shape {tuple(t.shape)})")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise TplimitsError(f"{name} has non-finite entries (NaN or inf): clean the data first")
    return t


def _partial(run: _Run, record: dict[str, list]) -> Trajectory | None:
    """The steps one system computed before it diverged (no standard errors: one system)."""
    if not record["outputs"]:
        return None
    return _trajectory(attrs.evolve(run, particles=run.per_batch, batches=1), [record], 0.0)


def _trajectory(run: _Run, finished: list[dict[str, list]], seconds: float) -> Trajectory:
    """Means and standard errors over the independent systems."""
    outs = torch.stack([torch.stack(r["outputs"]) for r in finished])  # [batches, steps+1, M, ...]
    y_cpu = run.y.to(outs.dtype) if run.y.is_floating_point() else run.y
    train_outs = outs[:, :, :run.n_train]
    losses = torch.stack([torch.stack([run.loss(o, y_cpu) for o in r]) for r in train_outs])
    mean = train_outs.mean(0)
    kernel_runs = {k: torch.stack([torch.stack(r["kernels"][k]) for r in finished]) for k in run.kernels}
    tested = run.tested
    return Trajectory(
        outputs=mean,
        outputs_se=standard_error(train_outs),
        loss=torch.stack([run.loss(o, y_cpu) for o in mean]),
        loss_se=standard_error(losses),
        test_outputs=outs[:, :, run.n_train:].mean(0) if tested else None,
        test_outputs_se=standard_error(outs[:, :, run.n_train:]) if tested else None,
        kernels={k: v.mean(0) for k, v in kernel_runs.items()},
        kernels_se={k: standard_error(v) for k, v in kernel_runs.items()},
        particles=run.particles,
        batches=run.batches,
        dots=run.dots,
        seconds=seconds,
    )


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
    """The program's instructions (forward and backward) whose lowering rule declared them not smooth."""
    return [f"%{ins.name} ({fn_name(ins.fn)})" for ins in setup.program.instructions
            if isinstance(ins, Nonlin) and not ins.smooth]


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


def _save_checkpoint(path: str, identity: dict, finished: list, current: dict | None) -> None:
    tmp = f"{path}.tmp"
    torch.save({"identity": identity, "finished": finished, "current": current}, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: str | None, identity: dict) -> dict | None:
    """The saved run at ``path`` (None if there is none), after checking it is this run's."""
    if path is None or not os.path.exists(path):
        return None
    try:
        saved = torch.load(path, weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError) as error:
        raise CheckpointError(f"checkpoint {path!r} cannot be read ({type(error).__name__}: {error}); it is "
                              "truncated, corrupt or not a checkpoint: remove it to start afresh") from None
    if not isinstance(saved, dict) or not {"identity", "finished", "current"} <= set(saved):
        raise CheckpointError(f"checkpoint {path!r} is not a tplimits checkpoint of Limit.train (or one from an "
                              "older version); remove it to start afresh")
    differing = sorted(k for k in {**identity, **saved["identity"]} if saved["identity"].get(k) != identity.get(k))
    if differing:
        raise CheckpointError(f"checkpoint {path!r} is of another run: {', '.join(differing)} differ from this "
                              "call's; remove it, or call with the arguments it was written with")
    return saved
