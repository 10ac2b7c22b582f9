"""The first-order Taylor model of a module in its parameters (Lee et al. 2019):

``f_lin(x; δ) = f(x; θ₀) + J(x; θ₀) δ``,

an ordinary ``nn.Module`` whose parameters are the displacements ``δ`` (zero at first), one per trained
tensor of the model and of its shape. Its output and the tangent are one :func:`torch.func.jvp` of
:func:`torch.func.functional_call` of a frozen copy of the model at ``θ₀``, so anything the model does
in its forward (an abcd multiplier registered with ``torch.nn.utils.parametrize``, the output
multiplier of a :class:`~tplimits.training.model.ParametrizedModel`, attention scales) is part of the
linearization too. :meth:`LinearizedModel.optimizer_like` builds the optimizer of the displacements with
the param groups of the model's own (per-parameter lr, ``lr_scale``, ``grad_scale``, normalization), so
the network and its linearization are trained by one loop with two models.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.utils import _pytree as pytree

from tplimits.errors import ConfigError, TplimitsError
from tplimits.optimizers.base import TplimitsOptimizer


def _frozen_copy(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``model`` whose parameters are buffers (so it has no parameters of its own), and its
    tensors by name: the point ``θ₀`` the Taylor model is taken at."""
    base = copy.deepcopy(model)
    for module in base.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            delattr(module, name)
            module.register_buffer(name, param.detach())
    return base, dict(base.named_buffers())


class LinearizedModel(nn.Module):
    """``model`` linearized in its trainable parameters around their values when it was built.

    ``names`` are the model's parameter names (as ``model.named_parameters()`` gives them), ``delta``
    the displacements in the same order (:meth:`displacement` by name). The output has the model's
    structure (tensors, tuples, dicts, ``transformers`` outputs); non-tensor leaves pass through.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TplimitsError(f"linearize takes an nn.Module, got {type(model).__name__}")
        trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not trained:
            raise TplimitsError(f"{type(model).__name__} has no trainable parameter to linearize in")
        self.base, self._point = _frozen_copy(model)
        self.names = tuple(name for name, _ in trained)
        self.delta = nn.ParameterList([nn.Parameter(torch.zeros_like(p.detach())) for _, p in trained])
        self._source = {id(p): i for i, (_, p) in enumerate(trained)}

    def displacement(self, name: str) -> nn.Parameter:
        """The displacement of the model's parameter ``name``."""
        if name not in self.names:
            raise TplimitsError(f"no trained parameter {name!r}; the linearized ones are {list(self.names)}")
        return self.delta[self.names.index(name)]

    def function(self, *args: Any, **kwargs: Any) -> Callable[[dict[str, torch.Tensor]], Any]:
        """``θ -> model(θ)(*args, **kwargs)``, ``θ`` a dict of the trained tensors by name (the rest at ``θ₀``)."""
        def call(params: dict[str, torch.Tensor]) -> Any:
            return functional_call(self.base, {**self._point, **params}, args, kwargs, strict=False)
        return call

    def point(self) -> dict[str, torch.Tensor]:
        """``θ₀``: the trained tensors the model is linearized at, by name."""
        return {name: self._point[name] for name in self.names}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out0, tangent = jvp(self.function(*args, **kwargs), (self.point(),), (dict(zip(self.names, self.delta,
                                                                                        strict=True)),))
        return pytree.tree_map(lambda a, b: a + b if torch.is_tensor(a) and torch.is_tensor(b) else a, out0, tangent)

    def optimizer_like(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """An optimizer of the displacements with ``optimizer``'s param groups (lr, ``lr_scale``,
        ``grad_scale``, normalization, the rule's hyperparameters) and a fresh state; ``optimizer`` must
        train parameters of the model this one linearizes.

        Decoupled weight decay (which shrinks ``θ₀ + δ``, not ``δ``) and rules driven by layer inputs
        (whose inputs are the network's, not the linear model's) have no counterpart here and raise."""
        groups = []
        for group in optimizer.param_groups:
            if group.get("weight_decay", 0.0):
                raise ConfigError(f"optimizer_like: a param group has weight_decay={group['weight_decay']}; "
                                  "decoupled weight decay shrinks θ₀ + δ, which a linearized model's "
                                  "displacement δ cannot express. Train both models without it.")
            rule = group.get("rule")
            if rule is not None and getattr(rule, "needs_activations", False):
                raise ConfigError(f"optimizer_like: update rule {rule.name!r} is driven by layer inputs, which a "
                                  "linearized model does not have")
            unknown = [p for p in group["params"] if id(p) not in self._source]
            if unknown:
                raise ConfigError(f"optimizer_like: the optimizer trains {len(unknown)} tensor(s) that are not "
                                  "trainable parameters of the linearized model (shapes "
                                  f"{[tuple(p.shape) for p in unknown[:3]]}); pass the model's own optimizer")
            groups.append({**group, "params": [self.delta[self._source[id(p)]] for p in group["params"]]})
        if isinstance(optimizer, TplimitsOptimizer):
            return TplimitsOptimizer(groups, optimizer.rule, lr=optimizer.defaults["lr"])
        return type(optimizer)(groups, **optimizer.defaults)


def linearize(model: nn.Module) -> LinearizedModel:
    """The first-order Taylor model of ``model`` in its trainable parameters around their current values
    (:class:`LinearizedModel`); train it with ``lin.optimizer_like(opt)``, ``opt`` the model's optimizer.

    >>> import torch, tplimits as tpl
    >>> lin = tpl.linearize(torch.nn.Linear(3, 1))
    >>> [tuple(d.shape) for d in lin.delta]
    [(1, 3), (1,)]
    """
    return LinearizedModel(model)
