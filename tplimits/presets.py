"""Built-in parametrizations, registered through the ``tplimits_parametrizations`` hook like any plugin:
SP, NTP, μP, UP_s (s = 0, 1/4, 1/2; any other s by name, e.g. ``"UP_0.3"``) and the update
normalization / clipping variants of Defs 2.10.4, 2.10.5 and 2.10.9."""

from __future__ import annotations

from fractions import Fraction

from tplimits.core.parametrize import Parametrization, maximal_update, normalized, ntk, standard, uniform
from tplimits.plugins.specs import hookimpl


@hookimpl
def tplimits_parametrizations() -> list[Parametrization]:
    return [
        standard(),
        ntk(),
        maximal_update(),
        uniform(Fraction(0)),
        uniform(Fraction(1, 4)),
        uniform(Fraction(1, 2)),
        normalized("NTP-normalized"),
        normalized("muP-normalized"),
        normalized("muP-normalized-by-weight"),
    ]
