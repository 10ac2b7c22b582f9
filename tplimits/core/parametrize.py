"""abcd-parametrizations (Def 2.2.1, 2.9.7) and their classification (Sec. 2.8).

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

from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import attrs

from tplimits.core.program import Program, WidthPower
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


def _table(hidden: tuple, input_: tuple, output: tuple, scalar: tuple = (0, 0, 0, 0)) -> dict[str, ABCD]:
    return {role: ABCD(*map(_frac, values)) for role, values in
            (("hidden", hidden), ("input", input_), ("output", output), ("scalar", scalar))}


def standard() -> Parametrization:
    """SP (Example 2.2.2): fan-in initialization, one learning rate for all."""
    return Parametrization("SP", _table((0, "1/2", 0, 0), (0, 0, 0, 0), (0, "1/2", 0, 0)), a_out=0,
                           description="standard parametrization (Example 2.2.2)")


def ntk() -> Parametrization:
    """NTP for a general architecture (Def 2.9.11), attention logits scaled by 1/d_head (with 1/√d_head the
    logits of features moving like n^-1/2 still change Θ(1), which leaves the operator regime)."""
    return Parametrization("NTP", _table(("1/2", 0, 1, 1), (0, 0, "1/2", "1/2"), (0, 0, "1/2", "1/2")), a_out="1/2",
                           attention_power=Fraction(-1), description="neural tangent parametrization (Def 2.9.11)")


def maximal_update() -> Parametrization:
    """μP for a general architecture (Def 2.9.12), attention logits scaled by 1/d_head."""
    return Parametrization("muP", _table((0, "1/2", 1, 1), (0, 0, 0, 1), (0, 0, 0, 1)), a_out=1,
                           attention_power=Fraction(-1), description="maximal update parametrization (Def 2.9.12)")


def uniform(s: Any) -> Parametrization:
    """UP_s (Remark 2.8.25, with r_{L+1} = 0): r_l = s for every layer, a_out + b_out = 1 − s.

    UP_0 is μP and UP_{1/2} is NTP.
    """
    s = _frac(s)
    if not 0 <= s <= Fraction(1, 2):
        raise TplimitsError(f"UP_s needs s in [0, 1/2], got {s}")
    return Parametrization(f"UP_{s}", _table((s, Fraction(1, 2) - s, 1, 1), (0, 0, s, 1 - s), (0, 0, s, 1 - s)),
                           a_out=1 - s, attention_power=Fraction(-1),
                           description=f"uniform parametrization UP_{s} (Remark 2.8.25)")


def normalized(kind: str) -> Parametrization:
    """Update normalization / clipping variants (Defs 2.10.4, 2.10.5, 2.10.9)."""
    if kind == "NTP-normalized":
        table = _table(("1/2", 0, 0, 1), (0, 0, 0, "1/2"), (0, 0, 0, "1/2"))
        return Parametrization(kind, table, a_out="1/2", update="normalized", attention_power=Fraction(-1),
                               description="Def 2.10.4")
    if kind == "muP-normalized":
        table = _table((0, "1/2", 0, 1), (0, 0, "-1/2", 1), (0, 0, "-1/2", 1))
        return Parametrization(kind, table, a_out=1, update="normalized", attention_power=Fraction(-1),
                               description="Def 2.10.5")
    if kind == "muP-normalized-by-weight":
        table = _table((0, "1/2", "1/2", 1), (0, 0, "-1/2", 1), (0, 0, "-1/2", 1))
        return Parametrization(kind, table, a_out=1, update="normalized-by-weight", attention_power=Fraction(-1),
                               description="Def 2.10.9")
    raise TplimitsError(f"unknown normalized parametrization {kind!r}")


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


# --------------------------------------------------------------------------------------------
# Classification (Lemma 2.8.10-11, Thm 2.8.12, 2.8.15, 2.8.19, Def 2.10.6)
# --------------------------------------------------------------------------------------------


@attrs.frozen
class Verdict:
    """What the theory says about training ``program`` with this parametrization and optimizer.

    ``r`` is min over layers of r_l (Def 2.8.5); ``regime`` is ``"feature learning"`` (r = 0),
    ``"operator"`` (r > 0) or ``"unstable"``/``"trivial"``/``"unfaithful"``. ``reasons`` lists
    every condition with whether it holds and, when one fails, which inequality and parameter.
    """

    parametrization: str
    stable_at_init: bool
    faithful_at_init: bool
    stable: bool
    faithful: bool
    nontrivial: bool
    r: Fraction | None
    regime: str
    reasons: tuple[str, ...]
    r_by_parameter: Mapping[str, Fraction] = attrs.field(factory=dict)

    def __str__(self) -> str:
        head = (f"{self.parametrization}: {self.regime} (r = {self.r}); stable at init {self.stable_at_init}, "
                f"faithful {self.faithful}, stable {self.stable}, nontrivial {self.nontrivial}")
        return head + "".join(f"\n  - {reason}" for reason in self.reasons)


def classify_program(program: Program, param: Parametrization, *, homogeneity: float | None) -> Verdict:
    """Classify ``param`` on ``program`` for an update function of the given homogeneity degree.

    A homogeneous Q (``Q(s g) = s^k Q(g)``) makes d redundant: ``n^d`` in front of the gradient is
    the same as ``n^{k d}`` in front of the update, so d is moved into c before checking, and a
    scale-invariant Q (k = 0) is faithful for any d (Lemma 2.8.11's remark on SP).
    """
    roles = parameter_roles(program)
    infos = program.parameters
    reasons: list[str] = []
    by_role: dict[str, list[tuple[str, ABCD]]] = {role: [] for role in ROLES}
    for name, role in roles.items():
        by_role[role].append((name, param.for_parameter(name, role)))
    outputs = by_role["output"]
    if not outputs:
        raise TplimitsError("the program has no readout (no vector summed over its width axis into an output); "
                            "the classification needs one")
    # Output layer numbers, MLP style: a_{L+1} folds the output multiplier in (Remark 2.9.8).
    out_name, out = max(outputs, key=lambda kv: kv[1].a + kv[1].b)
    a_l1, b_l1 = param.a_out + out.a, out.b
    base = a_l1 + b_l1

    def faithful_d(role: str, abcd: ABCD) -> Fraction:
        return abcd.a + base if role != "output" else a_l1

    def effective_c(role: str, name: str, abcd: ABCD) -> Fraction:
        c = abcd.c + update_exponent(infos[name].kind, param.update)
        if param.update == "normalized-by-weight":
            c -= abcd.b
        if homogeneity is not None and param.update == "plain":
            c -= Fraction(homogeneity).limit_denominator(1000) * (abcd.d - faithful_d(role, abcd))
        return c

    stable_init, faithful_init = True, True
    for role, expected in (("input", Fraction(0)), ("hidden", Fraction(1, 2))):
        for name, abcd in by_role[role]:
            if infos[name].kind == "scalar":
                continue
            if abcd.a + abcd.b != expected:
                stable_init = False
                reasons.append(f"unstable at init (Lemma 2.8.10): {role} parameter {name!r} has a+b = "
                               f"{abcd.a + abcd.b}, needs {expected}")
    if base < Fraction(1, 2):
        stable_init = False
        reasons.append(f"unstable at init (Lemma 2.8.10): output {out_name!r} has a_out+a+b = {base} < 1/2")
    scale_invariant = homogeneity == 0 and param.update == "plain"
    for role in ("input", "hidden", "output"):
        for name, abcd in by_role[role]:
            want = faithful_d(role, abcd)
            if abcd.d != want and homogeneity is None:
                faithful_init = False
                reasons.append(f"not faithful (Lemma 2.8.11): {name!r} has d = {abcd.d}, needs {want} for Q to see "
                               "Θ(1) gradients (the update function is not homogeneous, so d cannot be traded for c)")
    if faithful_init and not scale_invariant and homogeneity is not None:
        reasons.append("faithful: d is traded for c through the homogeneity of Q "
                       f"(degree {homogeneity}, Remark 2.2.4)")
    if scale_invariant:
        reasons.append("Q is scale invariant (homogeneous of degree 0): d has no effect")
    r_by: dict[str, Fraction] = {}
    for role in ("input", "hidden"):
        for name, abcd in by_role[role]:
            c = effective_c(role, name, abcd)
            r_by[name] = c + abcd.a - (1 if role == "hidden" else 0)
    for name, abcd in outputs:
        r_by[name] = effective_c("output", name, abcd) + a_l1 - 1
    layer_r = [r_by[name] for role in ("input", "hidden") for name, _ in by_role[role]]
    r = min(layer_r) if layer_r else None
    stable = stable_init and faithful_init
    for name, value in r_by.items():
        if value < 0:
            stable = False
            reasons.append(f"unstable in training (Thm 2.8.12): r = {value} < 0 for {name!r} "
                           f"({roles[name]}): its updates grow with width")
    if r is not None and base + r < 1:
        stable = False
        heaviest = min(layer_r)
        culprit = next(name for name, value in r_by.items() if value == heaviest and roles[name] != "output")
        reasons.append(f"unstable in training (Thm 2.8.12): a_out+a+b of the output ({base}) + r ({r}) = {base + r} "
                       f"< 1: the readout {out_name!r} sums Θ(n^{{{1 - base - r}}}) of the feature change driven by "
                       f"{culprit!r}")
    c_out = effective_c("output", out_name, out)
    if b_l1 > c_out:
        stable = False
        reasons.append(f"unstable in training (Thm 2.8.12): b = {b_l1} > c = {c_out} for the output {out_name!r}")
    nontrivial = stable and ((a_l1 + c_out == 1) or (r is not None and base + r == 1))
    if stable and not nontrivial:
        reasons.append(f"trivial (Thm 2.8.15): neither a_out+a+c = {a_l1 + c_out} nor a_out+a+b+r = "
                       f"{base + (r or 0)} equals 1: the function does not move in the limit")
    _attention_reasons(program, param, r, reasons)
    if not stable_init or not faithful_init or not stable:
        regime = "unstable" if faithful_init else "unfaithful"
    elif not nontrivial:
        regime = "trivial"
    else:
        regime = "feature learning" if r == 0 else "operator"
    if regime in ("feature learning", "operator"):
        reasons.append(f"{regime} regime (Thm 2.8.19): r = {r}")
    return Verdict(param.name, stable_init, faithful_init, stable, faithful_init and stable, nontrivial, r,
                   regime, tuple(reasons), r_by)


def _attention_reasons(program: Program, param: Parametrization, r: Fraction | None, reasons: list[str]) -> None:
    """Attention logits sum n·ratio products of features; aligned by training, their change is
    Θ(n^{1 + p − r}) for a logit scale n^p and features moving like n^{-r}. p = r − 1 keeps the logits'
    change at the features' own scale (μP: 1/d_head; NTP: 1/d_head too, so that they stay in the kernel
    regime); a larger p makes them blow up (1 + p − r > 0) or leave the operator regime (= 0 with r > 0)."""
    powers = sorted({c.power for c in attention_scales(program)})
    if not powers or r is None:
        return
    effective = [param.attention_power if param.attention_power is not None else p for p in powers]
    if param.attention_power is not None:
        reasons.append(f"attention logit scales n^{powers} become n^{param.attention_power} under {param.name}")
    for p in sorted(set(effective)):
        growth = 1 + p - r
        if growth > 0:
            reasons.append(f"attention logits scaled by n^{p}: their change grows like n^{growth} once training "
                           f"aligns queries and keys (r = {r}); 1/d_head (n^-1) keeps them bounded")
        elif growth == 0 and r > 0:
            reasons.append(f"attention logits scaled by n^{p} change Θ(1) while features move like n^-{r}: "
                           "attention leaves the operator regime; 1/d_head (n^-1) keeps it there")


def attention_scales(program: Program) -> list[WidthPower]:
    """The width-dependent constants that scale attention logits (sdpa's default, explicit 1/√d)."""
    found = []
    for ins in program:
        for arg in getattr(ins, "args", ()):
            if isinstance(arg, WidthPower) and arg.power < 0 and ins.kind == "scalar":
                found.append(arg)
    return found


def classify(arch: Any, param: Any = "SP", optimizer: Any = "adam", example_inputs: Any = None, base: Any = None,
             **config: Any) -> Verdict:
    """The classification of training ``arch`` under ``param`` with ``optimizer`` (Sec. 2.8).

    >>> classify("mlp", param="muP", optimizer="sgd").regime
    'feature learning'
    """
    from tplimits.core.frontend import lower
    from tplimits.plugins.manager import parametrization

    program = arch if isinstance(arch, Program) else lower(arch, example_inputs, base, **config)
    return classify_program(program, parametrization(param), homogeneity=optimizer_homogeneity(optimizer))


def optimizer_homogeneity(optimizer: Any) -> float | None:
    """The degree k with Q(s·g) = s^k Q(g), in the ε → 0 sense for adaptive rules (Remark 2.2.6: ε only
    sets a floor on the gradient scale Q sees); None if Q is not homogeneous."""
    from tplimits.optimizers import optimizer as lookup

    rule = lookup(optimizer) if isinstance(optimizer, str) else optimizer
    hyper = dict(getattr(rule, "defaults", {}))
    if "eps" in hyper:
        hyper["eps"] = 0.0
    return rule.homogeneity_fn(hyper) if rule.homogeneity_fn is not None else rule.homogeneity
