"""The classification of an abcd-parametrization on a program (Sec. 2.8; MATH.md §7–§8).

Lemma 2.8.10 (stable at init), Lemma 2.8.11 (faithful at init), Thm 2.8.12 (stable in training),
Thm 2.8.15 (nontrivial) and Thm 2.8.19 (feature learning iff r = 0), with ``c + e`` for normalized
updates (Def 2.10.6). A homogeneous update function trades d for c (Remark 2.2.4); adaptive rules
are classified in the ε → 0 sense (Remark 2.2.6).
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction

import attrs
from torch.utils import _pytree as pytree

from tplimits.core.ir import Avg, Nonlin, Parameter, WidthPower, width_axes
from tplimits.core.program import Program
from tplimits.errors import TplimitsError
from tplimits.optimizers.base import UpdateRule
from tplimits.training.parametrize import ABCD, ROLES, Parametrization, parameter_roles, update_exponent


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

    @property
    def feature_change_exponent(self) -> Fraction | None:
        """The power of width hidden features change by in training, ``-r`` (μP: 0, NTP: −1/2); None
        outside the two stable nontrivial regimes, where the theory predicts no limit."""
        return -self.r if self.regime in ("feature learning", "operator") else None

    def __str__(self) -> str:
        head = (f"{self.parametrization}: {self.regime} (r = {self.r}); stable at init {self.stable_at_init}, "
                f"faithful {self.faithful}, stable {self.stable}, nontrivial {self.nontrivial}")
        return head + "".join(f"\n  - {reason}" for reason in self.reasons)


@attrs.define
class _Table:
    """The exponents of one classification, with the readout's layer numbers (MLP style)."""

    param: Parametrization
    program: Program
    homogeneity: float | None
    roles: dict[str, str]
    by_role: dict[str, list[tuple[str, ABCD]]]
    out_name: str
    out: ABCD
    a_l1: Fraction  # a_{L+1}: the output multiplier folded in (Remark 2.9.8)
    b_l1: Fraction
    internal: Mapping[str, str]  # output-role parameters summed into the network, not into an output
    reasons: list[str] = attrs.field(factory=list)

    @property
    def base(self) -> Fraction:
        return self.a_l1 + self.b_l1

    def faithful_d(self, role: str, abcd: ABCD) -> Fraction:
        return abcd.a + self.base if role != "output" else self.a_l1

    def effective_c(self, role: str, name: str, abcd: ABCD) -> Fraction:
        c = abcd.c + update_exponent(self.program.parameters[name].kind, self.param.update)
        if self.param.update == "normalized-by-weight":
            c -= abcd.b
        if self.homogeneity is not None and self.param.update == "plain":
            c -= Fraction(self.homogeneity).limit_denominator(1000) * (abcd.d - self.faithful_d(role, abcd))
        return c


def _table(program: Program, param: Parametrization, homogeneity: float | None) -> _Table:
    roles = parameter_roles(program)
    by_role: dict[str, list[tuple[str, ABCD]]] = {role: [] for role in ROLES}
    for name, role in roles.items():
        by_role[role].append((name, param.for_parameter(name, role)))
    if not by_role["output"]:
        raise TplimitsError("the program has no readout (no vector summed over its width axis into an output); "
                            "the classification needs one")
    internal = bottlenecks(program, roles)
    readouts = [kv for kv in by_role["output"] if kv[0] not in internal] or by_role["output"]
    out_name, out = max(readouts, key=lambda kv: kv[1].a + kv[1].b)
    return _Table(param, program, homogeneity, roles, by_role, out_name, out, param.a_out + out.a, out.b,
                  internal)


def bottlenecks(program: Program, roles: Mapping[str, str] | None = None) -> dict[str, str]:
    """Vector parameters summed over the width axis into a value that feeds a vector of the network (a
    fixed-size bottleneck, e.g. a transformer MLP whose hidden size does not grow with width), each with
    the first vector it feeds. The output multiplier ``n^{-a_out}`` scales readouts only, so such a sum is
    ``Θ(n^{1/2-a-b})`` at initialization instead of a deterministic number, and no limit of the network exists
    unless its own a + b is at least 1. A width-dependent scale applied to the sum (attention's 1/d_head) is
    the model renormalizing it, and ends the search."""
    roles = parameter_roles(program) if roles is None else roles
    views: dict[str, str] = {}  # program value -> the output-role parameter it is, or a view of
    found: dict[str, str] = {}
    reached: dict[str, set[str]] = {}  # program value -> the parameters whose sums it depends on
    for ins in program.instructions:
        if isinstance(ins, Parameter) and roles.get(ins.target) == "output":
            views[ins.name] = ins.target
        elif isinstance(ins, Nonlin) and len(ins.inputs) == 1 and ins.inputs[0] in views:
            views[ins.name] = views[ins.inputs[0]]
        elif isinstance(ins, Avg) and ins.scale is not None and ins.scale.power > 0:
            product = program[ins.vector]
            owners = {views[i] for i in product.inputs if i in views} if isinstance(product, Nonlin) else set()
            if owners:
                reached[ins.name] = owners
                continue
        sources = set().union(*(reached[i] for i in ins.inputs if i in reached))
        if not sources or _renormalizes(ins):
            continue
        reached[ins.name] = sources
        if width_axes(ins.layout):
            for name in sorted(sources - set(found)):
                found[name] = ins.name
    return found


