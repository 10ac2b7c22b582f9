"""Finite-width models with a parametrization applied, and the matching optimizer.

``instantiate`` builds the architecture at width n and makes it an abcd-parametrized model:

* (b) every randomly initialized parameter is redrawn as ``N(0, (C·b_const·n^{-b})²)``, where ``C`` is
  ``1/√(fan-in)`` over the axes the model sums it against (fixed axes and the width ratio), and 1 for
  parameters never summed against anything (biases, embeddings); constant initial values (gains of 1,
  biases of 0) are kept (Remark 2.9.27);
* (a) multipliers ``a_const·n^{-a}`` through ``torch.nn.utils.parametrize`` (the trained tensor is
  ``...parametrizations.<name>.original``), so the model survives ``deepcopy`` and ``state_dict``;
* the output is multiplied by ``a_out_const·n^{-a_out}`` (and, with ``center=True``, the frozen initial
  function is subtracted);
* attention logits: where the parametrization fixes their power of width (μP: 1/d_head), calls to
  ``scaled_dot_product_attention`` get that scale; constants written into a model's own code are kept,
  with a warning.

The optimizer applies (c) and (d) per parameter: learning rate ``η·c_const·n^{-c}`` and gradients
scaled by ``n^{d}`` before the update function.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import math
import operator
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
import torch.nn as nn
from torch.nn.utils import parametrize as torch_parametrize
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from tplimits.core.frontend import resolve
from tplimits.core.lower import lower_trace
from tplimits.core.parametrize import ABCD, Parametrization, attention_scales, parameter_roles, update_exponent
from tplimits.core.program import Nonlin, Parameter, ParameterInfo, Program, Ref, Width, WidthPower
from tplimits.core.trace import trace_pair
from tplimits.errors import TplimitsError
from tplimits.plugins.manager import lowering_rules, parametrization


class Multiplier(nn.Module):
    """The parametrization ``W = scale · w`` of an abcd multiplier."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}"


class AttentionScale(TorchFunctionMode):
    """Gives ``scaled_dot_product_attention`` calls without an explicit scale ``coef · d_head^power``."""

    def __init__(self, coef: float, power: float) -> None:
        super().__init__()
        self.coef, self.power = coef, power

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.nn.functional.scaled_dot_product_attention and kwargs.get("scale") is None:
            kwargs["scale"] = self.coef * float(args[0].shape[-1]) ** self.power
        return func(*args, **kwargs)


