"""Lowering: an fx graph traced at two widths -> a :class:`~tplimits.core.program.Program`.

Each fx node is dispatched to a lowering rule from the plugin registry (see
``TplimitsSpec.tplimits_lowering_rules``). A rule receives a :class:`LoweringContext` (the
mechanism: emit instructions, raise precise errors) and an :class:`OpNode` (the node with its
arguments already turned into program values and width-dependent constants), and returns the
program value(s) the node stands for. The rules carry the policy; this module knows no op.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import attrs
import torch
import torch.fx as fx

from tplimits.core.ir import (
    Avg,
    Constant,
    Input,
    Instruction,
    Layout,
    MatMul,
    Nonlin,
    Origin,
    Parameter,
    Ref,
    Regroup,
    Width,
    WidthInt,
    WidthPower,
    format_layout,
    layout_kind,
    resolve,
    width_axes,
    width_dependent,
)
from tplimits.core.program import Program
from tplimits.core.trace import WidthTrace, graph_attribute, subgraph_prefix
from tplimits.errors import LoweringError, NotRepresentable, UnsupportedOperation

# --------------------------------------------------------------------------------------------
# Values seen by rules
# --------------------------------------------------------------------------------------------


@attrs.frozen
class Value:
    """A tensor of the program: a reference to the instruction that computes it, with its layout.

    ``const`` holds the tensor when the value is a folded width-independent constant, so rules
    can inspect masks and indices.
    """

    name: str
    layout: Layout
    const: torch.Tensor | None = attrs.field(default=None, eq=False)

    @property
    def kind(self) -> str:
        return layout_kind(self.layout)

    @property
    def width_axis(self) -> int | None:
        axes = width_axes(self.layout)
        return axes[0] if len(axes) == 1 else None

    @property
    def ndim(self) -> int:
        return len(self.layout)

    @property
    def ref(self) -> Ref:
        return Ref(self.name)


@attrs.frozen
class MatrixValue:
    """A matrix-shaped tensor that is a parameter seen through axis permutations and scalings.

    ``axes[i]`` is the axis of the parameter that axis ``i`` of this tensor is; ``scales`` are
    factors (numbers, width constants, or scalar :class:`Value`) the matrix was multiplied by.
    Such a value is not an instruction of its own: it is folded into the :class:`MatMul` that uses it.
    """

    param: Value
    axes: tuple[int, ...]
    scales: tuple[Any, ...] = ()
    blocks: tuple[tuple[int, Fraction, Fraction], ...] = ()
    """Sub-matrix views: ``(parameter axis, start, stop)`` along width axes, in units of the width n (the
    rows ``[n, 3n)`` of a packed ``[3n, n]`` projection are ``(0, 1, 3)``)."""

    @property
    def layout(self) -> Layout:
        sizes = {axis: Width(stop - start) for axis, start, stop in self.blocks}
        return tuple(sizes.get(a, self.param.layout[a]) for a in self.axes)

    def block(self, axis: int, start: Fraction, stop: Fraction) -> MatrixValue:
        """The sub-matrix of coordinates ``[start·n, stop·n)`` along this view's width axis ``axis``."""
        param_axis = self.axes[axis]
        blocks = dict((a, (lo, hi)) for a, lo, hi in self.blocks)
        offset = blocks.get(param_axis, (Fraction(0), None))[0]
        blocks[param_axis] = (offset + start, offset + stop)
        return attrs.evolve(self, blocks=tuple((a, lo, hi) for a, (lo, hi) in sorted(blocks.items())))

    @property
    def kind(self) -> str:
        return "matrix"

    @property
    def ndim(self) -> int:
        return len(self.axes)


@attrs.frozen
class Subgraph:
    """The body of a higher-order op (a ``torch.no_grad()`` or autocast region, a branch of ``torch.cond``).

    A rule lowers it in place with :meth:`LoweringContext.inline`; ``prefix`` keys its nodes in the
    compared traces.
    """

    module: fx.GraphModule = attrs.field(eq=False)
    prefix: str


def is_tensor_value(x: Any) -> bool:
    return isinstance(x, Value | MatrixValue)


