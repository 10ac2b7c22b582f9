"""Fixed-size tensors initialized at random: drawn anew for every independent particle system.

A tensor with no width axis (a readout bias, a learnable gain or temperature, a small random buffer)
is the same object in the limit as at finite width, so the limit must start it from the law the
finite models draw it from, not from one draw. Two laws are known:

* the parametrization's (:class:`DeclaredLaw`): a trained tensor that :mod:`tplimits.training.init`
  classifies ``fixed`` is redrawn by every finite model as ``N(0, (C·b_const·n^{-b})²)``; the limit
  draws it so, at ``n = P`` like every abcd factor;
* the architecture's own (:class:`ModuleLaw`): a tensor the parametrization keeps as the model
  built it (one entry, all entries equal, a buffer) but that differs between two seeds. The limit
  builds the model at the lowered width with a seed of its own per system and reads the tensor,
  provided the law does not depend on width: the same seed must give the same draw at both traced
  widths. Where it does not, and the tensor's effect on the outputs at initialization does not
  vanish with width (it is Θ(1) there, so its law matters in the limit), the law in the limit is
  unknown and :class:`~tplimits.errors.UnknownInitLaw` names the parameter. A tensor whose effect
  vanishes (μP's readout bias, behind the output multiplier 1/n) keeps the reference draw: its
  value does not enter the limit.

Each system's draw is a function of its seed alone, so a resumed or distributed run draws the same,
and the standard errors across systems contain the law's spread: the limit is the mixture over it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping

import attrs
import torch
from torch.utils import _pytree as pytree

from tplimits.core.ir import ParameterInfo, width_axes
from tplimits.core.program import Program
from tplimits.errors import UnknownInitLaw
from tplimits.optimizers.base import UpdateRule
from tplimits.training.family import Family
from tplimits.training.init import InitialValue, init_std
from tplimits.training.instantiate import instantiate_family
from tplimits.training.model import trained_tensor
from tplimits.training.parametrize import ABCD, Parametrization

DRAW_SEED_OFFSET = 2**40
"""Added to a system's seed before it draws: the limit's draws stay independent of the finite models'
seeds ``0, 1, …`` (which a check compares them with)."""

VANISHING_SLOPE = -0.75
"""A tensor whose effect on the outputs after a training step falls faster than ``width^-1/2`` (μP's readout
bias: ``width^-1``) does not enter the limit."""


@attrs.frozen
class DeclaredLaw:
    """``N(0, (C·b_const·P^{-b})²)``: the parametrization's redraw of a fixed-size trained tensor."""

    info: ParameterInfo
    abcd: ABCD

    def sample(self, seed: int, particles: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed + DRAW_SEED_OFFSET)
        draw = torch.randn(self.info.shape, generator=generator, dtype=torch.float64)
        return draw * init_std(self.info, self.abcd, particles)


@attrs.frozen
class ModuleLaw:
    """The architecture's own draw of tensor ``name``, from the family's model at ``width`` (a law that is
    the same at every width)."""

    name: str
    family: Family = attrs.field(eq=False, repr=False)
    width: int

    def sample(self, seed: int, particles: int) -> torch.Tensor:
        model = self.family.model(self.width, seed=seed + DRAW_SEED_OFFSET)
        return operator.attrgetter(self.name)(model).detach().clone()


Law = DeclaredLaw | ModuleLaw


