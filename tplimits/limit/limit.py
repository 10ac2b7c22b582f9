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
import os
import pickle
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch
from tqdm.auto import tqdm

from tplimits.core.backprop import total_program
from tplimits.core.frontend import ArchitectureLike, ExampleInputs
from tplimits.core.ir import MatMul, Nonlin, Width, fn_name, width_axes
from tplimits.core.program import Program
from tplimits.core.trace import batch_axis
from tplimits.errors import (
    BatchSizeError,
    CheckpointError,
    Diverged,
    SteinBiasWarning,
    TplimitsError,
    check_count,
    check_real,
)
from tplimits.limit import check as checking
from tplimits.limit import compare as fidelity
from tplimits.limit.distributed import SHARD, Shard, owned_systems, particle_sum, process_group, shard_of, spread
from tplimits.limit.draws import drawn_initial, fixed_size_initial
from tplimits.limit.exact import EXACT_WIDTHS, NotGaussian, exact_kernel
from tplimits.limit.kets import STEIN_PARTICLES_PER_DIRECTION, HatFamily
from tplimits.limit.mu import LimitSetup, ParticleNetwork, initial_values
from tplimits.limit.mu import grid_entries as mu_grid_entries
from tplimits.limit.nt import DEFAULT_COPIES, Kernel, TangentSystem, check_operator_program, grid_entries, output_kernel
from tplimits.limit.runs import (
    BATCH_FIRST,
    Examples,
    batch_schedule,
    blown_up,
    check_dtype_device,
    data,
    digest,
    explosion_bound,
    limit_dtype,
    standard_error,
)
from tplimits.optimizers.base import UpdateRule
from tplimits.registry.manager import loss as lookup_loss
from tplimits.training.classify import (
    bottleneck_message,
    bottlenecks,
    classify_program,
    optimizer_homogeneity,
    unscaled_sums,
)
from tplimits.training.family import Family, lower_family
from tplimits.training.loss import Loss
from tplimits.training.model import parametrized_program
from tplimits.training.optim import rule_assignment
from tplimits.training.parametrize import Parametrization, parameter_roles

