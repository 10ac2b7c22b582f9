"""The neural tangent limit (Thm 2.4.7, 2.4.9, 2.9.19, 2.9.23; MATH.md §5, §11.5) on Monte Carlo particles.

In the operator regime (NTP and every stable faithful abcd with r > 0) the kets freeze at
initialization and the function moves by the tangent operator ``K_Q`` of Eq. 2.34 / 2.39. The
particle system is the μ-limit's (:class:`~tplimits.limit.mu.ParticleNetwork`: the program at width
``P`` with every initial matrix an operator of hats and dots) run once, at initialization, with no
update kept in it; the backward half of the total program is then run once per output coordinate
(one-hot error signals) to read off the Jacobian kets of every trained tensor — the backward kets of a
general architecture with their dot terms (Remark 2.9.20). From them:

* the **NTK** ``K = Σ_θ lr_scale_θ · grad_scale_θ · ⟨∂f/∂θ, ∂f/∂θ⟩``, the kernel with which one small
  SGD step of ``tpl.instantiate(..., param=...)`` at learning rate ``lr`` moves the outputs by
  ``−lr·K·χ`` (hidden matrices through Gram matrices of their factors: no ``P × P`` matrix is formed);
* the **NNGP** ``⟨f|f⟩``, the covariance of the initial outputs, from the last averages over width;
* **dynamics**: a linear rule (SGD, momentum, Nesterov) moves ``f`` by the kernel, with the rule's
  coefficients over the past error signals found by running it on one-hot indicators; any other
  rule (Adam, SignSGD, Lion, normalized or clipped updates) keeps its accumulated update of each
  hidden matrix as a grid of ``Q`` values against a fixed population of ``copies`` particles (the copy
  index stays fixed over time, MATH.md §11.4–11.5), with the rule's state per entry, and moves ``f``
  by the Jacobian applied to the accumulated updates. Vector and scalar parameters are local;
* **weight decay** (Thm 2.10.3): the tangents of step ``t`` are the initial network's with every trained
  parameter scaled by ``(1 − λ)^t``, on the same particles, and every rule keeps decayed grids.

Without weight decay nothing is sampled after initialization, so the cost of a step does not grow with the
step; with it, each step's backward kets are new, and the hat families grow by them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch

from tplimits.core.backprop import TotalProgram
from tplimits.core.ir import Avg, concrete_shape, width_axes
from tplimits.errors import TplimitsError
from tplimits.limit.distributed import Shard
from tplimits.limit.kets import KetInterpreter, MatMulPlan
from tplimits.limit.mu import LimitSetup, ParticleNetwork
from tplimits.optimizers.base import apply_rule, apply_rule_in_place
from tplimits.training.init import multiplier

DEFAULT_COPIES = 2**12
"""The copy population of a nonlinear rule's grids when ``copies`` is not given: every particle of the
system up to this many (the same-population grid of the finite formula), a random subset beyond."""


@attrs.frozen
class Kernel:
    """A kernel of the NT limit between two sets of inputs: ``value`` ``[N, N2]`` for one output, else
    ``[N, N2, e, e]``; ``se`` its Monte Carlo standard error (NaN with one particle system); ``kind``
    ``"ntk"`` or ``"nngp"``; ``path`` how it was computed: ``"monte carlo"``, particles with their standard
    errors, or ``"exact"``, Gaussian integrals through the program (:mod:`tplimits.limit.exact`; ``se`` zero,
    ``particles`` and ``batches`` 0)."""

    value: torch.Tensor
    se: torch.Tensor
    kind: str
    path: str
    particles: int
    batches: int

    @property
    def shape(self) -> torch.Size:
        return self.value.shape

    def mse_outputs(self, y: torch.Tensor, lr: float, steps: int, f0: torch.Tensor | None = None,
                    flow: bool = False) -> torch.Tensor:
        """The closed form of full-batch training by SGD on the ``mse`` loss (mean over rows and outputs) with
        this NTK of the training inputs: the residual ``r = f − y`` obeys ``r_{t+1} = (I − A) r_t`` with
        ``A = 2·lr·K / (N·e)``, solved through the eigendecomposition of ``K``; ``flow=True`` gives gradient
        flow at times ``t·lr``, ``r(t) = exp(−A t) r_0``. ``f0``: the initial outputs (default 0, centered).
        Returns ``[steps+1, N, e]`` (``[steps+1, N]`` for a one-dimensional ``y``)."""
        if self.kind != "ntk" or self.value.shape[0] != self.value.shape[1]:
            raise TplimitsError("mse_outputs needs the NTK of the training inputs with themselves "
                                "(limit.kernel(X, kind='ntk'))")
        e = 1 if self.value.ndim == 2 else self.value.shape[-1]
        y = torch.as_tensor(y)
        if y.numel() != self.value.shape[0] * e or not y.is_floating_point():
            raise TplimitsError(f"y must hold {self.value.shape[0]} rows of {e} real targets (this kernel's), got "
                                f"shape {tuple(y.shape)} of {y.dtype}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0 or not math.isfinite(float(lr)):
            raise TplimitsError(f"steps must be an integer >= 0 and lr a finite number, got {steps!r}, {lr!r}")
        targets = y.reshape(self.value.shape[0], e).to(self.value.dtype)
        K = self.value if self.value.ndim == 2 else self.value.permute(0, 2, 1, 3)
        K = K.reshape(targets.numel(), targets.numel())
        evals, evecs = torch.linalg.eigh((K + K.T) / 2)
        rate = 2 * lr * evals / targets.numel()
        start = torch.zeros_like(targets) if f0 is None else f0.reshape(targets.shape).to(targets.dtype)
        r0 = evecs.T @ (start - targets).reshape(-1)
        times = torch.arange(steps + 1, dtype=rate.dtype)[:, None]
        decay = torch.exp(-rate * times) if flow else (1 - rate) ** times
        outputs = (decay * r0) @ evecs.T + targets.reshape(-1)
        return outputs.reshape(steps + 1, *y.shape) if e == 1 and y.ndim == 1 else outputs.reshape(
            steps + 1, -1, e)


@attrs.frozen
class MatrixTangent:
    """One use ``h = W x`` of a matrix in canonical form: the gradient of the outputs' coordinate ``j`` is
    ``out[j] @ inp[j]ᵀ`` (``[J or 1, F, P_out, K]`` and ``[J or 1, F, P_in, K]``; the side that does not
    depend on the output coordinate has a leading axis of 1)."""

    out: torch.Tensor
    inp: torch.Tensor


@attrs.define
class Tangents:
    """The Jacobian kets of one particle system at initialization, for the ``J`` output coordinates
    (rows × outputs, flattened): per trained tensor, scaled to ``∂f_j/∂θ`` at width ``P``."""

    outputs: torch.Tensor  # f_0, the system's initial outputs
    local: dict[str, torch.Tensor]  # vector / scalar parameter -> [J, *shape]
    matrices: dict[str, list[MatrixTangent]]
    last: torch.Tensor | None  # [J, rP]: the outputs' fluctuation per particle (NNGP), None without one
    interp: KetInterpreter  # the forward values (feature kernels)


class TangentSystem:
    """One independent particle system of the NT limit: its tangents at initialization, its kernels and
    its training dynamics. ``shard``: this process holds its rank's rows of every width axis of the system
    (``distributed="shard"``); every sum over particles is then all-reduced (:meth:`particle_sum`)."""

    def __init__(self, setup: LimitSetup, particles: int, seed: int, dtype: torch.dtype, device: torch.device,
                 dots: str, lr: float, steps: int = 0, shard: Shard | None = None) -> None:
        self.setup = setup
        self.net = ParticleNetwork(setup, particles, seed, dtype, device, dots, lr, steps=0, frozen=True, shard=shard)
        self.P = particles
        self.shard = shard
        self.dots = dots
        self.steps = steps
        # under weight decay: the forward passes of steps 1..steps, run with the initial one (see tangents)
        self._later: dict[int, tuple[KetInterpreter, dict[str, float]]] = {}

    # -- the tangents ---------------------------------------------------------------------------
    def tangents(self, Z: torch.Tensor) -> Tangents:
        """The forward pass on ``Z`` and one backward pass per output coordinate (one-hot error signals).

        Under weight decay the forward passes of every later step (:meth:`decayed_tangents`) are run here
        too, before any backward pass: a forward ket never depends on the backward Gaussians, but a forward
        pass run after a backward one would get a Stein dot term against them — zero in expectation, and
        noise along the backward kets, which the readout's ``√n``-scaled sum turns into an O(1) error of the
        outputs."""
        interp = self._forward(Z, {})
        decays = self.decays()
        if decays:
            for t in range(1, self.steps + 1):
                shrink = {name: (1 - decay) ** t for name, decay in decays.items()}
                self._later[t] = (self._forward(Z, shrink), shrink)
        return self._backward(interp, {})

    def decayed_tangents(self, t: int) -> Tangents:
        """The tangents at step ``t`` under weight decay (Thm 2.10.3): those of the initial network with every
        trained parameter's initial value scaled by ``(1 − λ)^t``, on the same operators, so they are jointly
        distributed with the tangents of the other steps particle by particle."""
        if t not in self._later:
            raise TplimitsError(f"the tangent system was set up for {self.steps} steps of weight decay (after "
                                f"tangents()); step {t} has no forward pass")
        interp, shrink = self._later.pop(t)
        return self._backward(interp, shrink)

    def decays(self) -> dict[str, float]:
        """The decoupled weight decay ``λ`` of each trained parameter that has one (Eq. 2.50)."""
        return {name: float(self.group(name)["weight_decay"]) for name in self.setup.chosen
                if self.group(name)["weight_decay"]}

    def _forward(self, Z: torch.Tensor, shrink: Mapping[str, float]) -> KetInterpreter:
        """The forward half of the total program on ``Z`` with the initial values of the parameters in ``shrink``
        multiplied by their factors (operators through their ``init_scale``)."""
        net = self.net
        self._scale_operators(shrink)
        values = net.state_values()
        for name, factor in shrink.items():
            if name in net.tensors:
                values[name] = values[name] * factor
        interp = KetInterpreter(self.setup.program, values, net.P, net.dtype, net.device, net.plans, net.t, net.shard)
        with torch.set_grad_enabled(self.dots == "autograd"):
            interp.run(Z, stop=self.setup.total.forward_length)
        return interp

    def _scale_operators(self, shrink: Mapping[str, float]) -> None:
        for name, operator in self.net.operators.items():
            operator.init_scale = shrink.get(name, 1.0)

    def _backward(self, interp: KetInterpreter, shrink: Mapping[str, float]) -> Tangents:
        """One backward pass per output coordinate after the forward pass ``interp`` (run with ``shrink``)."""
        net, total = self.net, self.setup.total
        self._scale_operators(shrink)
        f0 = net.outputs(interp)
        forward = dict(interp.values)
        wanted = _backward_names(total, self.setup.chosen)
        runs: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}
        eye = torch.eye(f0.numel(), dtype=f0.dtype, device=f0.device)
        with torch.set_grad_enabled(self.dots == "autograd"):
            for j in range(f0.numel()):
                interp.cotangents = (eye[j].reshape(f0.shape),)
                interp.run(*interp.flat_inputs, initial_env=forward)
                for name in wanted:
                    runs[name].append(interp.values[name].detach())
        interp.values = forward
        stacked = {name: torch.stack(v) for name, v in runs.items()}
        local, matrices = {}, {}
        for name, grad in total.gradients.items():
            if name not in self.setup.chosen:
                continue
            weight = multiplier(self.setup.chosen[name], self.P) * grad.unit(self.P)
            if grad.kind == "matrix":
                matrices[name] = [self._matrix_tangent(name, term, stacked, forward, weight) for term in grad.terms]
            else:
                local[name] = stacked[grad.value] * weight
        return Tangents(f0, local, matrices, _last_fluctuation(total, stacked, forward, self.particles), interp)

    def _matrix_tangent(self, name: str, term: Any, stacked: Mapping[str, torch.Tensor],
                        forward: Mapping[str, Any], weight: float) -> MatrixTangent:
        operator = self.net.operators[name]
        x = forward[term.vector].detach()
        plan = MatMulPlan.of_gradient_term(term.equation, name, self.setup.program.parameters[name].layout,
                                           operator.in_axis, x.shape)
        dh = torch.stack([plan.canonical(d, plan.out_letters) for d in stacked[term.cotangent]]) * weight
        xc = plan.canonical(x)[None]
        if plan.direction == "forward":
            return MatrixTangent(dh, xc)
        return MatrixTangent(xc, dh)

    # -- kernels --------------------------------------------------------------------------------
    def group(self, name: str) -> dict[str, Any]:
        return self.net.groups[name]

    def ntk(self, tangents: Tangents) -> torch.Tensor:
        """``Σ_θ lr_scale · grad_scale · ⟨∂f_j/∂θ, ∂f_l/∂θ⟩``: ``[J, J]``."""
        J = tangents.outputs.numel()
        K = tangents.outputs.new_zeros(J, J)
        for name, jac in tangents.local.items():
            flat = jac.reshape(J, -1)
            K = K + self._rate(name) * self.particle_sum(flat @ flat.T, name)
        for name, uses in tangents.matrices.items():
            part = K.new_zeros(J, J)
            for a in uses:
                for b in uses:
                    outer, inner = self.particle_sum(_gram(a.out, b.out)), self.particle_sum(_gram(a.inp, b.inp))
                    part = part + (outer * inner).sum(dim=(2, 3, 4))
            K = K + self._rate(name) * part
        return K

    def particle_sum(self, t: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """``t``, a sum over this process's particles, as the whole system's; with ``name``, a sum over the
        entries of that parameter (:meth:`ParticleNetwork.sum_over_ranks`)."""
        total = self.net.sum_over_ranks(name)
        return t if total is None else total(t)

    def particles(self, local: int) -> int:
        """The whole system's size of a width axis of which this process holds ``local`` rows."""
        return local if self.shard is None else local * self.shard.ranks

    def copy_rows(self, t: torch.Tensor, count: int, axis: int) -> torch.Tensor:
        """The first ``count`` particles (the copies) of ``t`` along ``axis``, on every rank."""
        index = (slice(None),) * axis + (slice(count),)
        return t[index] if self.shard is None else self.shard.first_rows(t, count, axis)

    def _rate(self, name: str) -> float:
        group = self.group(name)
        return group["lr_scale"] * group["grad_scale"]

    def nngp(self, tangents: Tangents) -> torch.Tensor:
        """The covariance of the initial outputs, ``[J, J]``, from the fluctuation of the last averages."""
        if tangents.last is None:
            raise TplimitsError("the NNGP needs outputs computed from averages over width (a readout); this "
                                "program's outputs do not fluctuate at initialization")
        count = self.particles(tangents.last.shape[1])
        w = tangents.last - self.particle_sum(tangents.last.sum(dim=1, keepdim=True)) / count
        return self.particle_sum(w @ w.T) / count**2

    # -- dynamics -------------------------------------------------------------------------------
    def dynamics(self, tangents: Tangents, copies: int | None, steps: int) -> KernelDynamics | GridDynamics:
        """The training dynamics of the outputs: by the kernel for a linear rule with plain updates, else on
        grids of ``Q`` values."""
        setup = self.setup
        if setup.rule.linear and setup.param.update == "plain" and setup.clip is None and not self.decays():
            return KernelDynamics(self, tangents, steps)
        return GridDynamics(self, tangents, copies)


