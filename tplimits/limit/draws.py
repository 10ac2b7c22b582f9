"""Fixed-size tensors initialized at random: drawn anew for every independent particle system.

A tensor with no width axis (a readout bias, a learnable gain or temperature, a small random buffer)
is the same object in the limit as at finite width, so the limit must start it from the law the
finite models draw it from, not from one draw of it. Where that law comes from:

* the parametrization (:class:`DeclaredLaw`): a trained tensor that :mod:`tplimits.training.init`
  classifies ``fixed`` is redrawn by every finite model as ``N(0, (C·b_const·n^{-b})²)``; the limit
  draws it so, at ``n = P`` like every abcd factor;
* the architecture (:class:`ModuleLaw`): a tensor the parametrization keeps as the model built it
  (one entry, all entries equal, a buffer) but that differs between two seeds. Its law is the
  model's: if the same seed gives the same draw at both traced widths, or the draws of
  :data:`LAW_SEEDS` seeds at the lowered width and at :data:`LAW_WIDTH_RATIO` times it have the same
  mean and spread, the limit builds the model at the lowered width with a seed of its own per system
  and reads the tensor. A spread that shrinks with width (``nn.Linear``'s bias, ``U(±1/√fan_in)``)
  while the mean stays has a constant limit, the mean (:class:`ConstantLaw`); a mean that moves or a
  spread that grows has no law the limit could use: :class:`~tplimits.errors.UnknownInitLaw` names
  the tensor.

Each system's draw is a function of its seed alone, so a resumed or distributed run draws the same,
and the standard errors across systems contain the law's spread: the limit is the mixture over it.
Conditional on one draw (``Limit.train(..., draw_seed=s)``, every system the draw of ``s``) the limit is
deterministic again, and :func:`share_draws` gives finite models at any width the same draw, so the two can be
compared seed by seed (``Limit.check(..., shared_draws=True)``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping

import attrs
import torch

from tplimits.core.ir import ParameterInfo, width_axes
from tplimits.core.program import Program
from tplimits.errors import UnknownInitLaw
from tplimits.training.family import Family
from tplimits.training.init import InitialValue, init_std
from tplimits.training.model import ParametrizedModel, trained_tensor
from tplimits.training.parametrize import ABCD

DRAW_SEED_OFFSET = 2**40
"""Added to a system's seed before it draws: the limit's draws stay independent of the finite models'
seeds ``0, 1, …`` (which a check compares them with)."""


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


@attrs.frozen
class ConstantLaw:
    """A draw whose spread vanishes with width: its limit is the constant ``value`` (the mean of the draws)."""

    value: torch.Tensor = attrs.field(eq=False)

    def sample(self, seed: int, particles: int) -> torch.Tensor:
        return self.value.clone()


Law = DeclaredLaw | ModuleLaw | ConstantLaw

LAW_SEEDS = 48
"""Seeds whose draws of a tensor compare its law at two widths."""

LAW_WIDTH_RATIO = 8
"""The second width the law is compared at, as a multiple of the lowered width."""

FLAT_SLOPE = 0.25
"""A spread that changes with width more slowly than ``width^±1/4`` (over the ratio above, 3.6 standard errors
of the estimate for Gaussian draws) is the same law; ``n^-1/2`` shrinks."""


def fixed_size_initial(fam: Family, program: Program, chosen: Mapping[str, ABCD],
                       initial: Mapping[str, InitialValue]) -> tuple[dict[str, InitialValue], dict[str, Law]]:
    """``initial`` with the limit's constant of every fixed-size tensor whose random draw has one, and the law
    of every other fixed-size tensor the finite models draw at random (by name), which each particle system
    draws from. Deterministic tensors (constants, fixed tables, anything equal across seeds) stay as they are."""
    laws = random_fixed_laws(fam, program, chosen, initial)
    constants = {name: law for name, law in laws.items() if isinstance(law, ConstantLaw)}
    return drawn_initial(initial, constants, 0, 0), {k: v for k, v in laws.items() if k not in constants}


def random_fixed_laws(fam: Family, program: Program, chosen: Mapping[str, ABCD],
                      initial: Mapping[str, InitialValue]) -> dict[str, Law]:
    """The law of every fixed-size tensor of ``program`` that the finite models draw at random (by name);
    deterministic ones are left out."""
    names = [name for name, info in program.parameters.items() if not width_axes(info.layout)]
    laws: dict[str, Law] = {name: DeclaredLaw(program.parameters[name], chosen[name]) for name in names
                            if name in chosen and initial[name].redrawn}
    drawn = [name for name in names if name not in laws and fam.build is not None]
    if not drawn:
        return laws
    draws = _Draws(fam, drawn)
    width = program.width
    for name in drawn:
        if torch.equal(draws.of(name, width, 0), draws.of(name, width, 1)):
            continue  # deterministic
        if all(torch.equal(draws.of(name, width, s), draws.of(name, w, s)) for w in fam.trace_widths for s in (0, 1)):
            laws[name] = ModuleLaw(name, fam, width)  # the same draw at every width
            continue
        laws[name] = _law_between(fam, name, program.parameters[name].shape, draws, width)
    return laws


class _Draws:
    """The values of some fixed-size tensors in the family's models, by (width, seed): each model built once."""

    def __init__(self, fam: Family, names: list[str]) -> None:
        self.fam, self.names = fam, names
        self.values: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def of(self, name: str, width: int, seed: int) -> torch.Tensor:
        if (width, seed) not in self.values:
            model = self.fam.model(width, seed=seed)
            self.values[width, seed] = {n: operator.attrgetter(n)(model).detach().clone() for n in self.names}
        return self.values[width, seed][name]