DOTS = ("auto", "autograd", "stein")
KERNEL_PATHS = ("auto", "exact", "monte carlo")
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
    center: bool = False  # train f - f_0 (the initial function subtracted), as instantiate(center=True)
    copies: int | None = None  # nonlinear rules: the copy population of the hidden matrices' grids
    examples: Examples = BATCH_FIRST  # the batch axes of X and of the outputs
    draw_seed: int | None = None  # one draw of the fixed-size random tensors for every system (else each its own)

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
    _batch_first: set = attrs.field(factory=set, repr=False)  # data shapes of batch-specific programs, checked

    # -- the program for a given set of inputs ---------------------------------------------
    def family(self, inputs: torch.Tensor | None = None) -> Family:
        """The architecture lowered for ``inputs``: once whatever their number of examples (the program
        re-specialised to it, :meth:`Program.at_batch`), or once per shape for a model whose graph depends on the
        batch size. Floating inputs are taken in the default dtype, the one the model is built in."""
        inputs = None if inputs is None else _lowering_inputs(inputs)
        axes = {key[1] for key in self._families if key is not None and key[0] == "rows"}
        lowered = None if inputs is None else next(
            (self._families[key] for key in (_rows(inputs, axis) for axis in sorted(axes)) if key in self._families),
            None)
        if lowered is not None and lowered.program.batch_generic:
            return attrs.evolve(lowered, program=lowered.program.for_inputs(inputs), inputs=(inputs,))
        key = None if inputs is None else (tuple(inputs.shape), inputs.dtype)
        if key not in self._families:
            example = self.example_inputs if inputs is None else (inputs,)
            self._families[key] = lower_family(self.arch, self.lowering_rules, example, self.base,
                                               update_rules=self.update_rules, **dict(self.config))
            if inputs is not None:  # other inputs with other counts of examples along its batch axis reuse it
                axis = Examples.of(self._families[key].program).inputs
                self._families.setdefault(_rows(inputs, axis), self._families[key])
        return self._families[key]

    def examples(self, X: torch.Tensor) -> Examples:
        """Where the examples of data ``X`` and of the outputs on it lie (:class:`~tplimits.limit.runs.Examples`:
        axis 1 of both for a sequence-first model)."""
        X = data("X", X)
        fam = self.family(X)
        if not fam.program.batch_generic and (tuple(X.shape), X.dtype) not in self._batch_first:
            _refuse_other_batch_axis(fam)
            self._batch_first.add((tuple(X.shape), X.dtype))
        return Examples.of(fam.program)

    def setup(self, inputs: torch.Tensor | None = None) -> LimitSetup:
        """Everything the particle systems need for ``inputs`` (floating ones taken in the default dtype), after
        checking the regime."""
        inputs = None if inputs is None else _lowering_inputs(inputs)
        key = None if inputs is None else (tuple(inputs.shape), inputs.dtype)
        if key in self._setups:
            return self._setups[key]
        fam = self.family(inputs)
        regime = self.regime(inputs)
        _refuse_random_sums(fam.program, self.param)
        program = parametrized_program(fam.program, self.param)
        rules = rule_assignment(program, fam.update_rules)
        roles = parameter_roles(program)
        chosen = {name: self.param.for_parameter(name, role) for name, role in roles.items() if name not in rules}
        reference = fam.model(fam.program.width, seed=0)
        # a coordinate law is checked at the two traced widths and a third
        law_widths = sorted({*fam.trace_widths, sum(fam.trace_widths)} - {fam.program.width})
        initial, draws = fixed_size_initial(fam, program, chosen, initial_values(
            program, reference, lambda: [fam.model(w, seed=0) for w in law_widths] if fam.build else []))
        setup = LimitSetup(
            total=total_program(program),
            param=self.param,
            chosen=chosen,
            rules=rules,
            initial=initial,
            rule=self.rule,
            hyper=dict(self.optimizer_options),
            weight_decay=self.weight_decay,
            clip=self.clip,
            regime=regime,
            draws=draws,
        )
        if regime == "operator":
            check_operator_program(setup, reference, fam.inputs)
        self._setups[key] = setup
        return setup

    def regime(self, inputs: torch.Tensor | None = None) -> str:
        """Which limit this is, by the classification (Sec. 2.8): ``"feature learning"`` (the μ-limit,
        Thm 2.9.25) or ``"operator"`` (the NT limit, Thm 2.9.19 / 2.9.23); any other verdict (unstable,
        trivial, unfaithful) has no limit to compute and is refused with its reasons."""
        verdict = classify_program(self.family(inputs).program, self.param,
                                   homogeneity=optimizer_homogeneity(self.rule))
        if verdict.regime not in ("feature learning", "operator") or not (verdict.stable and verdict.faithful):
            raise TplimitsError(
                f"{self.param.name} with {self.rule.name} is {verdict.regime} (r = {verdict.r}), stable "
                f"{verdict.stable}, faithful {verdict.faithful}: neither the μ-limit (feature learning, Thm 2.9.25) "
                f"nor the NT limit (operator regime, Thm 2.9.19) exists. Use μP or NTP (or a variant).\n{verdict}")
        return verdict.regime

    # -- training ------------------------------------------------------------------------------
    def train(self, X: torch.Tensor, y: torch.Tensor, steps: int = 50, lr: float = 0.1,
              loss: str | Loss | Callable = "mse", batch_size: int | None = None, X_test: torch.Tensor | None = None,
              particles: int = 2**14, seed: int = 0, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None, batches: int = 4, dots: str = "auto", kernels: Sequence[str] = (),
              checkpoint: str | None = None, checkpoint_every: int = 10, progress: bool = True, center: bool = False,
              copies: int | None = None, distributed: bool | str | None = None,
              draw_seed: int | None = None) -> Trajectory:
        """Train the limit on ``(X, y)`` for ``steps`` updates at learning rate ``lr`` (the same ``lr`` as
        ``tpl.instantiate(..., lr=lr)``), with ``particles`` particles split into ``batches``
        independent systems (for the standard errors). The examples of ``X`` lie along its axis 0, or along the
        model's batch axis (:meth:`examples`: axis 1 of a sequence-first model's ``[time, batch, ...]`` data; ``y``,
        ``X_test`` and the outputs then have theirs along the batch axes of the outputs and the inputs).

        The limit is the μ-limit or the NT limit as the classification of the parametrization says
        (:meth:`regime`). ``center=True`` trains ``f − f_0`` (the initial function subtracted, the paper's
        Ch. 5 protocol; ``tpl.instantiate(..., center=True)`` is its finite counterpart). ``copies``: under
        a nonlinear rule (Adam, SignSGD, Lion, normalized or clipped updates), the copy population of each
        hidden matrix's grids of ``Q`` values, so a step costs ``O(P·copies)`` instead of ``O(P²)``
        (default: the system's particles, at most ``tplimits.limit.nt.DEFAULT_COPIES``; with at least as
        many copies as particles the μ-limit keeps the dense same-population grid).

        ``dots``: ``"autograd"`` (per-particle derivatives; linear update rules only, and kinks only where
        their lowering rule declared them, as relu's: no bias from the many directions a convolution adds,
        at one backward pass per component), ``"stein"`` (Gaussian integration by parts; any rule, no
        autograd graph) or ``"auto"`` (autograd where it applies to a smooth program and is affordable).
        ``checkpoint``: a file the run is saved to every ``checkpoint_every`` steps and resumed from if it
        exists (``stein`` dots only: an autograd graph cannot be saved). ``dtype``: the particles' precision, by
        default float64 on every device; float32 only for short training (docs/limit.md, "Monte Carlo error,
        determinism, checkpoints").

        ``draw_seed``: where the model has fixed-size tensors initialized at random (:mod:`tplimits.limit.draws`),
        every system takes the draw of this seed instead of its own, giving the limit conditional on that draw (which
        ``Limit.check(..., shared_draws=True)`` compares with finite models given the same draw); by default the
        systems draw independently and the limit is the mixture over the law.

        ``distributed``: under an initialized ``torch.distributed`` process group (``None``, the default, or
        ``True``, which requires one) the ``batches`` independent systems are spread over the ranks and every
        rank returns the whole trajectory, bit-identical on CPU to the single-process run with the same seed
        (:mod:`tplimits.limit.distributed`); ``False`` runs every system in this process. ``"shard"`` (an
        initialized process group required) instead splits each system over the ranks by particle rows, its
        systems one after the other: memory per rank is a system's divided by the ranks, and the trajectory equals
        the single-process one with the same seed up to rounding (either limit, gradient-trained parameters under
        plain, normalized or clipped updates).
        """
        rank, size = process_group(distributed)
        if checkpoint is not None and (size > 1 or distributed == SHARD):
            raise CheckpointError("checkpoint= is for runs in one process; a run spread or sharded over a process "
                                  "group (distributed) keeps no checkpoint: pass distributed=False or no checkpoint")
        run, setup = self._prepare(X, y, X_test, steps, lr, loss, batch_size, particles, seed, device, dtype,
                                   batches, dots, kernels, checkpoint, checkpoint_every, center, copies, draw_seed,
                                   shards=size if distributed == SHARD else 1)
        start = time.perf_counter()
        identity = self._identity(run, setup)
        desc = "NT limit" if setup.regime == "operator" else "μ-limit"
        if distributed == SHARD:
            shard = shard_of(setup.program, run.per_batch, rank, size, run.device)
            bar = tqdm(total=batches * (steps + 1), disable=not progress or rank != 0,
                       desc=f"{desc} (sharded over {size} ranks)", unit="step")
            finished = [self._train_system(setup, run, b, None, bar, (None, checkpoint_every, identity), [],
                                           shard=shard) for b in range(batches)]
            bar.close()
            return attrs.evolve(_trajectory(run, finished, time.perf_counter() - start), identity=identity)
        if size > 1:
            bar = tqdm(total=len(owned_systems(batches, rank, size)) * (steps + 1), disable=not progress or rank != 0,
                       desc=f"{desc} (rank 0 of {size})", unit="step")
            finished = spread(batches, lambda b: self._train_system(setup, run, b, None, bar,
                                                                    (None, checkpoint_every, identity), []), rank, size)
            bar.close()
            return attrs.evolve(_trajectory(run, finished, time.perf_counter() - start), identity=identity)
        saved = _load_checkpoint(checkpoint, identity)
        finished: list[dict[str, list]] = saved["finished"] if saved else []
        bar = tqdm(total=batches * (steps + 1), disable=not progress, desc=desc, unit="step")
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
                 kernels: Sequence[str], checkpoint: str | None, checkpoint_every: int, center: bool = False,
                 copies: int | None = None, draw_seed: int | None = None,
                 shards: int = 1) -> tuple[_Run, LimitSetup]:
        """Every argument checked (before any lowering or training), converted, and the setup for the inputs
        (``shards``: the ranks each system is split over)."""
        loss_fn = lookup_loss(loss)
        _check_numbers(steps=steps, lr=lr, batch_size=batch_size, particles=particles, batches=batches, seed=seed,
                       checkpoint_every=checkpoint_every)
        if not isinstance(center, bool):
            raise TplimitsError(f"center must be True or False, got {center!r}")
        if copies is not None and (not isinstance(copies, int) or isinstance(copies, bool) or copies < 1):
            raise TplimitsError(f"copies must be a positive integer (or None), got {copies!r}")
        if draw_seed is not None and (not isinstance(draw_seed, int) or isinstance(draw_seed, bool) or draw_seed < 0):
            raise TplimitsError(f"draw_seed must be a non-negative integer (or None), got {draw_seed!r}")
        dtype = limit_dtype(dtype, device)
        check_dtype_device(dtype, device)
        X, y = data("X", X), data("y", y)
        examples = self.examples(X)
        examples.matched(X, y)
        Z = X if X_test is None else _joined(X, "X_test", X_test, examples)
        setup = self.setup(Z)
        dots = self._resolve_dots(dots, setup)
        _check_particles(setup, particles, batches)
        _warn_stein_bias(setup, dots, particles // batches, stacklevel=3)  # the caller of train
        self._check_memory(setup, particles, batches, dtype, torch.device(device), copies, shards)
        kernels = _check_kernels(kernels, setup)
        if checkpoint is not None and not isinstance(checkpoint, str | os.PathLike):
            raise TplimitsError(f"checkpoint must be a file path (or None), got {type(checkpoint).__name__}")
        if checkpoint is not None and setup.regime == "operator":
            raise TplimitsError("checkpoints are not implemented for the NT limit yet (its runs keep no hats to "
                                "save and are short); call without checkpoint=")
        if checkpoint is not None and dots == "autograd":
            raise TplimitsError("checkpoints need dots='stein': an autograd graph over the training history "
                                "cannot be saved")
        if checkpoint is not None and not os.path.isdir(os.path.dirname(os.path.abspath(checkpoint))):
            raise TplimitsError(f"checkpoint={checkpoint!r}: its directory does not exist; create it first")
        schedule = batch_schedule(examples.count(X), batch_size, steps, seed)
        run = _Run(X, y, Z, examples.count(X), steps, lr, loss_fn, schedule, particles, batches, seed, dtype,
                   torch.device(device), dots, kernels, X_test is not None, explosion_bound(y), center, copies,
                   examples, draw_seed)
        return run, setup

    def _train_system(self, setup: LimitSetup, run: _Run, b: int, current: dict | None, bar: Any,
                      saving: tuple[str | None, int, dict], finished: list,
                      observe: Callable[[int, Any], None] | None = None, shard: Shard | None = None) -> dict[str, list]:
        """Train independent system ``b`` (resuming from ``current``), recording outputs and kernels;
        ``saving`` is (checkpoint path, every how many steps, the run's identity). ``observe(t, interp)`` is
        called after each update's backward pass, with the values of the whole total program at step ``t``.
        ``shard``: this process trains its rank's rows of the system."""
        draw = _system_seed(run.seed, b) if run.draw_seed is None else run.draw_seed
        setup = _system_setup(setup, draw, run.per_batch)
        if setup.regime == "operator":
            return self._train_tangent_system(setup, run, b, bar, shard)
        checkpoint, checkpoint_every, identity = saving
        net = ParticleNetwork(setup, run.per_batch, _system_seed(run.seed, b), run.dtype, run.device, run.dots,
                              run.lr, run.steps, copies=run.copies or DEFAULT_COPIES, shard=shard)
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
            if run.center:  # the initial function, kept in the record (a resumed run subtracts the same one)
                record.setdefault("initial", out)
                out = out - record["initial"]
            reference = interp.scales() if reference is None else reference
            if blown_up(out, run.bound):
                interp.raise_diverged(interp.first_blown_up(reference), _partial(run, record))
            record["outputs"].append(out.cpu())
            for name in run.kernels:
                record["kernels"][name].append(_kernel(setup, interp, name).cpu())
            if t < run.steps:
                chi = run.examples.error_signal(run.loss, out, run.y.to(device=out.device),
                                                run.schedule[t].to(out.device))
                net.backward_and_update(interp, chi)
                if observe is not None:
                    observe(t, interp)
                if checkpoint is not None and (t + 1) % checkpoint_every == 0:
                    _save_checkpoint(checkpoint, identity, finished, {"net": net.state_dict(), "record": record})
            del interp
            bar.update(1)
        return record

    def _train_tangent_system(self, setup: LimitSetup, run: _Run, b: int, bar: Any,
                              shard: Shard | None = None) -> dict[str, list]:
        """Train independent system ``b`` of the NT limit: its tangents, then the outputs by its dynamics (the
        feature kernels are those of the dynamics' current tangents: under weight decay the kets move)."""
        system = TangentSystem(setup, run.per_batch, _system_seed(run.seed, b), run.dtype, run.device, run.dots,
                               run.lr, run.steps, shard)
        tangents = system.tangents(run.Z)
        f0 = tangents.outputs.new_zeros(tangents.outputs.shape) if run.center else tangents.outputs
        dynamics = system.dynamics(tangents, run.copies, run.steps)
        record: dict[str, list] = {"outputs": [], "kernels": {k: [] for k in run.kernels}}
        out = f0
        for t in range(run.steps + 1):
            if blown_up(out, run.bound):
                raise Diverged(f"the NT limit diverged at step {t}: its outputs are non-finite or beyond {run.bound:g}"
                               " (RMS). Try a smaller lr; see docs/limit.md, 'Divergence'.", step=t, value="outputs",
                               trajectory=_partial(run, record))
            record["outputs"].append(out.cpu())
            for name in run.kernels:
                record["kernels"][name].append(_kernel(setup, dynamics.tangents.interp, name).cpu())
            if t < run.steps:
                chi = run.examples.error_signal(run.loss, out, run.y.to(device=out.device),
                                                run.schedule[t].to(out.device))
                out = f0 + dynamics.step(chi).reshape(f0.shape)
            bar.update(1)
        return record

    def kernel(self, X: torch.Tensor, kind: str = "ntk", X2: torch.Tensor | None = None, particles: int = 2**14,
               batches: int = 4, seed: int = 0, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", dots: str = "auto", path: str = "auto",
               distributed: bool | None = None) -> Kernel:
        """The NT limit's kernel at initialization between ``X`` and ``X2`` (default ``X``): ``kind="ntk"``,
        the neural tangent kernel with the parametrization's per-parameter learning-rate and gradient
        scales — one SGD step at learning rate ``lr`` of the finite models moves their outputs by
        ``−lr·K·χ`` in the limit — or ``kind="nngp"``, the covariance of the initial outputs. ``[N, N2]``
        for one output, ``[N, N2, e, e]`` for ``e``.

        ``path``: ``"exact"``, Gaussian integrals through the program (:mod:`tplimits.limit.exact`: closed forms
        and quadrature, ``se`` zero; a program it cannot integrate raises :class:`~tplimits.limit.exact.NotGaussian`
        naming the instruction), ``"monte carlo"``, particles with standard errors over ``batches`` independent
        systems of ``particles / batches`` particles, or ``"auto"``: exact where the program allows, else Monte
        Carlo (``particles``, ``batches``, ``seed`` and ``dots`` are the Monte Carlo path's). ``Kernel.path`` says
        which was taken.

        ``distributed`` as for :meth:`train`: under a ``torch.distributed`` process group the Monte Carlo path's
        ``batches`` systems are spread over the ranks and every rank returns the kernel of all of them, on CPU bit
        for bit the one-process kernel; ``"shard"`` splits each system over the ranks by particle rows instead (the
        kernel equal to the one-process one up to rounding). The exact path runs on every rank alike."""
        rank, size = process_group(distributed)
        if kind not in ("ntk", "nngp"):
            raise TplimitsError(f"kind must be 'ntk' or 'nngp', got {kind!r}")
        if path not in KERNEL_PATHS:
            raise TplimitsError(f"path must be one of {KERNEL_PATHS}, got {path!r}")
        _check_numbers(steps=0, lr=0.0, batch_size=None, particles=particles, batches=batches, seed=seed,
                       checkpoint_every=1)
        dtype = limit_dtype(dtype, device)
        check_dtype_device(dtype, device)
        X = data("X", X)
        examples = self.examples(X)
        if examples != BATCH_FIRST:
            raise BatchSizeError(f"kernel: this model's examples lie along axis {examples.inputs} of X and axis "
                                 f"{examples.outputs} of its outputs (a sequence-first model); kernels are taken "
                                 "between examples along axis 0 of both: wrap the model so that it takes and returns "
                                 "its examples along axis 0 (batch-first)")
        Z = X if X2 is None else _joined(X, "X2", X2)
        setup = self.setup(Z)
        if setup.regime != "operator":
            raise TplimitsError(f"{self.param.name} with {self.rule.name} is in the feature learning regime: its "
                                "limit (the μ-limit) has no fixed kernel. Kernels are the NT limit's: use NTP.")
        if dots not in DOTS:
            raise TplimitsError(f"dots must be one of {DOTS}, got {dots!r}")
        if path != "monte carlo":  # particles, batches and dots are the Monte Carlo path's: checked where it runs
            exact = _exact_kernel(setup, X, Z, kind, dtype, torch.device(device), required=path == "exact")
            if exact is not None:
                return exact
        _check_particles(setup, particles, batches)
        dots = self._resolve_dots(dots, setup)
        _warn_stein_bias(setup, dots, particles // batches, stacklevel=2)  # the caller of kernel

        shard = shard_of(setup.program, particles // batches, rank, size, device) if distributed == SHARD else None

        def system_kernel(b: int) -> torch.Tensor:
            system = TangentSystem(_system_setup(setup, _system_seed(seed, b), particles // batches),
                                   particles // batches, _system_seed(seed, b), dtype, torch.device(device), dots, 0.0,
                                   shard=shard)
            tangents = system.tangents(Z.to(device=device, dtype=dtype) if Z.is_floating_point() else Z.to(device))
            value = system.ntk(tangents) if kind == "ntk" else system.nngp(tangents)
            return output_kernel(value, len(X), len(Z) - len(X), tangents.outputs.shape[1:]).cpu()

        systems = [system_kernel(b) for b in range(batches)] if shard else spread(batches, system_kernel, rank, size)
        stacked = torch.stack(systems)
        if not bool(torch.isfinite(stacked).all()):
            raise Diverged(f"the {kind.upper()} has non-finite entries: the kets overflowed at initialization (inputs "
                           "or parameters too large for the dtype); use float64 or smaller inputs", value=kind)
        return Kernel(stacked.mean(0), standard_error(stacked), kind, "monte carlo", particles, batches)

    def _check_memory(self, setup: LimitSetup, particles: int, batches: int, dtype: torch.dtype,
                      device: torch.device, copies: int | None = None, shards: int = 1) -> None:
        """Refuse, before allocating, grids of ``Q`` values (nonlinear rules) that cannot fit in memory: a system's
        share per process (``shards``: the ranks a sharded system is split over), against the device's memory (a
        CPU's shared by the processes torchrun started on it)."""
        if self.rule.linear and self.param.update == "plain" and self.clip is None and not (
                setup.regime == "operator" and self.weight_decay):  # the NT limit keeps grids under weight decay
            return
        grids = 1 + sum(torch.is_tensor(v) for v in self.rule.init_state(torch.zeros(1)).values())
        size = grids * torch.empty((), dtype=dtype).element_size()

        def need(per_batch: int) -> int:
            if setup.regime == "operator":  # grids against the copy population only
                return size * grid_entries(setup, per_batch, copies) // shards
            return size * mu_grid_entries(setup, per_batch, copies or DEFAULT_COPIES) // shards

        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
        per_batch, have = particles // batches, _memory(device) // max(local, 1)
        if need(per_batch) > have:
            low, high = 0, per_batch  # the most particles per system that fit, by bisection
            while high - low > 1:
                low, high = ((low + high) // 2, high) if need((low + high) // 2) <= have else (low, (low + high) // 2)
            where = "per system" if shards == 1 else f"per rank (a system split over {shards})"
            raise TplimitsError(f"particles={particles}: {self.rule.name}'s grids of Q values need about "
                                f"{need(per_batch) / 2**30:.3g} GiB {where} ({grids} grids per hidden matrix, "
                                f"{per_batch} particles per system, copies={copies}), more than the "
                                f"{have / 2**30:.3g} GiB of {device.type} memory here per process; at most about "
                                f"{batches * low} particles fit (or pass fewer copies, or shard over more ranks)")

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
            "X_test": digest(run.examples.after(run.Z, run.n_train)),
            "schedule": digest(torch.cat(run.schedule)) if run.schedule else "",
            "steps": repr(run.steps),
            "particles": repr(run.particles),
            "batches": repr(run.batches),
            "seed": repr(run.seed),
            "dtype": str(run.dtype),
            "dots": run.dots,
            "kernels": repr(run.kernels),
            "center": repr(run.center),
            "copies": repr(run.copies),
            "draw_seed": repr(run.draw_seed),
        }

    def _resolve_dots(self, dots: str, setup: LimitSetup) -> str:
        """The dots a run uses. ``auto``: autograd for smooth programs applying each matrix to few components
        (one backward pass per component), Stein otherwise. Explicit autograd dots also take programs whose
        kinks are all declared (``Nonlin.kinks``, relu's family): they smooth the point masses those leave."""
        if dots not in DOTS:
            raise TplimitsError(f"dots must be one of {DOTS}, got {dots!r}")
        # The NT limit takes dots once, at initialization, whatever its rule: a linear rule is not needed.
        linear = setup.regime == "operator" or (self.rule.linear and self.param.update == "plain" and self.clip is None)
        if dots == "autograd" and not linear:
            raise TplimitsError(
                f"dots='autograd' needs a linear update rule with plain updates; {self.rule.name} keeps a dense "
                "[P, P] grid of Q values whose dependence on each particle is not tracked. Use dots='stein'.")
        undeclared = _non_smooth(setup)
        if dots == "autograd" and undeclared:
            raise TplimitsError(
                f"dots='autograd' differentiates every function of the program, but {undeclared[0]} has a derivative "
                "that jumps (its second derivative is a point mass autograd does not see, and its lowering rule "
                "declared no kinks to smooth it); use dots='stein'")
        if dots != "auto":
            return dots
        cheap = _components(setup) <= AUTOGRAD_MAX_COMPONENTS
        return "autograd" if linear and cheap and not _non_smooth(setup, declared=True) else "stein"

    def check(self, X: torch.Tensor, y: torch.Tensor, widths: Sequence[int] = (128, 512, 2048), seeds: int = 8,
              steps: int = 50, lr: float = 0.1, **options: Any) -> checking.CheckReport:
        """Train finite-width models at ``widths`` (``seeds`` each) exactly as :meth:`train` trains the
        limit and compare; see :func:`tplimits.limit.check.check`."""
        return checking.check(self, X, y, widths=widths, seeds=seeds, steps=steps, lr=lr, **options)

    def compare(self, X: torch.Tensor, y: torch.Tensor, widths: Sequence[int] = (256, 1024), seeds: int = 8,
                steps: int = 5, lr: float = 0.1, **options: Any) -> fidelity.FidelityReport:
        """Train finite models and the limit side by side and find the first program value (and step) where
        they part: the fidelity debugger, see :func:`tplimits.limit.compare.compare_values`."""
        return fidelity.compare_values(self, X, y, widths=widths, seeds=seeds, steps=steps, lr=lr, **options)


def _refuse_random_sums(program: Program, param: Parametrization) -> None:
    """The engine takes every Avg as a deterministic number: a bottleneck's sum must have a + b >= 1 (with
    a + b = 1/2 it is stable but stays a random Θ(1) scalar in the limit)."""
    for name, fed in bottlenecks(program).items():
        abcd = param.for_parameter(name, "output")
        if abcd.a + abcd.b < 1:
            raise TplimitsError(f"the limit engines take every average over the width axis as a deterministic "
                                f"number; {bottleneck_message(program, name, fed, abcd)}")
    for name in unscaled_sums(program):
        node = program[name].origin.describe() or f"%{name}"
        raise TplimitsError(
            f"%{name} ({node}) sums a product of width values over the width axis with no width-dependent scale "
            "on it or its factors (attention logits q·kᵀ with scale=1, as T5 computes them): at initialization "
            f"a sum of n independent products grows like √n, so under {param.name} the network has no limit. Scale "
            "the sum by 1/d (or let scaled_dot_product_attention keep its default scale, which the "
            "parametrization sets)")


def _exact_kernel(setup: LimitSetup, X: torch.Tensor, Z: torch.Tensor, kind: str, dtype: torch.dtype,
                  device: torch.device, required: bool) -> Kernel | None:
    """The kernel by Gaussian integrals; ``None`` where the program has an instruction they cannot integrate
    (unless ``required``: then that instruction's :class:`NotGaussian` error)."""
    rows = Z.to(device=device, dtype=dtype) if Z.is_floating_point() else Z.to(device)
    try:
        wide = max(EXACT_WIDTHS)  # a declared law's n^-b is taken at the widest width the exact path uses
        value, outputs = exact_kernel(_system_setup(setup, 0, wide), rows, kind, dtype, device)
        if setup.draws and not torch.allclose(exact_kernel(_system_setup(setup, 1, wide), rows, kind, dtype, device)[0],
                                              value, rtol=1e-9, atol=1e-12 * float(value.abs().max())):
            raise NotGaussian(f"{', '.join(sorted(setup.draws))} (no width axis) is drawn at random and the kernel "
                              "depends on its draw: the limit's kernel is a mixture over its law; use path='monte "
                              "carlo'", sorted(setup.draws)[0])
    except NotGaussian:
        if required:
            raise
        return None
    value = output_kernel(value, len(X), len(Z) - len(X), outputs).cpu()
    # a finite sum has no inf or nan among its terms: one reduction, the entrywise test only when it is not
    if not bool(torch.isfinite(value.sum())) and not bool(torch.isfinite(value).all()):
        raise Diverged(f"the exact {kind.upper()} has non-finite entries: inputs or parameters too large for the "
                       "dtype; use float64 or smaller inputs", value=kind)
    # zero by construction: one broadcast zero, not a fresh N×N block per call (read-only: in-place writes raise)
    return Kernel(value, torch.zeros((), dtype=value.dtype).expand(value.shape), kind, "exact", 0, 0)


def _memory(device: torch.device) -> int:
    """Bytes of memory the device has (all of it: the estimate it is compared with is a lower bound)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_numbers(**values: Any) -> None:
    """The numeric arguments of a run: whole numbers where counts are meant, finite and in range."""
    counts = {"steps": 0, "particles": 16, "batches": 1, "checkpoint_every": 1, "batch_size": 1}
    for name, minimum in counts.items():
        if values[name] is not None or name != "batch_size":
            check_count(name, values[name], minimum)
    check_real("lr", values["lr"], 0)
    if not isinstance(values["seed"], int) or isinstance(values["seed"], bool):
        raise TplimitsError(f"seed must be an integer, got {values['seed']!r}")


def _partial(run: _Run, record: dict[str, list]) -> Trajectory | None:
    """The steps one system computed before it diverged (no standard errors: one system)."""
    if not record["outputs"]:
        return None
    return _trajectory(attrs.evolve(run, particles=run.per_batch, batches=1), [record], 0.0)


def _trajectory(run: _Run, finished: list[dict[str, list]], seconds: float) -> Trajectory:
    """Means and standard errors over the independent systems."""
    outs = torch.stack([torch.stack(r["outputs"]) for r in finished])  # [batches, steps+1, M, ...]
    y_cpu = run.y.to(outs.dtype) if run.y.is_floating_point() else run.y
    examples = run.examples
    train_outs, test_outs = examples.first(outs, run.n_train, lead=2), examples.rest(outs, run.n_train, lead=2)
    losses = torch.stack([torch.stack([examples.loss(run.loss, o, y_cpu) for o in r]) for r in train_outs])
    mean = train_outs.mean(0)
    kernel_runs = {k: torch.stack([torch.stack(r["kernels"][k]) for r in finished]) for k in run.kernels}
    tested = run.tested
    return Trajectory(
        outputs=mean,
        outputs_se=standard_error(train_outs),
        loss=torch.stack([examples.loss(run.loss, o, y_cpu) for o in mean]),
        loss_se=standard_error(losses),
        test_outputs=test_outs.mean(0) if tested else None,
        test_outputs_se=standard_error(test_outs) if tested else None,
        kernels={k: v.mean(0) for k, v in kernel_runs.items()},
        kernels_se={k: standard_error(v) for k, v in kernel_runs.items()},
        particles=run.particles,
        batches=run.batches,
        dots=run.dots,
        seconds=seconds,
    )


def _fixed_size(layout: Sequence[Any]) -> int:
    """The number of entries along the axes of ``layout`` that do not grow with width."""
    count = 1
    for spec in layout:
        if not isinstance(spec, Width):
            count *= spec
    return count


def _components(setup: LimitSetup) -> int:
    """The largest number of components (times fixed matrix axes) any matrix is applied to at once."""
    program = setup.program
    return max((_fixed_size(program[ins.vector].layout) * _fixed_size(program[ins.matrix].layout)
                for ins in program.instructions if isinstance(ins, MatMul)), default=1)


def directions_per_application(program: Program) -> int:
    """The most components (batch rows × positions) any matrix is applied to at once, per fixed index of the
    matrix (a convolution's kernel offset): the directions its hat family gains in one pass."""
    return max((_fixed_size(program[ins.vector].layout) // _fixed_size(program[ins.matrix].layout)
                for ins in program.instructions if isinstance(ins, MatMul)), default=0)


def _stein_biased(setup: LimitSetup, per_system: int) -> bool:
    """Whether the Stein estimates of the dot terms see too few particles per system for the directions a matrix
    is applied to: their noise adds to every ``Wᵀδ`` a random ket of second moment ≈ (directions/particles)·E[δ²]
    in every system alike, a bias of the kernels downstream that no standard error shows. Hats of one matrix
    (``HatFamily.CONSISTENT``) keep every direction there, so no ket takes a Stein dot at all."""
    if HatFamily.CONSISTENT:
        return False
    return directions_per_application(setup.program) * STEIN_PARTICLES_PER_DIRECTION > per_system


def _warn_stein_bias(setup: LimitSetup, dots: str, per_system: int, stacklevel: int) -> None:
    """Warn where a run uses Stein dots and they are biased (:func:`_stein_biased`)."""
    if dots != "stein" or not _stein_biased(setup, per_system):
        return
    directions = directions_per_application(setup.program)
    warnings.warn(SteinBiasWarning(
        f"a hidden matrix is applied to {directions} components at once (batch rows × positions) against "
        f"{per_system} particles per system: the Stein estimates of its dot terms bias the kernels downstream "
        f"by about {directions / per_system:.0%} of the backward values' second moment or more (docs/"
        f"architectures.md, 'Convolutions over many positions'). Use at least "
        f"{STEIN_PARTICLES_PER_DIRECTION * directions} particles per system, fewer inputs per step, or "
        "dots='autograd' where a linear rule (SGD) and relu-family kinks allow it (no such bias, at one "
        "backward pass per component)"),
        stacklevel=stacklevel + 1)


def _non_smooth(setup: LimitSetup, declared: bool = False) -> list[str]:
    """The program's instructions (forward and backward) whose lowering rule declared them not smooth; with
    ``declared`` False, only those that declared no kinks (``Nonlin.kinks``: autograd dots smooth the point
    masses the declared ones leave)."""
    return [f"%{ins.name} ({fn_name(ins.fn)})" for ins in setup.program.instructions
            if isinstance(ins, Nonlin) and not ins.smooth and (declared or not ins.kinks)]


def _system_setup(setup: LimitSetup, seed: int, particles: int) -> LimitSetup:
    """The setup of the system of ``seed``: its own draw of every fixed-size tensor initialized at random."""
    if not setup.draws:
        return setup
    return attrs.evolve(setup, initial=drawn_initial(setup.initial, setup.draws, seed, particles))


def _system_seed(seed: int, system: int) -> int:
    """The random seed of independent particle system ``system`` of a run (or kernel) with ``seed``."""
    return seed * 1_000_003 + system


def _joined(X: torch.Tensor, name: str, other: Any, examples: Examples = BATCH_FIRST) -> torch.Tensor:
    """``X`` followed by the examples of ``other`` (argument ``name``), which must be examples of the same shape."""
    other = data(name, other)
    axis = examples.inputs
    if axis == 0 and other.shape[1:] != X.shape[1:]:
        raise TplimitsError(f"{name} has rows of shape {tuple(other.shape[1:])}, X of {tuple(X.shape[1:])}")
    if other.dim() != X.dim() or other.shape[:axis] + other.shape[axis + 1:] != X.shape[:axis] + X.shape[axis + 1:]:
        raise TplimitsError(f"{name} has shape {tuple(other.shape)}, X {tuple(X.shape)}: their examples lie along "
                            f"axis {axis} (a sequence-first model) and must have the same shape")
    return examples.join(X, other.to(X.dtype))


def _refuse_other_batch_axis(fam: Family) -> None:
    """A program specific to its batch size records no batch axis, and the limit takes the examples of its data
    along axis 0; a model whose examples lie along another axis (sequence-first) is refused."""
    axis = batch_axis(fam.model(fam.program.width, seed=0), fam.inputs)
    if axis != 0:
        raise BatchSizeError(f"the model's examples lie along axis {axis} of its inputs (sequence-first), but its "
                             f"program holds at its own batch size only ({fam.program.batch_dependence}), so the "
                             "limit cannot tell its training rows, batches and test examples apart along that axis: "
                             "wrap the model so that it takes and returns its examples along axis 0 (batch-first)")


def _rows(inputs: torch.Tensor, axis: int) -> tuple:
    """What inputs with any number of examples along ``axis`` share: the key of their family."""
    shape = tuple(inputs.shape)
    return ("rows", axis, shape[:axis] + shape[axis + 1:], inputs.dtype)


def _lowering_inputs(Z: torch.Tensor) -> torch.Tensor:
    """Data as the program is lowered for it: in the default dtype (integer inputs as they are)."""
    return Z.to(torch.get_default_dtype()) if Z.is_floating_point() else Z


def _check_particles(setup: LimitSetup, particles: int, batches: int) -> None:
    if batches < 1 or particles % batches:
        raise TplimitsError(f"particles ({particles}) must be a positive multiple of batches ({batches})")
    per_batch = particles // batches
    for ins in setup.program.instructions:
        for spec in getattr(ins, "layout", ()):
            if isinstance(spec, Width) and (spec.ratio * per_batch).denominator != 1:
                raise TplimitsError(f"%{ins.name} has a width axis of ratio {spec.ratio}: particles per batch "
                                    f"({per_batch}) must make it whole")
    if per_batch < 16:
        raise TplimitsError(f"{per_batch} particles per batch is too few for a Monte Carlo limit")


def _check_kernels(kernels: Any, setup: LimitSetup) -> tuple[str, ...]:
    """The names of the program's vectors (values with one width axis) whose kernels are recorded."""
    if isinstance(kernels, str) or not isinstance(kernels, Sequence):
        raise TplimitsError(f"kernels must be a sequence of program value names, got {kernels!r}")
    order = {ins.name: k for k, ins in enumerate(setup.program.instructions)}
    for name in kernels:
        if not isinstance(name, str) or name not in order:
            raise TplimitsError(f"kernels: no program value %{name}; see `tpl.lower(...).format()` for the names")
        if order[name] >= setup.total.forward_length:
            raise TplimitsError(f"kernels: %{name} is a value of the backward pass; kernels are recorded after "
                                "each forward pass (steps 0 to steps), so name forward values only")
        layout = setup.program[name].layout
        if len(width_axes(layout)) != 1:
            raise TplimitsError(f"kernels: %{name} is not a vector (one width axis); it has layout {layout}")
    return tuple(kernels)


def _kernel(setup: LimitSetup, interp: Any, name: str) -> torch.Tensor:
    """``⟨x|x⟩`` of program value ``name`` over its components: [K, K]."""
    axes = width_axes(setup.program[name].layout)
    x = interp.values[name].detach()
    x = x.movedim(axes[0], -1)
    x = x.reshape(-1, x.shape[-1])
    shard = getattr(interp, "shard", None)
    return particle_sum(x @ x.T, shard) / (x.shape[-1] * (1 if shard is None else shard.ranks))


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
