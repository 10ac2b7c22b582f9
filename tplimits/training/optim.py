"""The optimizer of an abcd-parametrized model: per-parameter learning rates ``η·c_const·n^{-c}`` and
gradient scales ``n^{d}`` (Def 2.2.1 (c), (d)), update normalization and clipping (Eq. 2.54), and the
non-gradient rules that update some matrices instead (decorrelation)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tplimits.core.program import Program
from tplimits.optimizers.base import TplimitsOptimizer, UpdateRule
from tplimits.training.model import owner_of, trained_tensor
from tplimits.training.parametrize import ABCD, Parametrization, update_exponent


def parameter_groups(tensors: Mapping[str, torch.Tensor], program: Program, param: Parametrization,
                     chosen: Mapping[str, ABCD], width: int, lr: float, weight_decay: float = 0.0,
                     clip: float | None = None) -> list[dict[str, Any]]:
    """One optimizer param group per parameter (``tensors`` by name): lr, ``lr_scale = c_const·n^{-c}``,
    ``grad_scale = n^{d}``, weight decay and the normalization / clipping of Eq. 2.54."""
    groups = []
    infos = program.parameters
    for name, abcd in chosen.items():
        kind = infos[name].kind
        group = {
            "params": [tensors[name]],
            "lr": lr,
            "lr_scale": abcd.c_const * float(width) ** float(-abcd.c),
            "grad_scale": float(width) ** float(abcd.d),
            "weight_decay": weight_decay,
            "name": name,
        }
        if param.update != "plain":
            group["normalize"] = True
            if param.update == "clipped" or clip is not None:
                e = update_exponent(kind, param.update)
                group["clip"] = (clip if clip is not None else 1.0) * float(width) ** float(e)
        groups.append(group)
    return groups


def rule_lr_scale(param: Parametrization, width: int) -> float:
    """The rate factor of a non-gradient rule: ``n^-r`` of the hidden role.

    A rule's own rate (decorrelation: c/n) is the maximal update; a parametrization whose hidden layers
    move features like n^-r scales it by n^-r (NTP: r = 1/2), so the rule stays in the same regime."""
    hidden = param.roles["hidden"]
    return float(width) ** float(-(hidden.c + hidden.a - 1))


def rule_groups(tensors: Mapping[str, torch.Tensor], rules: Mapping[str, UpdateRule], param: Parametrization,
                width: int, lr: float) -> list[dict[str, Any]]:
    """One param group per parameter updated by a non-gradient rule: its rule and ``lr_scale = n^-r``."""
    scale = rule_lr_scale(param, width)
    return [{"params": [tensors[name]], "name": name, "rule": rule, "lr": lr, "lr_scale": scale}
            for name, rule in rules.items()]


def rule_assignment(program: Program, patterns: Mapping[str, UpdateRule]) -> dict[str, UpdateRule]:
    """Parameter name -> the non-gradient rule that updates it, for trainable parameters matching ``patterns``."""
    assigned = {}
    for name, info in program.parameters.items():
        if not info.trainable:
            continue
        for pattern, rule in patterns.items():
            if fnmatch.fnmatchcase(name, pattern):
                assigned[name] = rule
                break
    return assigned


def make_parametrized_optimizer(model: nn.Module, program: Program, param: Parametrization,
                                chosen: Mapping[str, ABCD], width: int, rule: UpdateRule, lr: float, *,
                                rules: Mapping[str, UpdateRule] | None = None, weight_decay: float = 0.0,
                                clip: float | None = None, **hyper: Any) -> TplimitsOptimizer:
    """The optimizer of ``model``: ``rule`` on the parameters in ``chosen`` with their abcd factors, and each
    non-gradient rule of ``rules`` on its matrices, whose layer inputs the optimizer records itself (the
    module owning such a matrix must take the matrix's input as its first positional argument)."""
    rules = dict(rules or {})
    tensors = {name: trained_tensor(model, name) for name in (*chosen, *rules)}
    groups = parameter_groups(tensors, program, param, chosen, width, lr, weight_decay, clip)
    groups += rule_groups(tensors, rules, param, width, lr)
    opt = TplimitsOptimizer(groups, rule, lr=lr, **hyper)
    for name in rules:
        opt.watch(tensors[name], owner_of(model, name)[0])
    return opt