def random_fixed_laws(fam: Family, program: Program, param: Parametrization, rule: UpdateRule,
                      chosen: Mapping[str, ABCD], initial: Mapping[str, InitialValue]) -> dict[str, Law]:
    """The law of every fixed-size tensor of ``program`` that the finite models draw at random (by name);
    deterministic ones (constants, fixed tables, anything equal across seeds) are left out."""
    laws: dict[str, Law] = {}
    others: dict[tuple[int, int], torch.nn.Module] = {}

    def value(width: int, seed: int, name: str) -> torch.Tensor:
        if (width, seed) not in others:
            others[width, seed] = fam.model(width, seed=seed)
        return operator.attrgetter(name)(others[width, seed]).detach()

    width = program.width
    for name, info in program.parameters.items():
        if width_axes(info.layout):
            continue
        if name in chosen and initial[name].redrawn:
            laws[name] = DeclaredLaw(info, chosen[name])
            continue
        if fam.build is None or torch.equal(value(width, 0, name), value(width, 1, name)):
            continue  # deterministic (or one fixed module, the same for every finite model)
        wider = [w for w in fam.trace_widths if w != width]
        if wider and all(torch.equal(value(width, s, name), value(wider[0], s, name)) for s in (0, 1)):
            laws[name] = ModuleLaw(name, fam, width)
            continue
        slope = _effect_slope(fam, param, rule, name, (width, 4 * width))
        if slope is not None and slope <= VANISHING_SLOPE:
            continue
        effect = "could not be measured" if slope is None else f"after one step scales like width^{slope:.2f}"
        raise UnknownInitLaw(
            f"parameter {name!r} (no width axis, shape {tuple(info.shape)}) is drawn at random by the model, and its "
            f"draw at the same seed differs between widths {fam.trace_widths}: its law may depend on the width, so its "
            f"law in the limit is unknown, and its effect on the outputs {effect}. Draw it from a law that does not "
            "depend on width (e.g. before the layers whose size grows with width, or from its own torch.Generator), "
            "initialize it to a constant, or give it a width axis", parameter=name)
    return laws


def _effect_slope(fam: Family, param: Parametrization, rule: UpdateRule, name: str,
                  widths: tuple[int, ...]) -> float | None:
    """The log-log slope against width of how much one training step's change of the outputs (of the
    parametrized models of a few seeds, on the lowering's inputs towards targets 1) moves when ``name`` starts
    ``EFFECT_STEP`` higher: the effect a tensor has on training (μP's outputs at initialization are
    ``O(n^-1/2)`` whatever feeds them, so the effect on them says nothing). None where there is one width;
    ``-inf`` where it has no effect."""
    sizes = [_one_step_effect(fam, param, rule, name, width) for width in widths]
    if len(sizes) < 2:
        return None
    if max(sizes) == 0.0:
        return -math.inf
    if min(sizes) == 0.0:
        return None
    return math.log(sizes[1] / sizes[0]) / math.log(widths[1] / widths[0])


EFFECT_STEP = 1e-4
"""The change of a fixed-size tensor's initial value whose effect on training :func:`_effect_slope` measures."""


def _one_step_effect(fam: Family, param: Parametrization, rule: UpdateRule, name: str, width: int) -> float:
    """The RMS over :data:`EFFECT_SEEDS` models of the change of one step's output change (see
    :func:`_effect_slope`): a single model's can be near zero by chance."""
    return math.sqrt(sum(_seed_effect(fam, param, rule, name, width, seed) ** 2 for seed in EFFECT_SEEDS))


EFFECT_SEEDS = (0, 1, 2, 3)


def _seed_effect(fam: Family, param: Parametrization, rule: UpdateRule, name: str, width: int, seed: int) -> float:
    after = []
    for shift in (0.0, EFFECT_STEP):
        model, opt = instantiate_family(fam, width=width, param=param, rule=rule, lr=0.5, seed=seed,
                                        update_rules=fam.update_rules)
        inputs = _inputs_like(model, fam.inputs)
        with torch.no_grad():
            trained_tensor(model.model, name).add_(shift)
        out = _output(model(*inputs))
        (out - 1.0).square().mean().backward()
        opt.step()
        with torch.no_grad():
            after.append(_output(model(*inputs)) - out.detach())
    return float((after[1] - after[0]).norm())


def _inputs_like(model: torch.nn.Module, inputs: tuple) -> tuple:
    """The lowering's example inputs in the model's floating dtype."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    return pytree.tree_map(lambda t: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t, inputs)


def _output(value: object) -> torch.Tensor:
    return next(t for t in pytree.tree_leaves(value) if torch.is_tensor(t) and t.is_floating_point())


def drawn_initial(initial: Mapping[str, InitialValue], laws: Mapping[str, Law], seed: int,
                  particles: int) -> dict[str, InitialValue]:
    """``initial`` with every law's tensor drawn for the system of ``seed`` (``particles`` per system)."""
    return {**initial, **{name: InitialValue("fixed", law.sample(seed, particles), initial[name].dtype)
                          for name, law in laws.items()}}