@attrs.frozen
class OpNode:
    """One fx node as a rule sees it.

    ``args`` / ``kwargs`` hold :class:`Value` / :class:`MatrixValue` for tensors, and plain or
    width-dependent constants otherwise. ``layout`` is the node's output layout (a tuple of
    layouts for multi-output ops, None for non-tensors).
    """

    name: str
    target: Any
    args: tuple
    kwargs: Mapping[str, Any]
    layout: Any
    origin: Origin

    @property
    def op_name(self) -> str:
        return self.origin.op

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Argument ``index`` positionally, else keyword ``name``, else ``default``."""
        if index < len(self.args):
            return self.args[index]
        return self.kwargs.get(name, default)


# --------------------------------------------------------------------------------------------
# The context: the mechanism rules use
# --------------------------------------------------------------------------------------------


class LoweringContext:
    """Emits instructions for the node being lowered and raises errors that name it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.instructions: list[Instruction] = []
        self._names: set[str] = set()
        self._parameters: dict[str, str] = {}  # instruction name -> parameter target
        self.node: OpNode | None = None
        self.notes: list[str] = []
        self.fan_in: dict[str, tuple[int, ...]] = {}
        self.lower_subgraph: Callable[[Subgraph, tuple], tuple] | None = None  # set by the driver

    # -- naming and emission ---------------------------------------------------------------------

    def _fresh(self, hint: str) -> str:
        base = re.sub(r"\W+", "_", hint).strip("_") or "v"
        name, i = base, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def emit(self, cls: type[Instruction], *, hint: str | None = None, const: torch.Tensor | None = None,
             **fields: Any) -> Value:
        origin = self.node.origin if self.node is not None else Origin()
        name = self._fresh(hint or (self.node.name if self.node is not None else cls.__name__.lower()))
        ins = cls(name=name, origin=origin, **fields)
        self.instructions.append(ins)
        if isinstance(ins, Parameter):
            self._parameters[name] = ins.target
        return Value(name, ins.layout, const)

    # -- instructions ----------------------------------------------------------------------------

    def nonlin(self, fn: Callable, *args: Any, layout: Layout, kwargs: Mapping[str, Any] | None = None,
               hint: str | None = None, smooth: bool = True, width_scale: str | None = None,
               differentiable: bool = True, gaussian: tuple | None = None,
               kinks: tuple[tuple[float, float], ...] = ()) -> Value:
        """Emit ``fn(*args, **kwargs)``, applied coordinate by coordinate along the width axis.

        ``smooth=False`` declares that ``fn`` has a kink or a jump; ``width_scale`` that it scales
        logits by its width-dependent constant; ``differentiable=False`` that backpropagation stops at
        this identity ``fn``; ``gaussian`` what it does to Gaussian arguments, ``kinks`` where its
        derivative in its first argument jumps (see :class:`~tplimits.core.ir.Nonlin`).
        """
        self._check_activation(layout)
        refs = self._to_refs(args, kwargs or {})
        return self.emit(Nonlin, hint=hint, fn=fn, args=refs[0], kwargs=refs[1], layout=layout, smooth=smooth,
                         width_scale=width_scale, differentiable=differentiable, gaussian=gaussian, kinks=kinks)

    def regroup(self, fn: Callable, *args: Any, layout: Layout, block: Fraction,
                kwargs: Mapping[str, Any] | None = None, hint: str | None = None) -> Value:
        """Emit a reshape that regroups width axes through equal blocks of width ``block·n``."""
        self._check_activation(layout)
        refs = self._to_refs(args, kwargs or {})
        return self.emit(Regroup, hint=hint, fn=fn, args=refs[0], kwargs=refs[1], layout=layout, block=block)

    def avg(self, x: Value, axis: int, *, keepdim: bool = False, sum_: bool = False, hint: str | None = None) -> Value:
        """Mean (or, with ``sum_``, the sum = ratio·n·mean) of ``x`` over its width axis ``axis``."""
        axis = axis % x.ndim
        if not isinstance(x.layout[axis], Width):
            raise LoweringError(f"avg over axis {axis} of {x.name}, which is not a width axis")
        if x.kind != "vector":
            self.not_representable(f"an average of a {x.kind}-shaped tensor")
        layout = list(x.layout)
        if keepdim:
            layout[axis] = 1
        else:
            del layout[axis]
        scale = WidthPower(float(x.layout[axis].ratio), 1) if sum_ else None
        return self.emit(Avg, hint=hint, vector=x.name, axis=axis, keepdim=keepdim, scale=scale,
                         layout=tuple(layout))

    def matmul(self, matrix: MatrixValue, vector: Value, equation: str, *, layout: Layout,
               hint: str | None = None) -> Value:
        """Emit ``einsum(equation, W, x)`` for the parameter behind ``matrix`` (axes as in ``matrix``).

        ``equation``'s first operand refers to ``matrix``'s axes; it is rewritten to refer to the
        parameter's own axes. Scalings of the matrix are applied to the result.
        """
        lhs, out = equation.split("->")
        m_letters, v_letters = lhs.split(",")
        param_letters = [""] * matrix.ndim
        for i, axis in enumerate(matrix.axes):
            param_letters[axis] = m_letters[i]
        contracted = [a for a, letter in zip(matrix.axes, m_letters, strict=True)
                      if letter in v_letters and letter not in out and isinstance(matrix.param.layout[a], Width)]
        if len(contracted) != 1:
            self.not_representable("a matrix product that does not contract exactly one width axis of the matrix "
                                   "with the width axis of a vector")
        width_param_axes = width_axes(matrix.param.layout)
        transposed = contracted[0] == width_param_axes[0]  # contracting the output (first) axis: Wᵀ x
        self._check_activation(layout)
        vector, full_layout, narrows = self._unblock(matrix, vector, param_letters, v_letters, out, layout)
        result = self.emit(MatMul, hint=hint, matrix=matrix.param.name, vector=vector.name,
                           equation=f"{''.join(param_letters)},{v_letters}->{out}", transposed=transposed,
                           layout=full_layout)
        for axis, start, stop, full in narrows:
            result = self._narrow(result, axis, start, stop, full)
        for scale in matrix.scales:
            result = self.nonlin(torch.ops.aten.mul.Tensor, result, scale, layout=layout)
        return result

    def _unblock(self, matrix: MatrixValue, vector: Value, param_letters: list[str], v_letters: str, out: str,
                 layout: Layout) -> tuple[Value, Layout, list[tuple]]:
        """A sub-matrix product as a product with the whole parameter: ``W[rows] x = (W x)[rows]`` (the
        narrowing left to the caller) and ``W[:, cols] x = W [0; x; 0]`` (the vector padded with zeros)."""
        full_layout = list(layout)
        narrows = []
        for axis, start, stop in matrix.blocks:
            full = matrix.param.layout[axis]
            letter = param_letters[axis]
            if letter in out:
                position = out.index(letter)
                full_layout[position] = full
                narrows.append((position, start, stop, full.ratio))
            elif letter in v_letters:
                vector = self._pad(vector, v_letters.index(letter), start, stop, full.ratio)
        return vector, tuple(full_layout), narrows

    def _pad(self, x: Value, axis: int, start: Fraction, stop: Fraction, full: Fraction) -> Value:
        pad = [0] * (2 * (x.ndim - axis))
        pad[-2:] = [_width_int(start), _width_int(full - stop)]
        layout = tuple(Width(full) if i == axis else a for i, a in enumerate(x.layout))
        return self.regroup(torch.ops.aten.constant_pad_nd.default, x, pad, layout=layout,
                            block=common_block(start, stop, full))

    def _narrow(self, y: Value, axis: int, start: Fraction, stop: Fraction, full: Fraction) -> Value:
        layout = tuple(Width(stop - start) if i == axis else a for i, a in enumerate(y.layout))
        return self.regroup(torch.ops.aten.narrow.default, y, axis, _width_int(start), _width_int(stop - start),
                            layout=layout, block=common_block(start, stop, full))

    def inline(self, body: Subgraph, operands: Sequence[Any]) -> tuple:
        """Lower the subgraph ``body`` of a higher-order op on ``operands``; its outputs' program values.

        The subgraph's instructions join the program in place, as if its code had been written inline.
        """
        if not isinstance(body, Subgraph) or self.lower_subgraph is None:
            raise LoweringError(f"{self.where()}: {body!r} is not a subgraph of the traced model")
        node = self.node
        try:
            return self.lower_subgraph(body, tuple(operands))
        finally:
            self.node = node  # the rule goes on emitting for its own node

    def record_fan_in(self, value: Any, axes: tuple[int, ...]) -> None:
        """Note that ``value``'s axes ``axes`` are summed against an input, if it is a parameter.

        Fan-in comes from how the op uses a weight, not from its shape (GPT-2 stores (in, out)).
        """
        if isinstance(value, MatrixValue):
            axes = tuple(value.axes[a] for a in axes)
            value = value.param
        if isinstance(value, Value) and value.name in self._parameters:
            self.fan_in.setdefault(self._parameters[value.name], tuple(sorted(axes)))

    def constant(self, value: torch.Tensor, hint: str | None = None) -> Value:
        return self.emit(Constant, hint=hint, value=value, layout=tuple(value.shape), const=value)

    # -- errors ----------------------------------------------------------------------------------

    def where(self) -> str:
        return self.node.origin.describe() if self.node is not None else "the program"

    def not_representable(self, what: str, hint: str = "") -> None:
        msg = f"{self.where()}: {what} has no Tensor Program counterpart."
        if hint:
            msg += " " + hint
        raise NotRepresentable(msg)

    def unsupported(self, what: str, hint: str | None = None) -> None:
        """Raise :class:`UnsupportedOperation`; ``hint`` replaces the advice to register a rule."""
        raise UnsupportedOperation(f"{self.where()}: {what}. " + (REGISTER_HINT if hint is None else hint))

    # -- helpers ---------------------------------------------------------------------------------

    def _check_activation(self, layout: Layout) -> None:
        count = len(width_axes(layout))
        if count > 1:
            self.not_representable(
                f"a computed tensor with {count} width axes {format_layout(layout)}",
                "Only parameters may be matrix-shaped; an activation whose size grows like n² (an outer "
                "product of two vectors over the width axis) cannot be expressed.",
            )

    def _to_refs(self, args: tuple, kwargs: Mapping[str, Any]) -> tuple[tuple, dict]:
        def convert(x: Any) -> Any:
            if isinstance(x, MatrixValue):
                self.not_representable(
                    "using a matrix-shaped parameter other than by multiplying a vector with it",
                    "Elementwise functions of weight matrices (weight norms, masks, sums of matrices) are "
                    "not Tensor Program operations.",
                )
            if isinstance(x, Value):
                return x.ref
            if isinstance(x, list | tuple):
                return type(x)(convert(a) for a in x)
            if isinstance(x, dict):
                return {k: convert(v) for k, v in x.items()}
            return x

        return convert(tuple(args)), convert(dict(kwargs))


