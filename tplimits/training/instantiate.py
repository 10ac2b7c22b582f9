"""``instantiate``: the architecture at width n under an abcd-parametrization, and its optimizer."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from tplimits.optimizers.base import TplimitsOptimizer, UpdateRule
from tplimits.training.family import Family
from tplimits.training.model import ParametrizedModel, apply_parametrization, attention_override
from tplimits.training.optim import make_parametrized_optimizer, rule_assignment
from tplimits.training.parametrize import Parametrization


def instantiate_family(fam: Family, *, width: int, param: Parametrization, rule: UpdateRule, lr: float,
                       seed: int = 0, center: bool = False, weight_decay: float = 0.0, clip: float | None = None,
                       optimizer_options: Mapping[str, Any] | None = None,
                       update_rules: Mapping[str, UpdateRule] | None = None,
                       ) -> tuple[ParametrizedModel, TplimitsOptimizer]:
    """``fam`` at ``width`` under ``param``, and the optimizer applying ``rule`` (see :func:`tplimits.instantiate`).

    ``update_rules`` (``{pattern: UpdateRule}``, added to the family's own) names parameters that a
    non-gradient rule updates instead: they keep their own initialization and their rule's rate is
    scaled by ``n^-r`` of the hidden role (1 under μP).
    """
    model = fam.model(width, seed)
    program = fam.program
    rules = rule_assignment(program, {**fam.update_rules, **dict(update_rules or {})})
    generator = torch.Generator().manual_seed(seed)
    chosen = apply_parametrization(model, program, param, width, generator, skip=set(rules))
    attention = attention_override(program, param)
    initial = None
    if center:
        initial = copy.deepcopy(model)
        for p in initial.parameters():
            p.requires_grad_(False)
    wrapped = ParametrizedModel(model, param.a_out_const * float(width) ** float(-param.a_out), attention, initial)
    opt = make_parametrized_optimizer(model, program, param, chosen, width, rule, lr, rules=rules,
                                      weight_decay=weight_decay, clip=clip, **dict(optimizer_options or {}))
    return wrapped, opt
