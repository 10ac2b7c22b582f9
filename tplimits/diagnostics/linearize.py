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
from torch.nn.attention import SDPBackend, sdpa_kernel
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
        if getattr(module, "track_running_stats", False):
            # batch statistics in training mode as in the model, but running statistics frozen at θ₀'s: a
            # function of the parameters has no state to update
            module.track_running_stats = False
    return base, dict(base.named_buffers())


_PLAIN = (bool, int, float, str, type(None))


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
        # a tensor shared by several modules (tied embeddings) has one name in named_parameters(); the
        # frozen copy holds it under each of them, and every one must carry the same point and tangent
        self._aliases: dict[str, list[str]] = {name: [] for name in self.names}
        first = {id(p): name for name, p in trained}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in first and name != first[id(p)]:
                self._aliases[first[id(p)]].append(name)

    def displacement(self, name: str) -> nn.Parameter:
        """The displacement of the model's parameter ``name``."""
        if name not in self.names:
            raise TplimitsError(f"no trained parameter {name!r}; the linearized ones are {list(self.names)}")
        return self.delta[self.names.index(name)]

    def _call(self, args: tuple, kwargs: dict, params: dict[str, torch.Tensor]) -> Any:
        shared = {alias: params[name] for name in params for alias in self._aliases.get(name, ())}
        # forward-mode AD exists for the math attention kernel only (not the fused CPU/GPU ones)
        with sdpa_kernel(SDPBackend.MATH):
            return functional_call(self.base, {**self._point, **params, **shared}, args, kwargs, strict=False,
                                   tie_weights=False)

    def function(self, *args: Any, **kwargs: Any) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """``θ -> output`` at these inputs, ``θ`` a dict of the trained tensors by name (the rest at ``θ₀``): the
        output tensor, or the output's tensors flattened and concatenated when it has several."""
        def call(params: dict[str, torch.Tensor]) -> torch.Tensor:
            tensors = [t for t in pytree.tree_leaves(self._call(args, kwargs, params)) if torch.is_tensor(t)]
            if not tensors:
                raise TplimitsError("the model's output holds no tensor to differentiate")
            return tensors[0] if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])
        return call

    def point(self) -> dict[str, torch.Tensor]:
        """``θ₀``: the trained tensors the model is linearized at, by name."""
        return {name: self._point[name] for name in self.names}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``f(θ₀) + J δ``, with the structure of the model's output; a leaf that is neither a tensor nor a
        plain value (a key/value cache object) is None."""
        structure: list[Any] = []

        def tensors(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
            leaves, tree = pytree.tree_flatten(self._call(args, kwargs, params))
            structure[:] = [tree, [torch.is_tensor(x) for x in leaves],
                            [x if isinstance(x, _PLAIN) else None for x in leaves]]
            return tuple(x for x in leaves if torch.is_tensor(x))

        out0, tangent = jvp(tensors, (self.point(),), (dict(zip(self.names, self.delta, strict=True)),))
        summed = iter([a + b for a, b in zip(out0, tangent, strict=True)])
        tree, is_tensor, plain = structure
        return pytree.tree_unflatten([next(summed) if t else x for t, x in zip(is_tensor, plain, strict=True)], tree)

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
            unknown = [p for p in group["params"] if id(p) not in self._source and p.requires_grad]
            if unknown:
                raise ConfigError(f"optimizer_like: the optimizer trains {len(unknown)} tensor(s) that are not "
                                  "trainable parameters of the linearized model (shapes "
                                  f"{[tuple(p.shape) for p in unknown[:3]]}); pass the model's own optimizer")
            mine = [self.delta[self._source[id(p)]] for p in group["params"] if id(p) in self._source]
            if mine:  # frozen tensors in the model's optimizer are never updated; they have no displacement
                groups.append({**group, "params": mine})
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