def _width_int(ratio: Fraction) -> WidthInt | int:
    return WidthInt(ratio) if ratio else 0


def common_block(*ratios: Fraction) -> Fraction:
    """The largest width ratio of which every one of ``ratios`` is a whole multiple."""
    block = Fraction(0)
    for r in ratios:
        r = Fraction(r)
        block = Fraction(math.gcd(block.numerator * r.denominator, r.numerator * block.denominator),
                         block.denominator * r.denominator)
    return block


REGISTER_HINT = (
    "Register a lowering rule for it in a plugin: implement the hook `tplimits_lowering_rules` returning "
    "{op: rule} with `rule(ctx, node)` (see tplimits.ops for examples) and register the plugin with "
    "`tplimits.register_plugin` or the `tplimits` entry-point group."
)

# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def rule_for(target: Any, rules: Mapping[Any, Callable]) -> Callable | None:
    """The rule for ``target``: exact overload first, then its overload packet."""
    if target in rules:
        return rules[target]
    packet = getattr(target, "overloadpacket", None)
    if packet is not None and packet in rules:
        return rules[packet]
    return None


def lower_trace(wt: WidthTrace, rules: Mapping[Any, Callable], width: int) -> Program:
    """Lower the compared traces ``wt`` with ``rules``; the program is reported at ``width``."""
    ctx = LoweringContext(wt.n)
    trace = wt.trace
    gm = trace.graph_module
    env: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node.name] = _lower_placeholder(ctx, node, wt)
    ctx.lower_subgraph = lambda body, operands: _lower_subgraph(ctx, wt, rules, body, operands)
    _lower_nodes(ctx, wt, rules, gm, "", env, _live_nodes(gm, trace.outputs))
    outputs = []
    for out in trace.outputs:
        value = env.get(out.name) if isinstance(out, fx.Node) else None
        if not isinstance(value, Value):
            raise LoweringError(f"output {out!r} of the model is not a tensor the program computes")
        outputs.append(value.name)
    program = Program(ctx.instructions, outputs, width=width, out_spec=trace.out_spec, tracer=trace.tracer,
                      notes=ctx.notes, fan_in=ctx.fan_in)
    return _prune(program, wt.aliases)