class KernelDynamics:
    """``f_{t+1} = f_t − lr · K · Σ_s κ_{t,s} χ_s`` for a linear rule ``Q_t = Σ_s κ_{t,s} g_s``; the
    coefficients ``κ`` come from the rule itself, run on one-hot indicators of the steps."""

    def __init__(self, system: TangentSystem, tangents: Tangents, steps: int) -> None:
        self.K = system.ntk(tangents)
        self.tangents = tangents  # the kets do not move: the tangents at every step
        self.rule, self.hyper, self.lr = system.setup.rule, system.net.hyper, system.net.lr
        self.signals = self.K.new_zeros(max(steps, 1), self.K.shape[0])
        self.state: dict[str, Any] | None = None
        self.moved = self.K.new_zeros(self.K.shape[0])
        self.t = 0

    def step(self, chi: torch.Tensor) -> torch.Tensor:
        """One step with the error signal ``chi``; returns the outputs' displacement from ``f_0`` (flattened)."""
        self.signals[self.t] = chi.reshape(-1)
        indicator = self.signals.new_zeros(self.signals.shape[0])
        indicator[self.t] = 1.0
        state = self.rule.init_state(indicator) if self.state is None else self.state
        kappa, self.state = self.rule.update(state, indicator, self.t, self.hyper)
        self.t += 1
        self.moved = self.moved - self.lr * (self.K @ (kappa @ self.signals))
        return self.moved