class ParametrizedModel(nn.Module):
    """A model under an abcd-parametrization: the user's module plus the output multiplier.

    ``model`` is the user's architecture (with multipliers registered on its parameters);
    ``initial`` the frozen initial model when the function is centered (f − f₀).
    """

    def __init__(self, model: nn.Module, output_scale: float, attention: tuple[float, float] | None = None,
                 initial: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.output_scale = output_scale
        self.attention = attention
        self.initial = initial

    def _run(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.attention is None:
            return module(*args, **kwargs)
        with AttentionScale(*self.attention):
            return module(*args, **kwargs)

    def _output(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        return pytree.tree_map(lambda t: t * self.output_scale if torch.is_tensor(t) else t,
                               self._run(module, args, kwargs))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self._output(self.model, args, kwargs)
        if self.initial is None:
            return out
        with torch.no_grad():
            out0 = self._output(self.initial, args, kwargs)
        return pytree.tree_map(lambda a, b: a - b if torch.is_tensor(a) else a, out, out0)


def _owner(model: nn.Module, target: str) -> tuple[nn.Module, str]:
    path, _, attr = target.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _fan_in_constant(info: ParameterInfo) -> float:
    """1/√(number of entries summed against the input) at the width's ratio, excluding n itself."""
    if not info.fan_in_axes:
        return 1.0
    fan = 1.0
    for axis in info.fan_in_axes:
        spec = info.layout[axis]
        fan *= float(spec.ratio) if isinstance(spec, Width) else spec
    return 1.0 / math.sqrt(fan)


def init_std(info: ParameterInfo, abcd: ABCD, n: int) -> float:
    """The standard deviation ``C·b_const·n^{-b}`` a randomly initialized parameter is drawn with at width n."""
    return _fan_in_constant(info) * abcd.b_const * float(n) ** float(-abcd.b)


def multiplier(abcd: ABCD, n: int) -> float:
    """The abcd multiplier ``a_const·n^{-a}`` between a trained tensor and the parameter the model uses."""
    return abcd.a_const * float(n) ** float(-abcd.a)


def apply_parametrization(model: nn.Module, program: Program, param: Parametrization, n: int,
                          generator: torch.Generator | None = None, skip: set[str] | None = None) -> dict[str, ABCD]:
    """Re-initialize ``model`` (at width ``n``) and register its multipliers; returns each parameter's abcd.
    Parameters in ``skip`` (updated by a non-gradient rule) keep their own initialization."""
    roles = parameter_roles(program)
    infos = program.parameters
    chosen: dict[str, ABCD] = {}
    for name, role in roles.items():
        if skip and name in skip:
            continue
        abcd = param.for_parameter(name, role)
        chosen[name] = abcd
        owner, attr = _owner(model, name)
        tensor = getattr(owner, attr)
        with torch.no_grad():
            if tensor.numel() > 1 and not torch.all(tensor == tensor.flatten()[0]):
                tensor.normal_(0.0, init_std(infos[name], abcd, n), generator=generator)
        scale = multiplier(abcd, n)
        if scale != 1.0:
            for target in (name, *program.aliases.get(name, ())):
                module, attribute = _owner(model, target)
                torch_parametrize.register_parametrization(module, attribute, Multiplier(scale), unsafe=True)
    return chosen


def trained_tensor(model: nn.Module, target: str) -> torch.Tensor:
    """The tensor the optimizer updates for parameter ``target`` (the original under a multiplier)."""
    owner, attr = _owner(model, target)
    if torch_parametrize.is_parametrized(owner, attr):
        return owner.parametrizations[attr].original
    return getattr(owner, attr)


def effective_state(model: nn.Module, program: Program) -> dict[str, torch.Tensor]:
    """Each program parameter's effective value (multiplier applied), by its program name."""
    return {ins.target: operator.attrgetter(ins.target)(model) for ins in program if isinstance(ins, Parameter)}


def parametrized_program(program: Program, param: Parametrization) -> Program:
    """``program`` with the parametrization's output multiplier and attention scales in place: replayed
    with a ParametrizedModel's effective parameters it equals that model's output."""
    instructions = []
    for ins in program.instructions:
        if (param.attention_power is not None and isinstance(ins, Nonlin)
                and "scaled_dot_product_attention" in ins.origin.op):
            args = tuple(_rescale_attention(a, param.attention_power) for a in ins.args)
            ins = attrs.evolve(ins, args=args)
        instructions.append(ins)
    outputs = []
    scale = WidthPower(param.a_out_const, -param.a_out)
    for name in program.outputs:
        out = program[name]
        scaled = Nonlin(name=f"{name}_out", layout=out.layout, origin=out.origin, fn=torch.mul,
                        args=(Ref(name), scale))
        instructions.append(scaled)
        outputs.append(scaled.name)
    return attrs.evolve(program, instructions=instructions, outputs=outputs)


def _rescale_attention(arg: Any, power: Any) -> Any:
    if isinstance(arg, WidthPower) and arg.power < 0:
        # coef·n^p = d_head^{-1/2} for sdpa's default; the same constant at the new power: d_head^power
        return WidthPower(arg.coef ** (float(power) / float(arg.power)), power)
    return arg


@attrs.frozen
class Family:
    """An architecture lowered once: its program, and how to build it at any width."""

    program: Program
    build: Callable[[int], nn.Module] | None
    module: nn.Module | None = None
    update_rules: Mapping[str, str] = attrs.field(factory=dict)

    def model(self, width: int, seed: int) -> nn.Module:
        if self.build is None:
            if self.program.width != width:
                raise TplimitsError(f"the module given has width {self.program.width}, not {width}; pass a "
                                    "registered architecture or a callable `width -> nn.Module` to build other widths")
            return self.module
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return self.build(width)


def family(arch: Any, example_inputs: Any = None, base: nn.Module | None = None, **config: Any) -> Family:
    """Lower ``arch`` once (any form ``tpl.lower`` accepts) and keep how to build it at other widths."""
    if isinstance(arch, Family):
        return arch
    config.pop("width", None)
    pair = resolve(arch, example_inputs, base, **config)
    program = lower_trace(trace_pair(pair), lowering_rules(), width=pair.width)
    if isinstance(arch, nn.Module):
        return Family(program, None, arch)
    if isinstance(arch, str):
        from tplimits.plugins.manager import architecture

        spec = architecture(arch)
        return Family(program, functools.partial(spec.build, **config), update_rules=dict(spec.update_rules))
    return Family(program, functools.partial(arch, **config))


def instantiate(arch: Any, width: int, param: Any = "muP", optimizer: Any = "adam", lr: float = 1e-2,
                seed: int = 0, example_inputs: Any = None, base: nn.Module | None = None, center: bool = False,
                weight_decay: float = 0.0, clip: float | None = None, optimizer_options: Mapping | None = None,
                update_rules: Mapping[str, str] | None = None,
                **config: Any) -> tuple[ParametrizedModel, torch.optim.Optimizer]:
    """The architecture at ``width`` under ``param`` and the optimizer that trains it.

    ``arch`` is any form :func:`tplimits.lower` accepts, or a :class:`Family` (lowered once, reused).
    ``update_rules`` (``{pattern: rule name}``, added to the architecture's own) names parameters that a
    non-gradient rule updates instead of ``optimizer`` (decorrelation matrices): they keep their own
    initialization, their rule's rate is scaled by ``n^-r`` of the hidden role (1 under μP), and the
    returned optimizer records their layers' inputs.

    >>> model, opt = instantiate("mlp", width=64, param="muP", optimizer="sgd", lr=0.1)
    >>> type(model).__name__
    'ParametrizedModel'
    """
    param = parametrization(param)
    fam = family(arch, example_inputs, base, **config)
    model = fam.model(width, seed)
    program = fam.program
    rules = rule_assignment(program, {**fam.update_rules, **dict(update_rules or {})})
    generator = torch.Generator().manual_seed(seed)
    chosen = apply_parametrization(model, program, param, width, generator, skip=set(rules))
    attention = _attention_override(program, param)
    initial = None
    if center:
        initial = copy.deepcopy(model)
        for p in initial.parameters():
            p.requires_grad_(False)
    wrapped = ParametrizedModel(model, param.a_out_const * float(width) ** float(-param.a_out), attention, initial)
    opt = make_parametrized_optimizer(model, program, param, chosen, width, optimizer, lr, weight_decay=weight_decay,
                                      clip=clip, **dict(optimizer_options or {}))
    if rules:
        opt = CompositeOptimizer(model, opt, rules, lr, lr_scale=rule_lr_scale(param, width))
    return wrapped, opt


def rule_lr_scale(param: Parametrization, width: int) -> float:
    """The rate factor of a non-gradient rule: ``n^-r`` of the hidden role.

    A rule's own rate (decorrelation: c/n) is the maximal update; a parametrization whose hidden layers
    move features like n^-r scales it by n^-r (NTP: r = 1/2), so the rule stays in the same regime."""
    hidden = param.roles["hidden"]
    return float(width) ** float(-(hidden.c + hidden.a - 1))


def rule_assignment(program: Program, patterns: Mapping[str, str]) -> dict[str, str]:
    """Parameter name -> non-gradient rule name, for parameters matching ``patterns``."""
    assigned = {}
    for name, info in program.parameters.items():
        if not info.trainable:
            continue
        for pattern, rule in patterns.items():
            if fnmatch.fnmatchcase(name, pattern):
                assigned[name] = rule
                break
    return assigned


class CompositeOptimizer(torch.optim.Optimizer):
    """The training optimizer plus one optimizer per non-gradient rule (e.g. decorrelation).

    Each rule-driven parameter's layer input is recorded by a forward pre-hook on the module that
    owns it (that module's first positional input must be the parameter's input, as in
    ``decorrelated-mlp``), so a plain ``loss.backward(); opt.step()`` loop drives every rule.
    """

    def __init__(self, model: nn.Module, main: torch.optim.Optimizer, rules: Mapping[str, str], lr: float,
                 lr_scale: float = 1.0) -> None:
        from tplimits.optimizers import make_optimizer

        self.main = main
        self.inputs: dict[int, torch.Tensor] = {}
        self.others: list[tuple[torch.optim.Optimizer, list[torch.Tensor]]] = []
        by_rule: dict[str, list[str]] = {}
        for name, rule in rules.items():
            by_rule.setdefault(rule, []).append(name)
        for rule, names in by_rule.items():
            tensors = [trained_tensor(model, name) for name in names]
            groups = [{"params": [t], "name": n, "lr_scale": lr_scale} for t, n in zip(tensors, names, strict=True)]
            self.others.append((make_optimizer(rule, groups, lr=lr), tensors))
            for name, tensor in zip(names, tensors, strict=True):
                owner, _ = _owner(model, name)
                owner.register_forward_pre_hook(functools.partial(_record_input, self.inputs, id(tensor)))
        self.defaults = main.defaults
        self.state = main.state
        self.param_groups = main.param_groups + [g for opt, _ in self.others for g in opt.param_groups]
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.main.zero_grad(set_to_none)
        for opt, _ in self.others:
            opt.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self.main.step(closure)
        for opt, tensors in self.others:
            missing = [t for t in tensors if id(t) not in self.inputs]
            if missing:
                raise TplimitsError("a rule-driven parameter's layer has not run since the last step: call the model "
                                    "before opt.step()")
            opt.step(activations={t: self.inputs[id(t)] for t in tensors})
        self.inputs.clear()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"main": self.main.state_dict(), "rules": [opt.state_dict() for opt, _ in self.others]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.main.load_state_dict(state_dict["main"])
        for (opt, _), saved in zip(self.others, state_dict["rules"], strict=True):
            opt.load_state_dict(saved)


def _record_input(store: dict[int, torch.Tensor], key: int, module: nn.Module, args: tuple) -> None:
    store[key] = args[0].detach()


def _attention_override(program: Program, param: Parametrization) -> tuple[float, float] | None:
    if param.attention_power is None:
        return None
    scales = attention_scales(program)
    if not scales:
        return None
    explicit = [ins for ins in program if any(isinstance(a, WidthPower) for a in getattr(ins, "args", ()))
                and "scaled_dot_product_attention" not in ins.origin.op and ins.kind == "scalar"]
    if explicit:
        warnings.warn(
            f"{param.name} scales attention logits by n^{param.attention_power}, but the model multiplies them by a "
            f"width-dependent constant in its own code ({explicit[0].origin.describe()}); that choice is kept. Use "
            "scaled_dot_product_attention (or a scale argument) to let the parametrization set it.",
            stacklevel=3,
        )
    if not any("scaled_dot_product_attention" in ins.origin.op for ins in program):
        return None
    warnings.warn(
        f"{param.name} overrides the model's attention scale: scaled_dot_product_attention's default 1/√d_head "
        f"becomes d_head^{param.attention_power} (recorded in the program as {scales[0]})",
        stacklevel=3,
    )
    return 1.0, float(param.attention_power)


def make_parametrized_optimizer(model: nn.Module, program: Program, param: Parametrization,
                                chosen: Mapping[str, ABCD], width: int, optimizer: Any, lr: float,
                                weight_decay: float = 0.0, clip: float | None = None,
                                **hyper: Any) -> torch.optim.Optimizer:
    """Per-parameter learning rates ``η·c_const·n^{-c}`` and gradient scales ``n^{d}`` (Def 2.2.1)."""
    from tplimits.optimizers import make_optimizer

    tensors = {name: trained_tensor(model, name) for name in chosen}
    groups = parameter_groups(tensors, program, param, chosen, width, lr, weight_decay, clip)
    return make_optimizer(optimizer, groups, lr=lr, **hyper)


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