def _lower_nodes(ctx: LoweringContext, wt: WidthTrace, rules: Mapping[Any, Callable], gm: fx.GraphModule,
                 prefix: str, env: dict[str, Any], live: set[str]) -> None:
    """Lower the live ops of ``gm`` (the traced graph, or a subgraph whose nodes are keyed by ``prefix``)
    into ``env``, whose placeholders are already bound."""
    for node in gm.graph.nodes:
        if node.name not in live:
            continue
        if node.op == "get_attr":
            attr = graph_attribute(gm, node.target)
            if isinstance(attr, fx.GraphModule):
                env[node.name] = Subgraph(attr, subgraph_prefix(prefix, node.target))
            else:
                env[node.name] = ctx.constant(attr.detach(), hint=node.name)
        elif node.op == "call_function":
            env[node.name] = _lower_call(ctx, node, wt, env, rules, prefix)


def _lower_subgraph(ctx: LoweringContext, wt: WidthTrace, rules: Mapping[Any, Callable], body: Subgraph,
                    operands: tuple) -> tuple:
    placeholders = [node for node in body.module.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != len(operands):
        raise LoweringError(f"{ctx.where()}: a subgraph with {len(placeholders)} inputs called with "
                            f"{len(operands)} operands")
    env = {node.name: value for node, value in zip(placeholders, operands, strict=True)}
    outputs = torch.utils._pytree.tree_leaves(body.module.graph.output_node().args[0])
    _lower_nodes(ctx, wt, rules, body.module, body.prefix, env, _live_nodes(body.module, tuple(outputs)))
    return tuple(env[out.name] if isinstance(out, fx.Node) else out for out in outputs)


def _lower_placeholder(ctx: LoweringContext, node: fx.Node, wt: WidthTrace) -> Any:
    p = wt.trace.placeholders[node.name]
    layout = wt.placeholder_layouts[node.name]
    origin = Origin(node.name, "placeholder", "")
    ctx.node = OpNode(node.name, "placeholder", (), {}, layout, origin)
    if p.role == "input":
        if layout is None:
            return None
        if width_axes(layout):
            ctx.not_representable(f"user input {p.index} with a width-sized axis {format_layout(layout)}",
                                  "Inputs must have the same size at every width.")
        dtype = node.meta["val"].dtype if "val" in node.meta else torch.get_default_dtype()
        return ctx.emit(Input, hint=f"input{p.index}", index=p.index, dtype=dtype, layout=layout)
    if p.role == "constant":
        if width_axes(layout):
            ctx.not_representable(f"constant tensor {p.target!r} with a width-sized axis")
        return ctx.constant(p.value.detach(), hint=node.name)
    hint = re.sub(r"\W+", "_", p.target)
    value = ctx.emit(Parameter, hint=hint, target=p.target, trainable=p.role == "parameter" and not p.frozen,
                     layout=layout)
    if value.kind == "matrix":
        return MatrixValue(value, tuple(range(len(layout))))
    if len(width_axes(layout)) > 2:
        ctx.not_representable(f"{p.role} {p.target!r} with {len(width_axes(layout))} width axes")
    return value


def _lower_call(ctx: LoweringContext, node: fx.Node, wt: WidthTrace, env: dict[str, Any],
                rules: Mapping[Any, Callable], prefix: str = "") -> Any:
    raw_args, raw_kwargs = wt.args[prefix + node.name]
    args = fx.node.map_arg(raw_args, lambda a: env[a.name])
    kwargs = fx.node.map_arg(raw_kwargs, lambda a: env[a.name])
    op = op_display_name(node.target)
    origin = Origin(node.name, op, user_source(node) or _body_source(args))
    layout = wt.layouts.get(prefix + node.name)
    ctx.node = OpNode(node.name, node.target, tuple(args), dict(kwargs), layout, origin)
    if node.target is operator.getitem:
        return _getitem(ctx, args)
    if (_is_constant_computation(args, kwargs) and not width_dependent((args, kwargs))
            and not _has_width_axis(ctx.node.layout)):
        return _fold(ctx, node, args, kwargs)
    rule = rule_for(node.target, rules)
    if rule is None:
        ctx.unsupported(f"no lowering rule for op {op}")
    return rule(ctx, ctx.node)


def _has_width_axis(layout: Any) -> bool:
    if layout is None:
        return False
    if any(isinstance(axis, tuple) or axis is None for axis in layout):  # multi-output
        return any(_has_width_axis(part) for part in layout)
    return bool(width_axes(layout))


def _live_nodes(gm: fx.GraphModule, outputs: tuple) -> set[str]:
    """fx nodes that the user outputs depend on; the rest (mutation side effects, dead code) is skipped."""
    live: set[str] = set()
    stack = [o for o in outputs if isinstance(o, fx.Node)]
    while stack:
        node = stack.pop()
        if node.name in live:
            continue
        live.add(node.name)
        stack.extend(node.all_input_nodes)
    return live


def _getitem(ctx: LoweringContext, args: tuple) -> Any:
    container, index = args
    if isinstance(container, list | tuple):
        return container[index]
    raise LoweringError(f"{ctx.where()}: indexing a {type(container).__name__}")


def _is_constant_computation(args: Any, kwargs: Any) -> bool:
    """True when no argument is a program value other than a folded constant."""
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    if any(isinstance(x, Subgraph) for x in leaves):  # a higher-order op: its rule inlines the body
        return False
    return all(not is_tensor_value(x) or (isinstance(x, Value) and x.const is not None) for x in leaves)


def _fold(ctx: LoweringContext, node: fx.Node, args: Any, kwargs: Any) -> Any:
    """Evaluate a width-independent constant computation (masks, position ids) now."""

    def unwrap(x: Any) -> Any:
        return x.const if isinstance(x, Value) else x

    real_args = torch.utils._pytree.tree_map(unwrap, resolve(args, ctx.n))
    real_kwargs = torch.utils._pytree.tree_map(unwrap, resolve(kwargs, ctx.n))
    out = node.target(*real_args, **real_kwargs)
    if isinstance(out, torch.Tensor):
        return ctx.constant(out.detach(), hint=node.name)
    if isinstance(out, list | tuple):
        return type(out)(ctx.constant(o.detach(), hint=node.name) if isinstance(o, torch.Tensor) else o
                         for o in out)
    return out


def op_display_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._overloadpacket.__name__}.{target._overloadname}"
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def user_source(node: fx.Node) -> str:
    """The innermost frame of the user's code that produced ``node`` (torch's own frames skipped)."""
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME.findall(trace)
    for path, line, func, code in reversed(frames):
        if "/torch/" in path or "/site-packages/torch" in path or path.startswith("<"):  # torch, generated code
            continue
        return f"{path}:{line} in {func}: {code.strip()}"
    if frames:
        path, line, func, code = frames[-1]
        return f"{path}:{line} in {func}: {code.strip()}"
    return ""