def bottleneck_message(program: Program, name: str, fed: str, abcd: ABCD) -> str:
    """Why the sum of bottleneck parameter ``name`` (feeding ``fed``) has no deterministic limit."""
    node = program[fed].origin.describe() or f"%{fed}"
    return (f"{name!r} is summed over the width axis into the network ({node}), not into an output, and no "
            f"output multiplier scales it: the sum grows like n^{{{Fraction(1, 2) - abcd.a - abcd.b}}} at "
            f"initialization (a+b = {abcd.a + abcd.b}). A layer whose size stays fixed while the width grows "
            "(e.g. an MLP hidden size left at a constant) has no μ-limit; let its size grow with width")


def unscaled_sums(program: Program, depth: int = 4) -> list[str]:
    """Sums over the width axis (an :class:`Avg` with a positive width power) of a product of width values none of
    which is a parameter, with no negative width power applied to the product's factors or to the sum within
    ``depth`` single-input steps (attention logits ``q·kᵀ`` with their ``1/d_head``, or ``1/√d_head`` that a
    parametrization sets, on either side). Such a sum of ``n`` products is ``Θ(√n)`` random at initialization
    (``Θ(n)`` once its factors correlate): no limit exists. Attention called with ``scale=1`` (T5) is one."""
    parameters = {ins.name for ins in program.instructions if isinstance(ins, Parameter)}
    users: dict[str, list] = {}
    for ins in program.instructions:
        for name in ins.inputs:
            users.setdefault(name, []).append(ins)

    def scaled_before(name: str, steps: int) -> bool:
        ins = program[name]
        if name in parameters or _renormalizes(ins):
            return True
        return steps > 0 and len(ins.inputs) == 1 and scaled_before(ins.inputs[0], steps - 1)

    def scaled_after(name: str, steps: int) -> bool:
        return any(_renormalizes(u) or (steps > 0 and len(u.inputs) == 1 and scaled_after(u.name, steps - 1))
                   for u in users.get(name, []))

    found = []
    for ins in program.instructions:
        if not (isinstance(ins, Avg) and ins.scale is not None and ins.scale.power > 0):
            continue
        product = program[ins.vector]
        factors = product.inputs if isinstance(product, Nonlin) else (ins.vector,)
        if not any(scaled_before(f, depth) for f in factors) and not scaled_after(ins.name, depth):
            found.append(ins.name)
    return found


def _renormalizes(ins: object) -> bool:
    """An instruction that multiplies by a negative power of width (attention's 1/d_head on its logits)."""
    if not isinstance(ins, Nonlin):
        return False
    leaves = pytree.tree_leaves((ins.args, dict(ins.kwargs)))
    return any(isinstance(c, WidthPower) and c.power < 0 for c in leaves)


def _stable_at_init(t: _Table) -> bool:
    stable = True
    for role, expected in (("input", Fraction(0)), ("hidden", Fraction(1, 2))):
        for name, abcd in t.by_role[role]:
            if t.program.parameters[name].kind == "scalar":
                continue
            if abcd.a + abcd.b != expected:
                stable = False
                t.reasons.append(f"unstable at init (Lemma 2.8.10): {role} parameter {name!r} has a+b = "
                                 f"{abcd.a + abcd.b}, needs {expected}")
    if t.base < Fraction(1, 2):
        stable = False
        t.reasons.append(f"unstable at init (Lemma 2.8.10): output {t.out_name!r} has a_out+a+b = {t.base} < 1/2")
    for name, fed in t.internal.items():
        abcd = t.param.for_parameter(name, "output")
        if abcd.a + abcd.b < Fraction(1, 2):  # no output multiplier scales a sum that feeds the network
            stable = False
            t.reasons.append(f"unstable at init (Lemma 2.8.10): {bottleneck_message(t.program, name, fed, abcd)}")
    return stable


def _faithful_at_init(t: _Table) -> bool:
    faithful = True
    scale_invariant = t.homogeneity == 0 and t.param.update == "plain"
    for role in ("input", "hidden", "output"):
        for name, abcd in t.by_role[role]:
            want = t.faithful_d(role, abcd)
            if abcd.d != want and t.homogeneity is None:
                faithful = False
                t.reasons.append(f"not faithful (Lemma 2.8.11): {name!r} has d = {abcd.d}, needs {want} for Q to "
                                 "see Θ(1) gradients (the update function is not homogeneous, so d cannot be traded "
                                 "for c)")
    if faithful and not scale_invariant and t.homogeneity is not None:
        t.reasons.append("faithful: d is traded for c through the homogeneity of Q "
                         f"(degree {t.homogeneity}, Remark 2.2.4)")
    if scale_invariant:
        t.reasons.append("Q is scale invariant (homogeneous of degree 0): d has no effect")
    return faithful


