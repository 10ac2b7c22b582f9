"""A finite-width model under an abcd-parametrization (Def 2.2.1 (a), (b); Def 2.9.7).

* (b) every randomly initialized parameter is redrawn as ``N(0, (C·b_const·n^{-b})²)``, where ``C`` is
  ``1/√(fan-in)`` over the axes the model sums it against (fixed axes and the width ratio), and 1 for
  parameters never summed against anything (biases, embeddings); deterministic initial values
  (gains of 1, biases of 0, ``c·I``) are kept (Remark 2.9.27, :mod:`tplimits.training.init`);
* (a) multipliers ``a_const·n^{-a}`` through ``torch.nn.utils.parametrize`` (the trained tensor is
  ``...parametrizations.<name>.original``), so the model survives ``deepcopy`` and ``state_dict``;
* the output is multiplied by ``a_out_const·n^{-a_out}`` (and, with ``center=True``, the frozen initial
  function is subtracted);
* attention logits: where the parametrization fixes their power of width (μP: 1/d_head), the scales
  that lowering rules declared as an op's default (``width_scale="default"``: sdpa's 1/√d_head) get
  that power; constants written into a model's own code are kept, with a warning.
"""

from __future__ import annotations

import inspect
import math
import operator
import warnings
from typing import Any

import attrs
import torch
import torch.nn as nn
from torch.nn.utils import parametrize as torch_parametrize
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from tplimits.core.ir import Nonlin, Parameter, Ref, WidthPower
from tplimits.core.program import Program
from tplimits.training.classify import attention_scales
from tplimits.training.init import init_std, initial_value, multiplier
from tplimits.training.parametrize import ABCD, Parametrization, parameter_roles


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
    """Gives ``scaled_dot_product_attention`` calls with the default scale (none given, or sdpa's own
    1/√d_head passed explicitly, as the lowering rule declares them) the scale ``coef · d_head^power``.

    ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` reach attention through functions whose
    inner sdpa call a mode does not see (:meth:`_scaled_queries`), and in eval mode without gradients
    through fused kernels (``torch._native_multi_head_attention``, ``torch._transformer_encoder_layer_fwd``)
    with sdpa's scale built in. Under a mode torch takes the slow path (an argument "has a torch function"),
    but the fused kernels are torch functions too: called anyway, they get the same query scaling, so
    eval outputs are those of the program."""

    def __init__(self, coef: float, power: float) -> None:
        super().__init__()
        self.coef, self.power = coef, power

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.nn.functional.scaled_dot_product_attention:
            d_head = float(args[0].shape[-1])
            given = kwargs.get("scale")
            if given is None or math.isclose(given, d_head ** -0.5, rel_tol=1e-9):
                kwargs["scale"] = self.coef * d_head ** self.power
        elif func is torch.nn.functional.multi_head_attention_forward:
            return func(**self._scaled_queries(func, args, kwargs))
        elif func in FUSED_ATTENTION:
            return func(*self._scaled_fused(func, args, kwargs))
        return func(*args, **kwargs)

    def _factor(self, embed_dim: int, heads: int) -> float:
        """What the queries are multiplied by so that sdpa's 1/√d_head becomes ``coef · d_head^power``."""
        d_head = embed_dim // heads
        return self.coef * float(d_head) ** self.power * math.sqrt(d_head)

    def _scaled_queries(self, func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
        """``multi_head_attention_forward``'s arguments with its query projection scaled so that the
        ``scaled_dot_product_attention`` it calls inside (``need_weights=False``) computes with
        ``coef · d_head^power`` instead of its default 1/√d_head. A mode does not see calls made inside a
        function that dispatches ``__torch_function__`` itself, so the scale moves onto the queries: the
        same function of the parameters, hence the same gradients. With ``need_weights=True`` it scales by
        a constant of its own code (kept, as the lowering records it) and is left alone."""
        bound = inspect.signature(func).bind(*args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        if call["need_weights"]:
            return call
        rows = call["embed_dim_to_check"]
        factor = self._factor(rows, call["num_heads"])
        if call["use_separate_proj_weight"]:
            call["q_proj_weight"] = call["q_proj_weight"] * factor
        else:
            call["in_proj_weight"] = _scale_rows(call["in_proj_weight"], rows, factor)
        call["in_proj_bias"] = _scale_rows(call["in_proj_bias"], rows, factor)
        return call

    def _scaled_fused(self, func: Any, args: tuple, kwargs: dict) -> list[Any]:
        """A fused kernel's arguments (as a positional list) with the query rows of its packed q/k/v weight
        and bias scaled as in :meth:`_scaled_queries`; ``need_weights=True`` is left alone, as there."""
        op, (embed_dim, heads, weight, bias, need_weights) = FUSED_ATTENTION[func]
        call = [kwargs.get(arg.name, args[i] if i < len(args) else arg.default_value)
                for i, arg in enumerate(op._schema.arguments)]
        if need_weights is not None and call[need_weights]:
            return call
        factor = self._factor(call[embed_dim], call[heads])
        call[weight] = _scale_rows(call[weight], call[embed_dim], factor)
        call[bias] = _scale_rows(call[bias], call[embed_dim], factor)
        return call


FUSED_ATTENTION = {
    torch._native_multi_head_attention: (torch.ops.aten._native_multi_head_attention.default, (3, 4, 5, 6, 10)),
    torch._transformer_encoder_layer_fwd: (torch.ops.aten._transformer_encoder_layer_fwd.default, (1, 2, 3, 4, None)),
}
"""torch's fused attention kernels (eval-mode fast paths): their aten op (for the argument list) and the
positions of embed_dim, the head count, the packed q/k/v weight and bias, and need_weights."""


def _scale_rows(tensor: torch.Tensor | None, rows: int, factor: float) -> torch.Tensor | None:
    """``tensor`` with its first ``rows`` rows (the queries of a packed q/k/v projection) times ``factor``."""
    if tensor is None:
        return None
    return torch.cat([tensor[:rows] * factor, tensor[rows:]])


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


def owner_of(model: nn.Module, target: str) -> tuple[nn.Module, str]:
    """The module holding attribute ``target`` (a dotted path) and the attribute's name."""
    path, _, attr = target.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


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
        owner, attr = owner_of(model, name)
        tensor = getattr(owner, attr)
        if initial_value(infos[name], tensor).redrawn:
            with torch.no_grad():
                tensor.normal_(0.0, init_std(infos[name], abcd, n), generator=generator)
        scale = multiplier(abcd, n)
        if scale != 1.0:
            for target in (name, *program.aliases.get(name, ())):
                module, attribute = owner_of(model, target)
                torch_parametrize.register_parametrization(module, attribute, Multiplier(scale), unsafe=True)
    return chosen


def trained_tensor(model: nn.Module, target: str) -> torch.Tensor:
    """The tensor the optimizer updates for parameter ``target`` (the original under a multiplier)."""
    owner, attr = owner_of(model, target)
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
        if param.attention_power is not None and isinstance(ins, Nonlin) and ins.width_scale == "default":
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


def attention_override(program: Program, param: Parametrization) -> tuple[float, float] | None:
    """``(coef, power)`` for :class:`AttentionScale` when ``param`` sets the attention logits' scale and the
    program has an op default to set (warning that the model's own constants are kept), else None."""
    if param.attention_power is None:
        return None
    explicit = [ins for ins in program if getattr(ins, "width_scale", None) == "model"]
    if explicit:
        warnings.warn(
            f"{param.name} scales attention logits by n^{param.attention_power}, but the model multiplies them by a "
            f"width-dependent constant in its own code ({explicit[0].origin.describe()}); that choice is kept. Use "
            "scaled_dot_product_attention (or a scale argument) to let the parametrization set it.",
            stacklevel=4,
        )
    defaults = attention_scales(program, "default")
    if not defaults:
        return None
    warnings.warn(
        f"{param.name} overrides the model's attention scale: scaled_dot_product_attention's default 1/√d_head "
        f"(given or not) becomes d_head^{param.attention_power} (recorded in the program as {defaults[0]})",
        stacklevel=4,
    )
    return 1.0, float(param.attention_power)