def _law_between(fam: Family, name: str, shape: tuple[int, ...], draws: _Draws, width: int) -> Law:
    """The law of ``name``'s draws, compared at ``width`` and ``LAW_WIDTH_RATIO`` times it over ``LAW_SEEDS``
    seeds: the same (a :class:`ModuleLaw`), a spread that shrinks to a constant mean, or else refused."""
    wide = LAW_WIDTH_RATIO * width
    samples = [torch.stack([draws.of(name, w, s).to(torch.float64) for s in range(LAW_SEEDS)]) for w in (width, wide)]
    means = [x.mean(0) for x in samples]
    spreads = [float(x.std(0).square().mean().sqrt()) for x in samples]
    mean_gap = float((means[1] - means[0]).square().mean().sqrt())
    mean_se = math.sqrt((spreads[0] ** 2 + spreads[1] ** 2) / LAW_SEEDS)
    slope = math.log(max(spreads[1], 1e-300) / max(spreads[0], 1e-300)) / math.log(LAW_WIDTH_RATIO)
    if mean_gap <= 4 * mean_se and abs(slope) <= FLAT_SLOPE:
        return ModuleLaw(name, fam, width)
    if mean_gap <= 4 * mean_se and slope < -FLAT_SLOPE:
        return ConstantLaw(means[1].to(draws.of(name, width, 0).dtype))
    raise UnknownInitLaw(
        f"parameter {name!r} (no width axis, shape {tuple(shape)}) is drawn at random by the model from a law that "
        f"changes with width: over {LAW_SEEDS} seeds at widths {width} and {wide} its mean moves by {mean_gap:.3g} "
        f"(± {mean_se:.3g}) and its spread scales like width^{slope:.2f}, so the limit has no law to draw it from. "
        "Draw it from a law that does not depend on the width (or whose spread vanishes with it), initialize it to "
        "a constant, or give it a width axis", parameter=name)


def drawn_initial(initial: Mapping[str, InitialValue], laws: Mapping[str, Law], seed: int,
                  particles: int) -> dict[str, InitialValue]:
    """``initial`` with every law's tensor drawn for the system of ``seed`` (``particles`` per system)."""
    return {**initial, **{name: InitialValue("fixed", law.sample(seed, particles), initial[name].dtype)
                          for name, law in laws.items()}}


def share_draws(model: ParametrizedModel, laws: Mapping[str, Law], seed: int, width: int) -> None:
    """Give a finite model at ``width`` (and its frozen initial copy, when centered) the draw of ``seed`` of every
    tensor in ``laws``: the draw the limit's systems take with ``draw_seed=seed`` — the same standard normals scaled
    to ``width`` for a law the parametrization declares, the same tensor for the architecture's own (its law does not
    depend on width)."""
    for name, law in laws.items():
        value = law.sample(seed, width)
        for copy in (model.model, model.initial):
            if copy is not None:
                with torch.no_grad():
                    trained_tensor(copy, name).copy_(value)
