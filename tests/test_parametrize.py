"""abcd tables and the classification of Sec. 2.8, against the paper's own tables and theorems."""

from __future__ import annotations

from fractions import Fraction

import attrs
import pytest

import tplimits as tpl
from tplimits.presets import uniform
from tplimits.training.classify import classify_program
from tplimits.training.parametrize import ROLES, parameter_roles

SGD, ADAM = 1, 0  # homogeneity degree of the update function: SGD linear, Adam scale invariant (ε → 0)


@pytest.fixture(scope="module")
def mlp3():
    return tpl.lower("mlp", depth=3)


@pytest.fixture(scope="module")
def mlp1():
    return tpl.lower("mlp", depth=1)


def test_roles_of_mlp(mlp3):
    roles = parameter_roles(mlp3)
    assert roles["layers.0.weight"] == "input" and roles["layers.0.bias"] == "input"
    assert roles["layers.1.weight"] == "hidden" and roles["layers.2.weight"] == "hidden"
    assert roles["readout.weight"] == "output" and roles["readout.bias"] == "scalar"


def test_tables_match_the_paper():
    mup, ntp, sp = tpl.parametrization("muP"), tpl.parametrization("NTP"), tpl.parametrization("SP")
    half = Fraction(1, 2)
    hidden = mup.roles["hidden"]
    assert (hidden.a, hidden.b, hidden.c, hidden.d) == (0, half, 1, 1)
    assert (mup.roles["input"].c, mup.roles["input"].d, mup.a_out) == (0, 1, 1)
    assert (ntp.roles["hidden"].a, ntp.roles["hidden"].c, ntp.roles["input"].c, ntp.a_out) == (half, 1, half, half)
    assert sp.roles["output"].b == half and sp.roles["input"].b == 0 and sp.a_out == 0
    for s, reference in ((0, mup), (half, ntp)):  # UP_0 = μP and UP_1/2 = NTP (Remark 2.8.25)
        up = uniform(s)
        for role in ROLES:
            got, want = up.roles[role], reference.roles[role]
            assert (got.a, got.b, got.c, got.d) == (want.a, want.b, want.c, want.d), (s, role)
        assert up.a_out == reference.a_out


@pytest.mark.parametrize("name,homogeneity,regime,r", [
    ("muP", SGD, "feature learning", 0), ("muP", ADAM, "feature learning", 0),
    ("NTP", SGD, "operator", Fraction(1, 2)), ("NTP", ADAM, "operator", Fraction(1, 2)),
    ("UP_1/4", ADAM, "operator", Fraction(1, 4)), ("UP_0.1", SGD, "operator", Fraction(1, 10)),
    ("SP", SGD, "unstable", None), ("SP", ADAM, "unstable", None),
])
def test_verdicts_deep(mlp3, name, homogeneity, regime, r):
    verdict = classify_program(mlp3, tpl.parametrization(name), homogeneity=homogeneity)
    assert verdict.regime == regime, str(verdict)
    if r is not None:
        assert verdict.r == r and verdict.stable and verdict.faithful and verdict.nontrivial


def test_sp_adam_with_small_learning_rate(mlp3, mlp1):
    """The sanity table of MATH.md §8: SP with c = 1 everywhere is unstable for depth ≥ 2 (Thm 2.8.12 —
    not feature learning as Remark 2.2.7 claims), and in the operator regime with r = 1 for depth 1."""
    sp1 = tpl.parametrization("SP").with_all(c=1)
    deep = classify_program(mlp3, sp1, homogeneity=ADAM)
    assert deep.regime == "unstable" and not deep.stable
    assert any("Thm 2.8.12" in reason and "< 1" in reason and "layers." in reason for reason in deep.reasons)
    shallow = classify_program(mlp1, sp1, homogeneity=ADAM)
    assert shallow.regime == "operator" and shallow.r == 1


def test_failure_names_the_parameter(mlp3):
    verdict = classify_program(mlp3, tpl.parametrization("SP"), homogeneity=SGD)
    assert any("r = -1/2 < 0" in reason and "'layers.1.weight'" in reason for reason in verdict.reasons)
    unstable_init = tpl.parametrization("muP").with_role("hidden", b=0)
    verdict = classify_program(mlp3, unstable_init, homogeneity=SGD)
    assert not verdict.stable_at_init
    assert any("Lemma 2.8.10" in reason and "'layers.1.weight'" in reason for reason in verdict.reasons)


def test_non_homogeneous_update_needs_faithful_d(mlp3):
    sp = tpl.parametrization("SP")
    verdict = classify_program(mlp3, sp, homogeneity=None)
    assert not verdict.faithful_at_init and any("Lemma 2.8.11" in reason for reason in verdict.reasons)
    assert classify_program(mlp3, tpl.parametrization("muP"), homogeneity=None).regime == "feature learning"


@pytest.mark.parametrize("theta", [Fraction(1, 2), Fraction(-1, 3), Fraction(1)])
@pytest.mark.parametrize("name", ["muP", "NTP", "SP"])
def test_classification_invariant_under_abcd_symmetry(mlp3, name, theta):
    """Eq. (2.5): shifting (a, b, c, d) by (θ, −θ, −θ, θ) for a layer changes nothing."""
    base = tpl.parametrization(name)
    shifted = base.with_overrides(**{"layers.1.weight": base.roles["hidden"].shifted(theta),
                                     "layers.0.weight": base.roles["input"].shifted(theta)})
    for homogeneity in (SGD, ADAM):
        a = classify_program(mlp3, base, homogeneity=homogeneity)
        b = classify_program(mlp3, shifted, homogeneity=homogeneity)
        assert (a.regime, a.r, a.stable, a.nontrivial) == (b.regime, b.r, b.stable, b.nontrivial)


def test_transformer_classification():
    prog = tpl.lower("transformer", n_layers=1)
    mup = classify_program(prog, tpl.parametrization("muP"), homogeneity=ADAM)
    assert mup.regime == "feature learning"
    assert any("become n^-1" in reason for reason in mup.reasons)
    assert classify_program(prog, tpl.parametrization("NTP"), homogeneity=ADAM).regime == "operator"
    keep_sqrt = attrs.evolve(tpl.parametrization("muP"), attention_power=None)
    assert any("grows like n^1/2" in reason for reason in classify_program(prog, keep_sqrt, homogeneity=ADAM).reasons)
    ntp_sqrt = attrs.evolve(tpl.parametrization("NTP"), attention_power=None)
    assert any("leaves the operator regime" in reason
               for reason in classify_program(prog, ntp_sqrt, homogeneity=ADAM).reasons)


def test_normalized_variants(mlp3):
    for name, r in (("muP-normalized", 0), ("NTP-normalized", Fraction(1, 2)), ("muP-normalized-by-weight", 0)):
        verdict = classify_program(mlp3, tpl.parametrization(name), homogeneity=ADAM)
        assert verdict.r == r and verdict.stable, str(verdict)


def test_unknown_parametrization():
    with pytest.raises(tpl.PluginError, match="muP"):
        tpl.parametrization("nope")
    with pytest.raises(tpl.TplimitsError, match=r"\[0, 1/2\]"):
        tpl.parametrization("UP_0.9")
