"""The μ-limit of training on Monte Carlo particles (Thm 2.9.25, 2.9.30; MATH.md §6.3, §9, §11).

The ket assignment is the finite-width one at width ``P`` with one change: every initial matrix
is an operator (:class:`~tplimits.limit.kets.MatrixOperator`, hat + dot + accumulated
updates) instead of a dense random matrix. A vector becomes ``[..., r·P, ...]`` particles, Avg a
particle mean (deterministic: detached), Nonlin and Regroup act per particle exactly as at finite
width, and vector and scalar parameters are trained by the very optimizer the finite model uses,
with the parametrization's ``n^{-c}``, ``n^{d}`` and ``n^{-a}`` taken at ``n = P``. Under μP these
factors cancel in every quantity the limit keeps, so the particle system is the limit up to
Monte Carlo error.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch

from tplimits.core.backprop import TotalProgram
from tplimits.core.ir import MatMul, ParameterInfo, Width, concrete_shape
from tplimits.core.program import Program
from tplimits.errors import NotRepresentable, TplimitsError
from tplimits.limit.distributed import Shard
from tplimits.limit.kets import KetInterpreter, MatMulPlan, MatrixOperator, OperatorAction
from tplimits.optimizers.base import GROUP_OPTIONS, UpdateRule, apply_rule, apply_rule_in_place, tile_entries
from tplimits.training.init import InitialValue, coordinate_law, init_std, initial_value, multiplier
from tplimits.training.optim import parameter_groups, rule_groups
from tplimits.training.parametrize import ABCD, Parametrization

DENSE_TILE_ENTRIES = 2**22
"""At most this many entries of a grid of ``Q`` values are updated at once (32 MiB in float64); on CPU the
optimizer's smaller tile (:data:`~tplimits.optimizers.base.CPU_TILE_ENTRIES`) applies."""


@attrs.frozen
class LimitSetup:
    """Everything a particle system needs, independent of the particle count."""

    total: TotalProgram
    param: Parametrization
    chosen: Mapping[str, ABCD]  # trainable parameter -> its abcd (gradient-trained ones)
    rules: Mapping[str, UpdateRule]  # parameter -> the non-gradient rule that updates it
    initial: Mapping[str, InitialValue]
    rule: UpdateRule
    hyper: Mapping[str, Any]
    weight_decay: float
    clip: float | None
    regime: str = "feature learning"  # or "operator": the NT limit (tplimits.limit.nt)
    draws: Mapping[str, Any] = attrs.field(factory=dict)  # fixed-size tensors drawn per system (limit.draws)

    @property
    def program(self) -> Program:
        return self.total.program


def initial_values(program: Program, model: torch.nn.Module,
                   other_widths: Callable[[], Sequence[torch.nn.Module]] = tuple) -> dict[str, InitialValue]:
    """Read from a model at any width how each program parameter is initialized.

    A buffer that grows with width and is not constant must follow a coordinate law (RoPE's ``inv_freq``),
    checked against the same buffer in the models ``other_widths()`` builds (called only for such a buffer).
    """
    values = {name: initial_value(info, operator.attrgetter(name)(model)) for name, info in program.parameters.items()}
    others: Sequence[torch.nn.Module] | None = None
    for name, info in program.parameters.items():
        if values[name].kind != "random" or info.trainable:
            continue
        others = other_widths() if others is None else others
        tensors = [operator.attrgetter(name)(m) for m in (model, *others)]
        law = coordinate_law(info, tensors)
        if law is None:
            sizes = sorted({int(t.shape[info.width_axes[0]]) for t in tensors})
            if isinstance(tensors[0], torch.nn.Parameter):  # requires_grad=False: lowered as a buffer
                raise NotRepresentable(
                    f"parameter {name!r} is frozen (requires_grad=False), so the program holds it as a buffer as "
                    "the model initialized it, and that grows with width and is random: the limit has no initial "
                    "ket for it (a random frozen matrix or vector is not supported yet). Leave it trainable, or "
                    "keep fixed only parameters without a width axis (gains, temperatures, biases of fixed size)")
            raise NotRepresentable(
                f"buffer {name!r} grows with width, is not constant, and its coordinates are no function f(i/m) of "
                f"their relative position that is the same at every width (checked, affine and geometric laws, at "
                f"sizes {sizes}); the limit has no initial ket for it. Make it a parameter (drawn by the "
                "parametrization), or a buffer of fixed size")
        values[name] = InitialValue("coordinate", law)
    return values