def _layer_r(t: _Table) -> dict[str, Fraction]:
    """r_l of every parameter (Def 2.8.5): how fast the features it drives move, as a power of 1/n."""
    r_by: dict[str, Fraction] = {}
    for role in ("input", "hidden"):
        for name, abcd in t.by_role[role]:
            r_by[name] = t.effective_c(role, name, abcd) + abcd.a - (1 if role == "hidden" else 0)
    for name, abcd in t.by_role["output"]:
        r_by[name] = t.effective_c("output", name, abcd) + t.a_l1 - 1
    return r_by


def _stable_in_training(t: _Table, r_by: Mapping[str, Fraction], r: Fraction | None) -> bool:
    stable = True
    for name, value in r_by.items():
        if value < 0:
            stable = False
            t.reasons.append(f"unstable in training (Thm 2.8.12): r = {value} < 0 for {name!r} "
                             f"({t.roles[name]}): its updates grow with width")
    if r is not None and t.base + r < 1:
        stable = False
        culprit = next(name for name, value in r_by.items() if value == r and t.roles[name] != "output")
        t.reasons.append(f"unstable in training (Thm 2.8.12): a_out+a+b of the output ({t.base}) + r ({r}) = "
                         f"{t.base + r} < 1: the readout {t.out_name!r} sums Θ(n^{{{1 - t.base - r}}}) of the feature "
                         f"change driven by {culprit!r}")
    c_out = t.effective_c("output", t.out_name, t.out)
    if t.b_l1 > c_out:
        stable = False
        t.reasons.append(f"unstable in training (Thm 2.8.12): b = {t.b_l1} > c = {c_out} for the output "
                         f"{t.out_name!r}")
    return stable


def classify_program(program: Program, param: Parametrization, *, homogeneity: float | None) -> Verdict:
    """Classify ``param`` on ``program`` for an update function of the given homogeneity degree.

    A homogeneous Q (``Q(s g) = s^k Q(g)``) makes d redundant: ``n^d`` in front of the gradient is
    the same as ``n^{k d}`` in front of the update, so d is moved into c before checking, and a
    scale-invariant Q (k = 0) is faithful for any d (Lemma 2.8.11's remark on SP).
    """
    t = _table(program, param, homogeneity)
    stable_init = _stable_at_init(t)
    faithful_init = _faithful_at_init(t)
    r_by = _layer_r(t)
    layer_r = [r_by[name] for role in ("input", "hidden") for name, _ in t.by_role[role]]
    r = min(layer_r) if layer_r else None
    stable = _stable_in_training(t, r_by, r) and stable_init and faithful_init
    c_out = t.effective_c("output", t.out_name, t.out)
    nontrivial = stable and ((t.a_l1 + c_out == 1) or (r is not None and t.base + r == 1))
    if stable and not nontrivial:
        t.reasons.append(f"trivial (Thm 2.8.15): neither a_out+a+c = {t.a_l1 + c_out} nor a_out+a+b+r = "
                         f"{t.base + (r or 0)} equals 1: the function does not move in the limit")
    _attention_reasons(program, param, r, t.reasons)
    if not stable_init or not faithful_init or not stable:
        regime = "unstable" if faithful_init else "unfaithful"
    elif not nontrivial:
        regime = "trivial"
    else:
        regime = "feature learning" if r == 0 else "operator"
    if regime in ("feature learning", "operator"):
        t.reasons.append(f"{regime} regime (Thm 2.8.19): r = {r}")
    return Verdict(param.name, stable_init, faithful_init, stable, faithful_init and stable, nontrivial, r,
                   regime, tuple(t.reasons), r_by)


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


def attention_scales(program: Program, kind: str | None = None) -> list[WidthPower]:
    """The width-dependent constants that scale attention logits, as their lowering rules declared them
    (``kind``: ``"default"`` — an op's own default, ``"model"`` — written in the model's code; None: both)."""
    found = []
    for ins in program:
        declared = getattr(ins, "width_scale", None)
        if declared is None or (kind is not None and declared != kind):
            continue
        found.extend(arg for arg in ins.args if isinstance(arg, WidthPower) and arg.power < 0)
    return found


def optimizer_homogeneity(rule: UpdateRule) -> float | None:
    """The degree k with Q(s·g) = s^k Q(g), in the ε → 0 sense for adaptive rules (Remark 2.2.6: ε only
    sets a floor on the gradient scale Q sees); None if Q is not homogeneous."""
    hyper = dict(rule.defaults)
    if "eps" in hyper:
        hyper["eps"] = 0.0
    return rule.homogeneity_fn(hyper) if rule.homogeneity_fn is not None else rule.homogeneity