class GridDynamics:
    """Every trained tensor's accumulated update, by the finite-width optimizer's own rule (``apply_rule``):
    vector and scalar parameters in full, hidden matrices as ``[F, P_out, copies]`` grids whose columns are a
    fixed subset of the input particles; the outputs move by the Jacobian applied to the accumulated update
    (the Σ over the input particles estimated from the copies).

    Under weight decay (Thm 2.10.3) ``θ_t = (1 − λ)^t θ_0 + Δθ_t`` with ``Δθ_t = (1 − λ) Δθ_{t−1} − lr·Q_t``:
    the grids hold ``Δθ_t`` (``apply_rule`` decays them), and the tangents at step ``t`` are those of the initial
    network with every trained parameter scaled by ``(1 − λ)^t`` on the same particles
    (:meth:`TangentSystem.decayed_tangents`); ``f_t = F((1 − λ)^t θ_0) + ⟨∂F/∂θ at (1 − λ)^t θ_0, Δθ_t⟩``. A step
    costs one backward walk per output coordinate and the same grids whatever ``t``.

    ``in_place`` (default): each grid and its rule state are updated where they lie, a tile of rows at a time
    (:func:`~tplimits.optimizers.base.apply_rule_in_place`, the rule's fast path where it has one), each tile's
    gradient written into one reused buffer; memory is the grids and their states plus two tiles. Normalized and
    clipped updates (the whole update's norm), a state that is not entrywise and tangents that carry an autograd
    graph take the pure rule on whole grids, as ``in_place=False`` does everywhere (the reference the tests
    compare against)."""

    def __init__(self, system: TangentSystem, tangents: Tangents, copies: int | None, in_place: bool = True) -> None:
        self.system, self.tangents = system, tangents
        self.setup = system.setup
        self.in_place = in_place
        self.initial = tangents.outputs  # F(θ_0): the displacement is from it
        self.decays = system.decays()
        self.t = 0
        self.displacement: dict[str, torch.Tensor] = {}
        self.states: dict[str, dict[str, Any]] = {}
        self.copies: dict[str, int] = {}
        for name, uses in tangents.matrices.items():
            p_in = system.particles(uses[0].inp.shape[2])
            whole = self._needs_whole(name)
            chosen = p_in if whole else min(p_in, copies or DEFAULT_COPIES)
            self.copies[name] = chosen
            self.displacement[name] = uses[0].out.new_zeros(uses[0].out.shape[1], uses[0].out.shape[2], chosen)
        self.copy_inputs = self._copy_inputs()
        for name, jac in tangents.local.items():
            self.displacement[name] = torch.zeros_like(jac[0])
        self._buffer = tangents.outputs.new_empty(0)  # every grid tile's gradient, in turn
        self.tile: int | None = None  # entries per tile; None: tile_entries of the device (tests set fewer)

    def _copy_inputs(self) -> dict[str, list[torch.Tensor]]:
        """Each use's input factor at the copies only (``[J or 1, F, copies, K]``; sharded: on every rank)."""
        return {name: [self.system.copy_rows(use.inp, self.copies[name], 2) for use in uses]
                for name, uses in self.tangents.matrices.items()}

    def _needs_whole(self, name: str) -> bool:
        group = self.system.group(name)
        return bool(group["normalize"] or group["clip"] is not None)

    def step(self, chi: torch.Tensor) -> torch.Tensor:
        """One update of every trained tensor for ``chi``; returns the outputs' displacement from ``f_0``."""
        chi = chi.reshape(-1)
        in_place = self.in_place and not self._graph()
        for name, jac in self.tangents.local.items():
            g = torch.einsum("j,j...->...", chi, jac) * self.system.group(name)["grad_scale"]
            if not (in_place and g.ndim and self._tiled(name, g.__getitem__, 0)):
                self._apply(name, g)
        for name, uses in self.tangents.matrices.items():
            if not (in_place and self._tiled(name, self._grid_gradient(name, uses, chi), 1)):
                self._apply(name, self._whole_grid_gradient(name, uses, chi))
        self.t += 1
        if self.decays:
            self.tangents = self.system.decayed_tangents(self.t)
            self.copy_inputs = self._copy_inputs()
        return self.moved()

    def _whole_grid_gradient(self, name: str, uses: Sequence[MatrixTangent], chi: torch.Tensor) -> torch.Tensor:
        """A hidden matrix's scaled gradient on its grid, ``[F, P_out, copies]``, as one fresh tensor."""
        grid = None
        for use, copies in zip(uses, self.copy_inputs[name], strict=True):
            part = _contract(chi, use.out) @ _contract(chi, copies).mT
            grid = part if grid is None else grid + part
        return grid * self.system.group(name)["grad_scale"]

    def _grid_gradient(self, name: str, uses: Sequence[MatrixTangent], chi: torch.Tensor) -> Callable[[slice],
                                                                                                  torch.Tensor]:
        """The tiles ``gradient[:, rows]`` of :meth:`_whole_grid_gradient`, each one product written into the
        reused buffer (valid until the next tile): the uses' factors joined along their components
        (``Σ_u a_u b_uᵀ = [a_1 a_2 …][b_1 b_2 …]ᵀ``), the group's ``grad_scale`` folded into the output side."""
        scale = self.system.group(name)["grad_scale"]
        out = torch.cat([_contract(chi, use.out) for use in uses], dim=2)  # fresh: the tangents stay untouched
        if scale != 1:
            out.mul_(scale)
        inp = torch.cat([_contract(chi, copies) for copies in self.copy_inputs[name]], dim=2).mT  # [F, K, copies]
        buffer = self._buffer

        def tile(part: slice) -> torch.Tensor:
            a = out[:, part]
            shape = (a.shape[0], a.shape[1], inp.shape[2])
            if buffer.numel() < math.prod(shape):
                buffer.resize_(math.prod(shape))
            return torch.matmul(a, inp, out=buffer[: math.prod(shape)].view(shape))

        return tile

    def _tiled(self, name: str, gradient: Callable[[slice], torch.Tensor], axis: int) -> bool:
        """The rule on ``name``'s accumulated update in place, tile by tile along ``axis``, whose (scaled)
        gradient's tiles are ``gradient(rows)``; False, with nothing touched, where it must take the whole tensor
        (see the class)."""
        new_state = apply_rule_in_place(self.setup.rule, self.displacement[name], gradient, self.states.get(name, {}),
                                        self.system.group(name), self.system.net.hyper, axis, self.tile)
        if new_state is None:
            return False
        self.states[name] = new_state
        return True

    def _graph(self) -> bool:
        """Whether the tangents carry an autograd graph (in place would break it; they are detached as built)."""
        tangents = self.tangents
        return torch.is_grad_enabled() and (
            any(jac.requires_grad for jac in tangents.local.values())
            or any(t.requires_grad for uses in tangents.matrices.values() for use in uses for t in (use.out, use.inp)))

    def _apply(self, name: str, g: torch.Tensor) -> None:
        """The pure rule on the whole tensor, ``g`` its scaled gradient."""
        whole = self.system.net.sum_over_ranks(name if name in self.tangents.local else None)
        self.displacement[name], self.states[name] = apply_rule(
            self.setup.rule, self.displacement[name], g, self.states.get(name, {}), self.system.group(name),
            self.system.net.hyper, whole=whole)

    def moved(self) -> torch.Tensor:
        """``f_t − f_0`` over the output coordinates, ``[J]``: ``Σ_θ ⟨∂f/∂θ, Δθ_t⟩``, plus under weight decay the
        change of the initial function with its parameters scaled, ``F((1 − λ)^t θ_0) − F(θ_0)``."""
        J = self.tangents.outputs.numel()
        total = (self.tangents.outputs - self.initial).reshape(J)
        system = self.system
        for name, jac in self.tangents.local.items():
            total = total + system.particle_sum(jac.reshape(J, -1) @ self.displacement[name].reshape(-1), name)
        for name, uses in self.tangents.matrices.items():
            rows = self.copies[name]
            grid = self.displacement[name]
            for use, copies in zip(uses, self.copy_inputs[name], strict=True):
                carried = grid[None] @ copies  # [J or 1, F, P_out, K]
                part = system.particle_sum((use.out * carried).sum(dim=(1, 2, 3)))
                total = total + (part * (system.particles(use.inp.shape[2]) / rows)).expand(J)
        return total