class ParticleNetwork:
    """One independent particle system of ``particles`` particles, trained step by step. Under a nonlinear
    rule each hidden matrix keeps its accumulated update as grids of ``Q`` values: the dense grid against
    every particle, or with ``copies`` fewer than the particles two rectangular grids against that copy
    population (:class:`~tplimits.limit.kets.PairGrids`).

    ``shard``: this process holds its rank's rows of every width axis of the system (``distributed="shard"``);
    each random tensor is drawn whole from the system's generator and cut to them, so every rank draws what
    one process draws.
    """

    def __init__(self, setup: LimitSetup, particles: int, seed: int, dtype: torch.dtype, device: str | torch.device,
                 dots: str, lr: float, steps: int, frozen: bool = False, copies: int | None = None,
                 shard: Shard | None = None) -> None:
        self.setup = setup
        self.shard = shard
        self.copies = copies  # a nonlinear rule's copy population (None: every particle, the dense grid)
        self.frozen = frozen  # the kets at initialization only (NT limit): no operator keeps its updates
        self.P = particles
        self.dtype = dtype
        self.device = torch.device(device)
        self.dots = dots
        self.lr = lr
        self.steps = steps
        self.t = 0
        self.reserved = False  # the operators' column stores sized for the run (after its first step here)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        program = setup.program
        self.infos: dict[str, ParameterInfo] = program.parameters
        self.plans: dict[str, MatMulPlan] = {}
        self.tensors: dict[str, torch.Tensor] = {}  # trained tensors of vectors / scalars / fixed buffers
        self.operators: dict[str, MatrixOperator] = {}
        for name, info in self.infos.items():
            self._build(name, info)
        groups = parameter_groups(dict.fromkeys(setup.chosen), program, setup.param, setup.chosen, self.P, lr,
                                  setup.weight_decay, setup.clip)
        groups += rule_groups(dict.fromkeys(setup.rules), setup.rules, setup.param, self.P, lr)
        self.groups = {}
        for g in groups:
            rule = g.get("rule", setup.rule)
            self.groups[g["name"]] = {**GROUP_OPTIONS, **rule.option_defaults, **g, "rule": rule}
        self.hyper = setup.rule.hyper(_hyper_overrides(setup))
        self.update_states: dict[str, dict[str, Any]] = {name: {} for name in self.groups}

    # -- construction -----------------------------------------------------------------------
    def _low_rank(self) -> bool:
        rule = self.setup.rule
        plain = self.setup.param.update == "plain" and self.setup.clip is None
        return rule.linear and plain

    def _build(self, name: str, info: ParameterInfo) -> None:
        init = self.setup.initial[name]
        shape = concrete_shape(info.layout, self.P)
        if init.kind == "fixed":
            self.tensors[name] = init.value.to(device=self.device, dtype=init.dtype_in(self.dtype))
            return
        trainable = info.trainable
        abcd = self.setup.chosen.get(name)
        if info.kind == "matrix" and trainable:
            fan = [a for a in info.fan_in_axes if isinstance(info.layout[a], Width)]
            if len(fan) != 1:
                raise TplimitsError(f"parameter {name!r}: the limit engine needs to know which width axis of the "
                                    f"matrix is its fan-in (found {info.fan_in_axes})")
            in_axis = fan[0]
            out_axis = next(a for a in info.width_axes if a != in_axis)
            scale = multiplier(abcd, self.P) if abcd is not None else 1.0
            if init.kind == "random":
                if abcd is None:
                    raise TplimitsError(f"parameter {name!r} is updated by a non-gradient rule; its limit needs a "
                                        "deterministic initialization (identity or constant)")
                op_init = ("gaussian", scale * init_std(info, abcd, self.P))
            elif init.kind == "identity":
                op_init = ("identity", scale * init.value)
            elif init.value == 0:
                op_init = ("zero", 0.0)
            else:
                raise TplimitsError(f"parameter {name!r}: a matrix initialized to the constant {init.value} is "
                                    "not an operator of bounded norm; initialize it randomly, to zero or to c·I")
            trained = name in self.setup.chosen and not self.frozen
            low_rank = trained and self._low_rank()
            dense = trained and not low_rank
            self.operators[name] = MatrixOperator(name, shape, in_axis, out_axis, op_init, scale, dense,
                                                  self.generator, self.dtype, self.device, self.dots, self.copies,
                                                  self.shard, low_rank=low_rank)
            return
        if init.kind == "constant":
            tensor = torch.full(shape, init.value, dtype=init.dtype_in(self.dtype), device=self.device)
        elif init.kind == "coordinate":  # f(U), U ~ Uniform(0, 1) once per particle
            tensor = init.value.sample(shape[init.value.axis], self.generator, self.dtype, self.device)
        elif abcd is None:
            raise TplimitsError(f"buffer {name!r} grows with width and is not constant; the limit engine cannot "
                                "sample it")
        else:
            std = init_std(info, abcd, self.P)
            tensor = torch.randn(shape, generator=self.generator, dtype=self.dtype, device=self.device) * std
        self.tensors[name] = tensor if self.shard is None else self.shard.width_rows(tensor, info.layout).contiguous()

    # -- one step -------------------------------------------------------------------------------
    def state_values(self) -> dict[str, Any]:
        """The assignment: effective vectors / scalars (multiplier applied, fresh tensors) and operators."""
        values: dict[str, Any] = {}
        for name, tensor in self.tensors.items():
            abcd = self.setup.chosen.get(name)
            # no multiplier, no product: ``tensor * 1.0`` would turn an integer buffer (token-type ids) into floats
            values[name] = tensor * multiplier(abcd, self.P) if abcd is not None else tensor.clone()
        values.update(self.operators)
        return values

    def interpreter(self) -> KetInterpreter:
        for matrix in self.operators.values():  # a new pass: the kets the last one sampled are no factors
            matrix.forget_applications()
        return KetInterpreter(self.setup.program, self.state_values(), self.P, self.dtype, self.device, self.plans,
                              self.t, self.shard)

    def forward(self, inputs: Sequence[Any]) -> KetInterpreter:
        """The forward half of the total program on ``inputs``; the interpreter keeps its values."""
        interp = self.interpreter()
        with torch.set_grad_enabled(self.dots == "autograd"):
            interp.run(*inputs, stop=self.setup.total.forward_length)
        return interp

    def outputs(self, interp: KetInterpreter) -> torch.Tensor:
        names = self.setup.program.outputs
        if len(names) != 1:
            raise TplimitsError(f"the limit engine trains models with one output tensor; this one has {len(names)}")
        return interp.values[names[0]].detach()

    def backward_and_update(self, interp: KetInterpreter, chi: torch.Tensor) -> None:
        """Run the backward half of the total program with error signal ``chi`` and apply one update."""
        if self.t >= self.steps:
            raise TplimitsError(f"the particle system was set up for {self.steps} steps")
        interp.cotangents = (chi.to(dtype=self.dtype, device=self.device),)
        with torch.set_grad_enabled(self.dots == "autograd"):
            interp.run(*interp.flat_inputs, initial_env=interp.values)
            self._update(interp)
        for matrix in self.operators.values():
            matrix.forget_applications()
        self.t += 1
        if not self.reserved:  # one step shows the columns a step adds: room for the rest (and a last forward)
            for op in self.operators.values():
                op.reserve(self.steps - self.t + 1)
            self.reserved = True

    def _update(self, interp: KetInterpreter) -> None:
        values = interp.values
        for name, grad in self.setup.total.gradients.items():
            if name not in self.setup.chosen:
                continue
            weight = multiplier(self.setup.chosen[name], self.P) * grad.unit(self.P)
            if grad.kind == "matrix":
                self._matrix_gradient(name, grad.terms, values, weight)
            else:
                self.tensors[name] = self._step(name, self.tensors[name], values[grad.value] * weight)
        for name in self.setup.rules:
            self._rule_update(name, interp)

    def _step(self, name: str, tensor: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The finite-width optimizer's update of one trained tensor, as a pure function (the autograd
        graph of ``g`` is kept, so later kets differentiate through the parameter's history)."""
        group = self.groups[name]
        new, self.update_states[name] = apply_rule(self.setup.rule, tensor, g * group["grad_scale"],
                                                   self.update_states[name], group, self.hyper,
                                                   whole=self.sum_over_ranks(name))
        return new

    def sum_over_ranks(self, name: str | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What turns a sum over this rank's entries (of parameter ``name``; by default over particles) into the
        whole system's (:func:`apply_rule`'s ``whole``); None where this process holds every entry: one process,
        or a parameter with no width axis."""
        if self.shard is None or name is not None and not self.infos[name].width_axes:
            return None
        return self.shard.sum

    def _matrix_gradient(self, name: str, terms: Sequence[Any], values: Mapping[str, Any], weight: float) -> None:
        operator = self.operators[name]
        if operator.dense is not None:
            parts = [(term.equation, values[term.cotangent], values[term.vector]) for term in terms]
            operator.dense, self.update_states[name] = self._grid_step(
                name, operator.dense, self.update_states[name], operator.out_axis,
                lambda rows: operator.dense_gradient(parts, rows) * weight)
        elif operator.pairs is not None:
            self._pair_step(name, operator, self._gradient_factors(name, operator, terms, values, weight))
        else:
            for out_factor, in_factor in self._gradient_factors(name, operator, terms, values, 1.0):
                operator.add_factor(out_factor, in_factor, self.t, weight)
            self._linear_step(name, operator)
            return
        operator.init_scale *= 1 - self.groups[name]["weight_decay"]

    def _gradient_factors(self, name: str, operator: MatrixOperator, terms: Sequence[Any], values: Mapping[str, Any],
                          weight: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each gradient term as canonical factors ``(out [F, P_out, K], in [F, P_in, K])``: the term is
        ``out · inᵀ``, its cotangent side multiplied by ``weight``."""
        layout = self.infos[name].layout
        factors = []
        for term in terms:
            plan = MatMulPlan.of_gradient_term(term.equation, name, layout, operator.in_axis,
                                               values[term.vector].shape)
            dh = plan.canonical(values[term.cotangent], plan.out_letters) * weight
            x = plan.canonical(values[term.vector])
            factors.append((dh, x) if plan.direction == "forward" else (x, dh))
        return factors

    def _pair_step(self, name: str, operator: MatrixOperator,
                   factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The rule on both grids of a copy population (:class:`~tplimits.limit.kets.PairGrids`), each with
        its own optimizer state; the terms' components are joined so each tile is one product."""
        pairs = operator.pairs
        out_factor = torch.cat([o.detach() for o, _ in factors], dim=2).mul_(self.groups[name]["grad_scale"])
        in_factor = torch.cat([i.detach() for _, i in factors], dim=2)
        copies = pairs.copy_rows(out_factor, pairs.c_out), pairs.copy_rows(in_factor, pairs.c_in)
        states = self.update_states[name] or {"forward": {}, "transposed": {}}
        buffer = out_factor.new_empty(0)  # every tile's gradient, in turn
        for which, grid in pairs.grids().items():
            new, states[which] = self._grid_step(
                name, grid, states[which], 1,
                lambda rows, which=which: pairs.gradient(which, out_factor, in_factor, rows, copies, buffer),
                pairs.norm_scale(which), scaled=True)
            setattr(pairs, which, new)
        self.update_states[name] = states

    def _grid_step(self, name: str, grid: torch.Tensor, state: Mapping[str, Any], axis: int,
                   gradient: Callable[[slice], torch.Tensor], norm_scale: float = 1.0,
                   scaled: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        """The rule on a grid of ``Q`` values (§11.4) whose gradient's entries ``rows`` along ``axis`` are
        ``gradient(rows)``, a tile of rows at a time, in place (:func:`apply_rule_in_place`): memory is the
        grid and its optimizer state plus one tile. Normalized / clipped updates, whose norm is the whole
        update's (``norm_scale`` times the grid's: a copy grid holds a sample of the dense grid's entries),
        and a state that is not entrywise take the whole grid at once. Returns the grid (the same tensor,
        unless the whole grid was replaced) and its new state. ``scaled``: ``gradient`` includes the group's
        ``grad_scale`` already."""
        group = self.groups[name]
        scale = 1.0 if scaled else group["grad_scale"]
        tile = min(DENSE_TILE_ENTRIES, tile_entries(grid.device))
        new_state = None if torch.is_grad_enabled() else apply_rule_in_place(
            self.setup.rule, grid, lambda rows: _scaled(gradient(rows), scale), state, group, self.hyper, axis, tile)
        if new_state is not None:
            return grid, new_state
        # `* scale` makes a fresh tensor even at 1: the rule's state may keep it, and a copy grid's gradient is
        # written into a buffer the next grid reuses
        return apply_rule(self.setup.rule, grid, gradient(slice(None)) * scale, state, group, self.hyper, norm_scale,
                          whole=self.sum_over_ranks())

    def _uses(self, target: str) -> list[MatMul]:
        """The forward MatMul instructions that multiply by parameter ``target``."""
        program = self.setup.program
        names = {ins.name for ins in program.instructions if getattr(ins, "target", None) == target}
        return [ins for ins in program.instructions[: self.setup.total.forward_length]
                if isinstance(ins, MatMul) and ins.matrix in names]

    def _linear_step(self, name: str, operator: MatrixOperator) -> None:
        """One step of a linear rule on the factor coefficients: ``Q_t = Σ_s κ_{t,s} g_s``, found by running
        the rule on one-hot gradient indicators."""
        group = self.groups[name]
        rule = group["rule"]
        operator.ensure_steps(self.steps)
        indicator = operator.coefficients.new_zeros(self.steps)
        indicator[self.t] = group["grad_scale"]
        state = self.update_states[name] or {"q_state": rule.init_state(indicator)}
        q, q_state = rule.update(state["q_state"], indicator, self.t, self.hyper)
        self.update_states[name] = {"q_state": q_state}
        decay = 1 - group["weight_decay"]
        operator.scale_coefficients(decay)
        operator.add_increments(-group["lr"] * group["lr_scale"] * q)
        self._remember_memory(name, operator)
        operator.init_scale *= decay

    def _rule_update(self, name: str, interp: KetInterpreter) -> None:
        """A non-gradient rule on its matrix, through the same ``signal`` / ``rescale`` functions the
        finite optimizer runs: the signal's outer products become low-rank factors of the operator
        (``Aᵀ B / (K·P)``), the rule's update runs on their coefficients, and the rescaling multiplies
        the whole operator."""
        group = self.groups[name]
        rule = group["rule"]
        if not rule.linear:
            raise TplimitsError(f"parameter {name!r} is updated by the non-gradient rule {rule.name!r}, which is not "
                                "linear in its signal; the limit engine keeps such updates as low-rank factors and "
                                "needs a linear rule (linear=True)")
        uses = self._uses(name)
        if len(uses) != 1:
            raise TplimitsError(f"parameter {name!r} is used {len(uses)} times; its non-gradient rule "
                                f"{rule.name!r} needs the input of one layer")
        operator = self.operators[name]
        action = OperatorAction(operator)
        use = uses[0]
        plan = interp.plan(use)
        # Not detached: with autograd dots, later kets depend on the Gaussians through these factors too.
        x = plan.canonical(interp.values[use.vector])[0].T  # rows [K, P]
        z_old = plan.canonical(interp.values[use.name], plan.out_letters)[0].T
        hyper = {k: group[k] for k in rule.defaults}
        A, B = rule.signal(action, x, hyper)
        if self.shard is not None and f"rule {name}" not in self.shard.checked:
            self._check_coordinatewise_signal(name, operator, x, hyper, (A, B))
        operator.ensure_steps(self.steps)
        operator.add_factor(A.T[None], B.T[None] / (A.shape[0] * self.P), self.t)
        self._linear_step(name, operator)
        if rule.rescale is not None:
            z_new = action(x)
            if self.shard is not None:  # the rule averages inside its own code: it sees the whole system's rows
                z_old, z_new = self.shard.whole(z_old), self.shard.whole(z_new)
            s = rule.rescale(z_old, z_new, hyper).detach()  # a ratio of particle means: deterministic
            operator.scale_coefficients(s)
            operator.init_scale *= float(s)

    def _check_coordinatewise_signal(self, name: str, operator: MatrixOperator, x: torch.Tensor,
                                     hyper: Mapping[str, Any], signal: tuple[torch.Tensor, torch.Tensor]) -> None:
        """A sharded system's rule gets this rank's particles (coordinates) of its layer's input, so its ``signal``
        must act on them coordinate by coordinate, through ``R`` alone (an average over coordinates of its own
        would be this rank's only). Checked once, at the rule's first step, where ``R`` is still a multiple of the
        identity: the signal of the whole system's particles, cut to this rank's, must be the one this rank
        computed."""
        rule = self.groups[name]["rule"]
        scale = operator.init_value * operator.init_scale if operator.kind == "identity" else 0.0
        with torch.no_grad():
            whole = rule.signal(_ScaledIdentity(scale), self.shard.whole(x), hyper)
        tol = 256 * torch.finfo(x.dtype).eps
        differs = any(not torch.allclose(self.shard.rows(full, 1), mine.detach(), rtol=tol,
                                         atol=tol * float(full.abs().max()))
                      for full, mine in zip(whole, signal, strict=True))
        if self.shard.any(differs):
            raise TplimitsError(f"distributed='shard': the signal of rule {rule.name!r} (parameter {name!r}) is not "
                                "computed coordinate by coordinate from R's products, so on a rank's particles it "
                                "differs from the whole system's; use distributed=True")
        self.shard.checked.add(f"rule {name}")

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """A snapshot: later steps (which update dense grids in place) do not change it."""
        return _snapshot({
            "step": self.t,
            "tensors": self.tensors,
            "operators": {k: op.state_dict() for k, op in self.operators.items()},
            "update_states": self.update_states,
            "generator": self.generator.get_state(),
        })

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = _snapshot(state)  # the system updates its grids in place; the caller's copy stays as it was
        self.t = state["step"]
        self.reserved = False  # restored column stores are sized for what they hold: reserve after the next step
        self.tensors.update(state["tensors"])
        self.update_states = dict(state["update_states"])
        for name, op in self.operators.items():
            op.load_state_dict(state["operators"][name])
            self._remember_memory(name, op)
        self.generator.set_state(state["generator"])

    def _remember_memory(self, name: str, operator: MatrixOperator) -> None:
        """Hand the operator of ``name`` its linear rule's memory (the per-step tensors of the rule's state), which
        its next fold reads; nothing for a parameter without a linear rule's state."""
        q_state = (self.update_states.get(name) or {}).get("q_state")
        if q_state is not None:
            operator.set_memory(self.groups[name]["rule"].name, _per_step_tensors(q_state, operator.coefficients.shape))


@attrs.frozen
class _ScaledIdentity:
    """``R = scale · I`` as a :class:`~tplimits.optimizers.base.MatrixAction`, on rows of any width."""

    scale: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def transpose(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale


def _per_step_tensors(state: Any, shape: torch.Size) -> list[torch.Tensor]:
    """The tensors of a linear rule's state run on per-step indicators (:meth:`ParticleNetwork._linear_step`)
    that are shaped like them, in dicts, lists and tuples: the rule's memory of each step."""
    if torch.is_tensor(state):
        return [state] if state.shape == shape else []
    if isinstance(state, Mapping):
        state = list(state.values())
    if isinstance(state, list | tuple):
        return [t for item in state for t in _per_step_tensors(item, shape)]
    return []


def grid_entries(setup: LimitSetup, particles: int, copies: int | None) -> int:
    """Entries of the grids of ``Q`` values one system of ``particles`` keeps under a nonlinear rule (one
    grid's worth; the rule's state holds as many again per state tensor): the dense ``P_out·P_in`` per hidden
    matrix, or with ``copies`` fewer than the particles of an axis, ``P_out·c_in + c_out·P_in``."""
    total = 0
    for name in setup.chosen:
        info = setup.program.parameters[name]
        if info.kind != "matrix":
            continue
        sizes = concrete_shape(info.layout, particles)
        p_a, p_b = (sizes[a] for a in info.width_axes[:2])
        fixed = math.prod(sizes) // (p_a * p_b)
        if copies is None or copies >= max(p_a, p_b):
            total += fixed * p_a * p_b
        else:
            total += fixed * (p_a * min(copies, p_b) + p_b * min(copies, p_a))
    return total


def _scaled(g: torch.Tensor, scale: float) -> torch.Tensor:
    """A grid tile's fresh gradient times ``scale``, in place (a tile-sized temporary costs page faults on CPU)."""
    return g if scale == 1 else g.mul_(scale)


def _snapshot(value: Any) -> Any:
    """A copy of nested dicts / lists of tensors that later in-place updates (dense tiles) leave alone."""
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_snapshot(v) for v in value)
    return value


def _hyper_overrides(setup: LimitSetup) -> dict[str, Any]:
    return {k: v for k, v in setup.hyper.items() if k in setup.rule.defaults}
