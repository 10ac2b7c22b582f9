"""abcd-parametrizations (Def 2.2.1, 2.9.7); their classification is :mod:`tplimits.training.classify`.

A parameter tensor ``W`` of the program is trained as ``w`` with

* (a) multiplier: ``W = C_a · n^{-a} · w``;
* (b) initialization: ``w ~ N(0, (C_b · n^{-b})²)`` (``C_b`` the fan-in constant of the fixed axes);
* (c) learning rate ``η · C_c · n^{-c}``;
* (d) gradients multiplied by ``n^{d}`` before the update function Q;

and the output is ``n^{-a_out}`` times the program's output (Def 2.9.7, footnote 32). Each power
of width has a tunable constant in front (Remark 2.2.5).

The exponents are set per *role*, which the program determines:

===========  =================================================================  ==========
role         parameters                                                          MLP column
===========  =================================================================  ==========
``hidden``   matrices (two width axes)                                           l ∈ [2, L]
``input``    vectors never summed over their width axis: first-layer weights,   l = 1
             embeddings, biases, gains
``output``   vectors summed over their width axis (readouts)                    l = L + 1
``scalar``   scalars                                                            –
===========  =================================================================  ==========

For μP and NTP, ``input`` and ``output`` share the general "vector" column of Def 2.9.11/2.9.12;
SP initializes readouts by fan-in (b = 1/2), which is why the roles are kept apart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

import attrs

from tplimits.core.program import Program
from tplimits.errors import TplimitsError

ROLES = ("hidden", "input", "output", "scalar")


def _frac(x: Any) -> Fraction:
    return x if isinstance(x, Fraction) else Fraction(x).limit_denominator(1000)


@attrs.frozen
class ABCD:
    """The four exponents of one parameter, each with its tunable constant (Remark 2.2.5)."""

    a: Fraction = attrs.field(default=Fraction(0), converter=_frac)
    b: Fraction = attrs.field(default=Fraction(0), converter=_frac)
    c: Fraction = attrs.field(default=Fraction(0), converter=_frac)
    d: Fraction = attrs.field(default=Fraction(0), converter=_frac)
    a_const: float = 1.0
    b_const: float = 1.0
    c_const: float = 1.0

    def shifted(self, theta: Any) -> ABCD:
        """The equivalent exponents of Eq. (2.5): a+θ, b−θ, c−θ, d+θ (same training at every width)."""
        theta = _frac(theta)
        return attrs.evolve(self, a=self.a + theta, b=self.b - theta, c=self.c - theta, d=self.d + theta)

    def __str__(self) -> str:
        return f"a={self.a} b={self.b} c={self.c} d={self.d}"


UPDATES = ("plain", "normalized", "clipped", "normalized-by-weight")


@attrs.frozen
class Parametrization:
    """A table of abcd exponents per role, an output multiplier, and per-parameter overrides.

    ``update``: ``plain`` (Eq. 2.4), ``normalized`` / ``clipped`` (Eq. 2.54, the update divided by
    its norm, or by min(norm, θ₀·n^e)), ``normalized-by-weight`` (by the current weight norm).
    ``attention_power``: the power of width that attention-logit scales become (μP: −1, i.e.
    1/d_head instead of 1/√d_head); None keeps each model's own choice.
    """

    name: str
    roles: Mapping[str, ABCD]
    a_out: Fraction = attrs.field(default=Fraction(0), converter=_frac)
    a_out_const: float = 1.0
    overrides: Mapping[str, ABCD] = attrs.field(factory=dict)
    update: str = "plain"
    attention_power: Fraction | None = None
    description: str = ""

    def __attrs_post_init__(self) -> None:
        missing = set(ROLES) - set(self.roles)
        if missing:
            raise TplimitsError(f"parametrization {self.name!r} has no exponents for role(s) {sorted(missing)}")
        if self.update not in UPDATES:
            raise TplimitsError(f"parametrization {self.name!r}: update {self.update!r} is not one of {UPDATES}")

    def for_parameter(self, name: str, role: str) -> ABCD:
        return self.overrides.get(name, self.roles[role])

    def with_overrides(self, **per_parameter: ABCD) -> Parametrization:
        """The same table with some parameters given their own exponents (keys: parameter names)."""
        return attrs.evolve(self, overrides={**self.overrides, **per_parameter})

    def with_role(self, role: str, **exponents: Any) -> Parametrization:
        """The same table with some exponents of one role changed, e.g. ``with_role("hidden", c=0)``."""
        if role not in ROLES:
            raise TplimitsError(f"unknown role {role!r}; roles are {ROLES}")
        roles = dict(self.roles)
        roles[role] = attrs.evolve(roles[role], **{k: _frac(v) if k in "abcd" else v for k, v in exponents.items()})
        return attrs.evolve(self, roles=roles, name=f"{self.name}+{role}:{exponents}")

    def with_all(self, **exponents: Any) -> Parametrization:
        """Change one exponent for every role at once, e.g. SP with c = 1 everywhere."""
        p = self
        for role in ROLES:
            p = p.with_role(role, **exponents)
        return attrs.evolve(p, name=f"{self.name}+{exponents}")


@attrs.frozen
class ParametrizationFamily:
    """Parametrizations named ``prefix + argument`` (``UP_0.3``): ``make(argument)`` builds one.

    A plugin returns a family from ``tplimits_parametrizations`` next to plain parametrizations; the
    registry asks it for names it does not hold (:meth:`match`).
    """

    prefix: str
    make: Callable[[str], Parametrization]
    description: str = ""

    @property
    def name(self) -> str:
        return f"{self.prefix}*"

    def match(self, name: str) -> Parametrization | None:
        """The member called ``name``, or None when the name is not of this family."""
        return self.make(name[len(self.prefix):]) if name.startswith(self.prefix) else None


# --------------------------------------------------------------------------------------------
# Roles from the program
# --------------------------------------------------------------------------------------------


def parameter_roles(program: Program) -> dict[str, str]:
    """The role of every trainable parameter, read off how the program uses it."""
    roles = {}
    for name, info in program.parameters.items():
        if not info.trainable:
            continue
        if info.kind == "matrix":
            roles[name] = "hidden"
        elif info.kind == "scalar":
            roles[name] = "scalar"
        elif set(info.fan_in_axes) & set(info.width_axes):
            roles[name] = "output"
        else:
            roles[name] = "input"
    return roles


def update_exponent(kind: str, update: str) -> Fraction:
    """e of Eq. (2.55): how the norm of an update grows with width (0, 1/2, 1 by kind)."""
    if update == "plain":
        return Fraction(0)
    return {"scalar": Fraction(0), "vector": Fraction(1, 2), "matrix": Fraction(1)}[kind]