def _contract(chi: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``Σ_j χ_j factor[j]`` for a factor that depends on the output coordinate, else the factor itself."""
    if factor.shape[0] == 1:
        return factor[0]
    return torch.einsum("j,jfpk->fpk", chi, factor)


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_p a[j, f, p, k] b[l, f, p, m]``: ``[J or 1, J or 1, F, K, K]``."""
    return torch.einsum("jfpk,lfpm->jlfkm", a, b)


def _backward_names(total: TotalProgram, chosen: Mapping[str, Any]) -> list[str]:
    """The backward values the tangents are read from: gradients' cotangents, and the last averages'."""
    names: list[str] = []
    for name, grad in total.gradients.items():
        if name in chosen:
            names.extend([grad.value] if grad.kind != "matrix" else [t.cotangent for t in grad.terms])
    names.extend(total.cotangents[avg.name] for avg in last_averages(total) if avg.name in total.cotangents)
    return list(dict.fromkeys(names))


def last_averages(total: TotalProgram) -> list[Avg]:
    """The averages over width after which the forward program computes nothing with a width axis: the
    outputs are functions of them (and of scalars) alone, so the outputs' fluctuation at initialization
    is theirs."""
    forward = total.program.instructions[: total.forward_length]
    users: dict[str, list[str]] = {}
    for ins in forward:
        for name in ins.inputs:
            users.setdefault(name, []).append(ins.name)
    layouts = {ins.name: ins.layout for ins in forward}
    last = []
    for ins in forward:
        if not isinstance(ins, Avg):
            continue
        stack, seen, clean = list(users.get(ins.name, ())), set(), True
        while stack and clean:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            clean = not width_axes(layouts[name])
            stack.extend(users.get(name, ()))
        if clean:
            last.append(ins)
    return last


def _last_fluctuation(total: TotalProgram, stacked: Mapping[str, torch.Tensor], forward: Mapping[str, Any],
                      particles: Callable[[int], int]) -> torch.Tensor | None:
    """``w[j, p]``: output coordinate ``j`` fluctuates at initialization as ``Σ_p w[j, p] / (rP)`` (the
    last averages times their cotangents, particle by particle). ``particles``: the whole system's size of a
    width axis of which the values hold the given rows (:meth:`TangentSystem.particles`)."""
    total_w = None
    for avg in last_averages(total):
        if avg.name not in total.cotangents:
            continue
        u = forward[avg.vector].detach()
        dc = stacked[total.cotangents[avg.name]]  # [J, *avg layout]
        if not avg.keepdim:
            dc = dc.unsqueeze(avg.axis + 1)
        scale = avg.scale.resolve(particles(u.shape[avg.axis])) if avg.scale is not None else 1.0
        w = (dc * u[None] * scale).movedim(avg.axis + 1, -1)
        w = w.reshape(w.shape[0], -1, w.shape[-1]).sum(dim=1)
        if total_w is not None and total_w.shape != w.shape:
            raise TplimitsError(f"the outputs average over width axes of different sizes (%{avg.name}); the "
                                "NNGP of such a program is not computed yet")
        total_w = w if total_w is None else total_w + w
    return total_w


def check_operator_program(setup: LimitSetup, model: torch.nn.Module, inputs: Any) -> None:
    """What the NT limit does not handle, refused by name before any work: non-gradient rules and scalar
    parameters the outputs are not affine in (Remark 2.9.21)."""
    if setup.rules:
        raise TplimitsError(f"parameters {sorted(setup.rules)} are updated by non-gradient rules; the NT limit of "
                            "such rules is not implemented yet (use a feature-learning parametrization)")
    scalars = [name for name in setup.chosen if setup.program.parameters[name].kind == "scalar"]
    curved = _curved_scalars(model, scalars, inputs)
    if curved:
        raise TplimitsError(
            f"scalar parameters {curved} enter the outputs non-linearly (their gradient changes with the "
            "parameters): in the operator regime they move the function outside the tangent picture (Remark "
            "2.9.21), and the NT limit does not track them. Freeze them (requires_grad=False), make them vectors "
            "over the width, or use a feature-learning parametrization (μP), whose limit trains them.")


def _curved_scalars(model: torch.nn.Module, names: Sequence[str], inputs: Any) -> list[str]:
    """The scalar parameters whose gradient of the outputs depends on some parameter (a Hessian-vector
    product at a random model that is not zero): additive ones (an output bias) pass."""
    if not names:
        return []
    params = dict(model.named_parameters())
    with torch.enable_grad():
        out = model(*inputs)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
        grads = torch.autograd.grad((out * weights).sum(), [params[n] for n in names], create_graph=True)
        curved = []
        for name, g in zip(names, grads, strict=True):
            if not g.requires_grad:
                continue
            second = torch.autograd.grad(g.sum(), list(params.values()), allow_unused=True, retain_graph=True)
            if any(s is not None and bool(s.abs().max() > 0) for s in second):
                curved.append(name)
    return curved


def grid_entries(setup: LimitSetup, particles: int, copies: int | None) -> int:
    """Entries of the grids a nonlinear rule keeps per system, for the memory estimate: each trained matrix
    at ``particles`` particles, its input axis cut to the copy population."""
    total = 0
    for name in setup.chosen:
        info = setup.program.parameters[name]
        if info.kind == "matrix":
            sizes = concrete_shape(info.layout, particles)
            total += math.prod(sizes) * min(1.0, (copies or DEFAULT_COPIES) / particles)
    return int(total)


def output_kernel(value: torch.Tensor, rows: int, rows2: int, outputs: Sequence[int]) -> torch.Tensor:
    """A ``[J, J]`` kernel over flattened (row, output) coordinates as ``[N, N2]`` (one output) or
    ``[N, N2, e, e]``, between the first ``rows`` rows and the ``rows2`` after them."""
    e = math.prod(outputs)
    total_rows = value.shape[0] // e
    full = value.reshape(total_rows, e, total_rows, e).permute(0, 2, 1, 3)
    block = full[:rows, rows: rows + rows2] if rows2 else full[:rows, :rows]
    return block[..., 0, 0] if e == 1 else block
