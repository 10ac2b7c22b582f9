"""Built-in parametrizations, registered through the ``tplimits_parametrizations`` hook like any plugin:
SP, NTP, μP, UP_s (s = 0, 1/4, 1/2 by name; any other s through the ``UP_`` family, e.g. ``"UP_0.3"``)
and the update normalization / clipping variants of Defs 2.10.4, 2.10.5 and 2.10.9."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from tplimits.plugin import ABCD, Parametrization, ParametrizationFamily, TplimitsError, hookimpl

HALF = Fraction(1, 2)


def _frac(x: Any) -> Fraction:
    return x if isinstance(x, Fraction) else Fraction(x).limit_denominator(1000)


def _table(hidden: tuple, input_: tuple, output: tuple, scalar: tuple = (0, 0, 0, 0)) -> dict[str, ABCD]:
    return {role: ABCD(*map(_frac, values)) for role, values in
            (("hidden", hidden), ("input", input_), ("output", output), ("scalar", scalar))}


def standard() -> Parametrization:
    """SP (Example 2.2.2): fan-in initialization, one learning rate for all."""
    return Parametrization("SP", _table((0, HALF, 0, 0), (0, 0, 0, 0), (0, HALF, 0, 0)), a_out=0,
                           description="standard parametrization (Example 2.2.2)")


def ntk() -> Parametrization:
    """NTP for a general architecture (Def 2.9.11), attention logits scaled by 1/d_head (with 1/√d_head the
    logits of features moving like n^-1/2 still change Θ(1), which leaves the operator regime)."""
    return Parametrization("NTP", _table((HALF, 0, 1, 1), (0, 0, HALF, HALF), (0, 0, HALF, HALF)), a_out=HALF,
                           attention_power=Fraction(-1), description="neural tangent parametrization (Def 2.9.11)")


def maximal_update() -> Parametrization:
    """μP for a general architecture (Def 2.9.12), attention logits scaled by 1/d_head."""
    return Parametrization("muP", _table((0, HALF, 1, 1), (0, 0, 0, 1), (0, 0, 0, 1)), a_out=1,
                           attention_power=Fraction(-1), description="maximal update parametrization (Def 2.9.12)")


def uniform(s: Any) -> Parametrization:
    """UP_s (Remark 2.8.25, with r_{L+1} = 0): r_l = s for every layer, a_out + b_out = 1 − s.

    UP_0 is μP and UP_{1/2} is NTP.
    """
    try:
        s = _frac(s)
    except (TypeError, ValueError):
        raise TplimitsError(f"UP_s needs a number s in [0, 1/2], got {s!r}") from None
    if not 0 <= s <= HALF:
        raise TplimitsError(f"UP_s needs s in [0, 1/2], got {s}")
    return Parametrization(f"UP_{s}", _table((s, HALF - s, 1, 1), (0, 0, s, 1 - s), (0, 0, s, 1 - s)),
                           a_out=1 - s, attention_power=Fraction(-1),
                           description=f"uniform parametrization UP_{s} (Remark 2.8.25)")


def ntk_normalized() -> Parametrization:
    """NTP with normalized updates (Def 2.10.4)."""
    return Parametrization("NTP-normalized", _table((HALF, 0, 0, 1), (0, 0, 0, HALF), (0, 0, 0, HALF)), a_out=HALF,
                           update="normalized", attention_power=Fraction(-1), description="Def 2.10.4")


def maximal_update_normalized() -> Parametrization:
    """μP with normalized updates (Def 2.10.5)."""
    return Parametrization("muP-normalized", _table((0, HALF, 0, 1), (0, 0, -HALF, 1), (0, 0, -HALF, 1)), a_out=1,
                           update="normalized", attention_power=Fraction(-1), description="Def 2.10.5")


def maximal_update_normalized_by_weight() -> Parametrization:
    """μP with updates normalized by the weight's norm (Def 2.10.9)."""
    return Parametrization("muP-normalized-by-weight", _table((0, HALF, HALF, 1), (0, 0, -HALF, 1), (0, 0, -HALF, 1)),
                           a_out=1, update="normalized-by-weight", attention_power=Fraction(-1),
                           description="Def 2.10.9")


UNIFORM = ParametrizationFamily("UP_", uniform, "UP_s for any s in [0, 1/2] (Remark 2.8.25)")


@hookimpl
def tplimits_parametrizations() -> list[Parametrization | ParametrizationFamily]:
    return [
        standard(),
        ntk(),
        maximal_update(),
        uniform(Fraction(0)),
        uniform(Fraction(1, 4)),
        uniform(Fraction(1, 2)),
        ntk_normalized(),
        maximal_update_normalized(),
        maximal_update_normalized_by_weight(),
        UNIFORM,
    ]