def _body_source(args: tuple) -> str:
    """The user's source line of a higher-order op, which torch.export records only inside its body."""
    for arg in args:
        if isinstance(arg, Subgraph):
            for node in arg.module.graph.nodes:
                if source := user_source(node):
                    return source
    return ""


def _prune(program: Program, aliases: Mapping[str, tuple[str, ...]]) -> Program:
    """Drop instructions no output depends on (dead code, mutation side effects, unused constants).

    Parameters the forward never reads are dropped too: a tied weight that torch.export lists
    under both names keeps one instruction, with the other name recorded as an alias.
    """
    live = set(program.outputs)
    kept = []
    for ins in reversed(program.instructions):
        if ins.name in live or isinstance(ins, Input):
            kept.append(ins)
            live.update(ins.inputs)
    kept.reverse()
    targets = {ins.target for ins in kept if isinstance(ins, Parameter)}
    unused = sorted(ins.target for ins in program.instructions
                    if isinstance(ins, Parameter) and ins.trainable and ins.target not in targets
                    and not set(aliases.get(ins.target, ())) & targets)
    notes = list(program.notes)
    if unused:
        notes.append(f"parameters the forward does not use: {unused}")
    used_aliases = {t: aliases[t] for t in targets if t in aliases}
    return attrs.evolve(program, instructions=kept, notes=notes, aliases=used_aliases, unused=tuple(unused))
