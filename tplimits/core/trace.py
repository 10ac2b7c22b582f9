"""The torch.fx front end: trace a model at two widths and find what grows with width.

The graph that is lowered comes from ``torch.export`` (``strict=False``: an aten-level fx graph,
train mode). ``torch.fx.symbolic_trace`` followed by pre-dispatch ``make_fx`` is the fallback; it
gives the same aten op set. The second trace, at another width, only serves to compare shapes and
constants; it uses the cheaper fake-tensor ``make_fx`` trace (the same ops, node for node) and
falls back to a second ``torch.export`` when the two do not line up.

Comparing the traces node by node gives

* the layout of every value: which axes grow with width, and their ratio to n (d_ff = 4·d_model);
* every width-dependent argument: integer sizes (``WidthInt``) and constants ``coef·n^p``
  (``WidthPower``, e.g. attention's 1/√d_head), recorded instead of baked in.
"""

from __future__ import annotations

import copy
import math
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import attrs
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from tplimits.core.ir import Layout, Width, WidthInt, WidthPower, format_layout
from tplimits.errors import TraceError, WidthError

# --------------------------------------------------------------------------------------------
# One trace
# --------------------------------------------------------------------------------------------


@attrs.frozen
class Placeholder:
    """What an fx placeholder stands for: a parameter, buffer, constant tensor or user input."""

    role: str  # "parameter" | "buffer" | "constant" | "input"
    target: str = ""  # fully qualified name for parameters and buffers
    index: int = -1  # position among the flattened user inputs
    value: torch.Tensor | None = attrs.field(default=None, eq=False)  # constant tensors
    # a parameter with requires_grad=False: the user froze it, so it is replayed as it is and never trained
    frozen: bool = False


@attrs.frozen
class GraphTrace:
    """One traced graph with the meaning of its placeholders."""

    graph_module: fx.GraphModule
    placeholders: dict[str, Placeholder]
    outputs: tuple[Any, ...]  # flattened user outputs (fx nodes or constants)
    out_spec: Any
    tracer: str


def export_trace(model: torch.nn.Module, inputs: tuple) -> GraphTrace:
    """``torch.export.export(model, inputs, strict=False)`` as a :class:`GraphTrace`."""
    from torch.export.graph_signature import InputKind, OutputKind

    ep = torch.export.export(model, inputs, strict=False)
    frozen = _frozen(model)
    placeholders: dict[str, Placeholder] = {}
    user_index = 0
    for spec in ep.graph_signature.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.PARAMETER:
            placeholders[name] = Placeholder("parameter", spec.target, frozen=spec.target in frozen)
        elif spec.kind == InputKind.BUFFER:
            placeholders[name] = Placeholder("buffer", spec.target)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            placeholders[name] = Placeholder("constant", spec.target, value=ep.constants[spec.target])
        elif spec.kind == InputKind.USER_INPUT:
            placeholders[name] = Placeholder("input", index=user_index)
            user_index += 1
        else:
            raise TraceError(f"torch.export produced an input of kind {spec.kind} ({name!r}), which tplimits "
                             "does not handle (custom objects and effect tokens are not supported)")
    output_node = ep.graph_module.graph.output_node()
    flat_out = pytree.tree_leaves(output_node.args[0])
    user_outputs = tuple(
        arg for arg, spec in zip(flat_out, ep.graph_signature.output_specs, strict=True)
        if spec.kind == OutputKind.USER_OUTPUT
    )
    return GraphTrace(ep.graph_module, placeholders, user_outputs, ep.call_spec.out_spec, "torch.export")


def _frozen(model: torch.nn.Module) -> set[str]:
    """The names (every alias) of the parameters with ``requires_grad=False``."""
    return {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def make_fx_trace(model: torch.nn.Module, inputs: tuple, *, tracer: str = "make_fx",
                  fake: bool = True) -> GraphTrace:
    """A pre-dispatch ``make_fx`` trace of ``model`` (the op set of ``torch.export``'s training IR)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    params = list(model.named_parameters(remove_duplicate=False))
    buffers = list(model.named_buffers(remove_duplicate=False))
    names = [k for k, _ in params] + [k for k, _ in buffers]
    flat_inputs, in_spec = pytree.tree_flatten(inputs)
    out_spec_box: list[Any] = []

    def run(state: list[torch.Tensor], flat: list[Any]) -> list[Any]:
        args = pytree.tree_unflatten(flat, in_spec)
        out = torch.func.functional_call(model, dict(zip(names, state, strict=True)), tuple(args))
        leaves, spec = pytree.tree_flatten(out)
        out_spec_box.append(spec)
        return leaves

    state = [t for _, t in params] + [t for _, t in buffers]
    gm = make_fx(run, pre_dispatch=True, tracing_mode="fake" if fake else "real")(state, flat_inputs)
    placeholders: dict[str, Placeholder] = {}
    nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    n_params = len(params)
    for i, node in enumerate(nodes):
        if i < n_params:
            placeholders[node.name] = Placeholder("parameter", names[i], frozen=not params[i][1].requires_grad)
        elif i < len(names):
            placeholders[node.name] = Placeholder("buffer", names[i])
        else:
            placeholders[node.name] = Placeholder("input", index=i - len(names))
    outputs = tuple(pytree.tree_leaves(gm.graph.output_node().args[0]))
    return GraphTrace(gm, placeholders, outputs, out_spec_box[-1] if out_spec_box else None, tracer)


def trace_graph(model: torch.nn.Module, inputs: tuple) -> GraphTrace:
    """torch.export first, fx.symbolic_trace (+ pre-dispatch make_fx to reach aten) as fallback."""
    try:
        return export_trace(model, inputs)
    except Exception as export_error:  # noqa: BLE001 - any tracer failure moves on to the fallback
        export_reason = error_reason(export_error)
    try:
        symbolic = fx.symbolic_trace(model)
        return make_fx_trace(symbolic, inputs, tracer="fx.symbolic_trace", fake=False)
    except Exception as fx_error:  # noqa: BLE001
        fx_reason = error_reason(fx_error)
    raise TraceError(
        f"could not trace {type(model).__name__}.\n"
        f"  torch.export(strict=False) failed: {export_reason}\n"
        f"  torch.fx.symbolic_trace failed: {fx_reason}\n"
        "Make the forward traceable (no data-dependent Python control flow on tensor values), or pass "
        "a model whose forward takes the example inputs positionally."
    )


def error_reason(error: Exception) -> str:
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return first[:500]


# --------------------------------------------------------------------------------------------
# Two traces: width axes and width-dependent constants
# --------------------------------------------------------------------------------------------


@attrs.frozen
class WidthTrace:
    """The lowered trace (at width ``n``) with, for every node, its layout and resolved arguments."""

    trace: GraphTrace
    n: int
    layouts: dict[str, Any]  # node name -> Layout, tuple of Layouts, or None (non-tensor)
    args: dict[str, tuple[tuple, dict]]  # node name -> (args, kwargs) with width-dependent leaves
    placeholder_layouts: dict[str, Layout]
    aliases: dict[str, tuple[str, ...]] = attrs.field(factory=dict)  # tied tensors: name -> other names
    second_tracer: str = "make_fx"  # what traced the second width: a trace at another batch size takes the same
    batch_trace: GraphTrace | None = None  # the second trace, when it was taken at another batch size too
    batch_sizes: tuple[int, int] | None = None  # the batch sizes of the two traces then
    batch_axis: int = 0  # the inputs' axis holding the examples (:func:`batch_axis`)


def compare_traces(a: GraphTrace, b: GraphTrace, n_a: int, n_b: int,
                   batch: tuple[int, int] | None = None) -> WidthTrace:
    """Compare two traces of the same model family at widths ``n_a`` and ``n_b``.

    ``batch``: the traces' batch sizes when they differ; a size proportional to the batch size is then
    fixed at ``a``'s (:func:`other_batch_size` keeps it from passing for a width).
    The subgraphs of higher-order ops (a ``torch.no_grad()`` or autocast region) are compared too;
    their nodes are keyed by :func:`subgraph_prefix` + node name.
    """
    if n_a == n_b:
        raise WidthError(f"the two traces have the same width {n_a}; trace at two different widths")
    layouts: dict[str, Any] = {}
    args: dict[str, tuple[tuple, dict]] = {}
    placeholder_layouts = {}
    for node, other in matched_placeholders(a, b, (f"width {n_a}", f"width {n_b}")):
        layout = _layout(_value_shape(node, a), _value_shape(other, b), n_a, n_b, node.name, batch)
        layouts[node.name] = layout
        placeholder_layouts[node.name] = layout
    _compare_calls(a.graph_module, b.graph_module, "", (n_a, n_b, batch), layouts, args)
    return WidthTrace(a, n_a, layouts, args, placeholder_layouts)


def subgraph_prefix(prefix: str, target: str) -> str:
    """The key prefix of the nodes of subgraph ``target`` of the graph whose nodes have ``prefix``."""
    return f"{prefix}{target}/"


def graph_attribute(gm: fx.GraphModule, target: str) -> Any:
    """What a ``get_attr`` node of ``gm`` reads: a tensor, or a subgraph (``fx.GraphModule``)."""
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _call_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The ops of ``gm`` that are compared between traces. Checks that compute nothing (no result, no use:
    the metadata assertions torch.export inserts before a ``.to``, which ``make_fx`` does not) are left out."""
    return [n for n in gm.graph.nodes if n.op == "get_attr"
            or n.op == "call_function" and (n.users or _meta_value(n) is not None)]


def _compare_calls(gm_a: fx.GraphModule, gm_b: fx.GraphModule, prefix: str, widths: tuple,
                   layouts: dict[str, Any], args: dict[str, tuple[tuple, dict]]) -> None:
    """Layouts and width-dependent arguments of the ops of ``gm_a`` (and, recursively, its subgraphs);
    ``widths`` = (n_a, n_b, batch sizes or None)."""
    n_a, n_b, batch = widths
    nodes_a, nodes_b = _call_nodes(gm_a), _call_nodes(gm_b)
    check_aligned(nodes_a, nodes_b, n_a, n_b)
    for node_a, node_b in zip(nodes_a, nodes_b, strict=True):
        key = prefix + node_a.name
        if node_a.op == "get_attr":
            value_a, value_b = graph_attribute(gm_a, node_a.target), graph_attribute(gm_b, node_b.target)
            if isinstance(value_a, fx.GraphModule) and isinstance(value_b, fx.GraphModule):
                layouts[key] = None
                _compare_calls(value_a, value_b, subgraph_prefix(prefix, node_a.target), widths, layouts, args)
                continue
            shapes = _shape_of(value_a), _shape_of(value_b)
        else:
            shapes = _shape_of(_meta_value(node_a)), _shape_of(_meta_value(node_b))
        layouts[key] = _layout(*shapes, n_a, n_b, key, batch)
        if node_a.op == "call_function":
            where = f"node {key!r} ({_target_name(node_a.target)})"
            (args_a, kwargs_a), (args_b, kwargs_b) = _with_defaults(node_a, node_b)
            args[key] = (
                _merge_args(args_a, args_b, n_a, n_b, where, batch),
                _merge_args(kwargs_a, kwargs_b, n_a, n_b, where, batch),
            )


def check_aligned(nodes_a: Sequence[fx.Node], nodes_b: Sequence[fx.Node], n_a: int, n_b: int,
                  what: str = "width") -> None:
    """The two traces (at ``what`` n_a and n_b) run the same ops in the same order."""
    for i, (x, y) in enumerate(zip(nodes_a, nodes_b, strict=False)):
        if x.target != y.target:
            raise TraceError(
                f"the traces at {what}s {n_a} and {n_b} differ at op #{i}: {_target_name(x.target)} "
                f"({x.name}) vs {_target_name(y.target)} ({y.name}). The forward's control flow depends on "
                f"{what}; tplimits needs the same computation at every {what}."
            )
    if len(nodes_a) != len(nodes_b):
        raise TraceError(f"the traces at {what}s {n_a} and {n_b} have {len(nodes_a)} and {len(nodes_b)} ops; "
                         f"the forward's control flow depends on {what}")


def _with_defaults(x: fx.Node, y: fx.Node) -> tuple[tuple[tuple, dict], tuple[tuple, dict]]:
    """Both nodes' arguments with omitted schema defaults filled in, so that a tracer that writes
    defaults out (torch.export) and one that drops them (make_fx) give comparable argument lists."""
    args_x, args_y = tuple(x.args), tuple(y.args)
    kwargs_x, kwargs_y = dict(x.kwargs), dict(y.kwargs)
    schema = getattr(x.target, "_schema", None)
    if schema is None:
        return (args_x, kwargs_x), (args_y, kwargs_y)
    positional = [a for a in schema.arguments if not a.kwarg_only]
    length = max(len(args_x), len(args_y))

    def pad(args: tuple) -> tuple:
        return args + tuple(positional[i].default_value for i in range(len(args), min(length, len(positional))))

    for arg in schema.arguments:
        if arg.kwarg_only and (arg.name in kwargs_x) != (arg.name in kwargs_y) and arg.has_default_value():
            kwargs_x.setdefault(arg.name, arg.default_value)
            kwargs_y.setdefault(arg.name, arg.default_value)
    args_x, args_y = pad(args_x), list(pad(args_y))
    for i, arg in enumerate(positional[: len(args_y)]):
        if arg.name in BACKEND_FLAGS:  # which kernel to use, not what is computed: the lowered trace's wins
            args_y[i] = args_x[i]
    return (args_x, kwargs_x), (tuple(args_y), kwargs_y)


BACKEND_FLAGS = {"cudnn_enable", "cudnn_enabled"}


def matched_placeholders(a: GraphTrace, b: GraphTrace, where: tuple[str, str]) -> list[tuple[fx.Node, fx.Node]]:
    """Every placeholder of ``a`` with ``b``'s placeholder for the same parameter, buffer, constant or input
    (``where``: what the two traces were taken at, for the error that names one ``b`` lacks)."""
    by_key = {(p.role, p.target, p.index): name for name, p in b.placeholders.items()}
    nodes_b = {node.name: node for node in b.graph_module.graph.nodes if node.op == "placeholder"}
    pairs = []
    for node in a.graph_module.graph.nodes:
        if node.op != "placeholder":
            continue
        p = a.placeholders[node.name]
        other = nodes_b.get(by_key.get((p.role, p.target, p.index)))
        if other is None:
            raise TraceError(f"{p.role} {p.target or p.index!r} appears in the trace at {where[0]} but "
                             f"not in the trace at {where[1]}")
        pairs.append((node, other))
    return pairs


def _target_name(target: Any) -> str:
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", repr(target))


def _value_shape(node: fx.Node, trace: GraphTrace) -> Any:
    """Shape of a placeholder's value: a tuple of ints, or None."""
    if trace.placeholders[node.name].value is not None:
        return _shape_of(trace.placeholders[node.name].value)
    return _shape_of(_meta_value(node))


def _meta_value(node: fx.Node) -> Any:
    return node.meta.get("val", node.meta.get("example_value"))


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    if isinstance(value, list | tuple):
        return tuple(_shape_of(v) for v in value)
    return None


def _layout(shape_a: Any, shape_b: Any, n_a: int, n_b: int, where: str, batch: tuple[int, int] | None = None) -> Any:
    if shape_a is None or shape_b is None:
        return None
    if shape_a and isinstance(shape_a[0], tuple | type(None)):  # multi-output
        return tuple(_layout(x, y, n_a, n_b, where, batch) for x, y in zip(shape_a, shape_b, strict=True))
    if len(shape_a) != len(shape_b):
        raise TraceError(f"node {where!r} has rank {len(shape_a)} at width {n_a} but {len(shape_b)} at {n_b}")
    axes = []
    for axis, (sa, sb) in enumerate(zip(shape_a, shape_b, strict=True)):
        if sa == sb:
            axes.append(sa)
            continue
        ratio = Fraction(sa, n_a)
        if Fraction(sb, n_b) != ratio and _per_example(sa, sb, batch):
            axes.append(sa)
            continue
        if Fraction(sb, n_b) != ratio:
            raise WidthError(
                f"axis {axis} of node {where!r} has size {sa} at width {n_a} and {sb} at width {n_b}: it does "
                "not grow in proportion to width, which a Tensor Program cannot express"
            )
        axes.append(Width(ratio))
    return tuple(axes)


def _merge_args(x: Any, y: Any, n_a: int, n_b: int, where: str, batch: tuple[int, int] | None = None) -> Any:
    """Arguments of one node at two widths -> arguments with width-dependent leaves made explicit."""
    if isinstance(x, fx.Node):
        return x
    if isinstance(x, list | tuple) and isinstance(y, list | tuple) and len(x) == len(y):
        return type(x)(_merge_args(p, q, n_a, n_b, where, batch) for p, q in zip(x, y, strict=True))
    if isinstance(x, dict) and isinstance(y, dict) and x.keys() == y.keys():
        return {k: _merge_args(x[k], y[k], n_a, n_b, where, batch) for k in x}
    if type(x) is not type(y) and not (isinstance(x, int | float) and isinstance(y, int | float)):
        raise TraceError(f"{where}: argument {x!r} at width {n_a} but {y!r} at width {n_b}")
    if isinstance(x, bool) or x == y:
        if x != y:
            raise TraceError(f"{where}: flag {x!r} at width {n_a} but {y!r} at width {n_b}")
        return x
    if isinstance(x, int) and isinstance(y, int):
        ratio = Fraction(x, n_a)
        if Fraction(y, n_b) != ratio and _per_example(x, y, batch):
            return x
        if Fraction(y, n_b) != ratio:
            raise WidthError(f"{where}: integer argument {x} at width {n_a} and {y} at width {n_b} is not "
                             "proportional to width")
        return WidthInt(ratio)
    if isinstance(x, int | float) and isinstance(y, int | float):
        return fit_width_power(float(x), float(y), n_a, n_b, where)
    raise TraceError(f"{where}: argument {x!r} at width {n_a} but {y!r} at width {n_b}")


def _per_example(x: int, y: int, batch: tuple[int, int] | None) -> bool:
    """Whether sizes ``x`` and ``y`` are proportional to the batch sizes ``batch`` of their traces."""
    return batch is not None and Fraction(x, batch[0]) == Fraction(y, batch[1])


def other_batch_size(size: int, widths: tuple[int, int]) -> int:
    """A batch size to trace at besides ``size``: one more, unless its ratio to ``size`` is a power ``p`` of the
    ratio of the two ``widths`` (p = ±1: a size that grows with the batch would pass for a width axis; another
    simple fraction: a constant proportional to the batch size would pass for ``coef·n^p``)."""
    other = size + 1
    while _power_of(other / size, widths[1] / widths[0]):
        other += 1
    return other


def _power_of(x: float, base: float) -> bool:
    p = Fraction(math.log(x) / math.log(base)).limit_denominator(12)
    return math.isclose(base ** float(p), x, rel_tol=1e-9)


def fit_width_power(x: float, y: float, n_a: int, n_b: int, where: str) -> WidthPower:
    """The constant ``coef·n^p`` that takes value x at width n_a and y at n_b (p a simple fraction)."""
    if x == 0 or y == 0 or (x > 0) != (y > 0):
        raise WidthError(f"{where}: constant {x!r} at width {n_a} but {y!r} at width {n_b} is not a power of width")
    p = Fraction(math.log(y / x) / math.log(n_b / n_a)).limit_denominator(12)
    coef = x / float(n_a) ** float(p)
    if not math.isclose(coef * float(n_b) ** float(p), y, rel_tol=1e-9):
        raise WidthError(f"{where}: constant {x!r} at width {n_a} but {y!r} at width {n_b} is not coef·n^p for "
                         "a simple fraction p")
    return WidthPower(coef, p)


# --------------------------------------------------------------------------------------------
# Resolving what the user handed over into two models
# --------------------------------------------------------------------------------------------


@attrs.frozen
class ModelPair:
    """The model the program is lowered from (width ``n``) and a second one at ``n_other``."""

    model: torch.nn.Module
    other: torch.nn.Module
    inputs: tuple
    n: int
    n_other: int
    width: int  # the width the program is reported at (the user's requested width)


def infer_widths(model: torch.nn.Module, base: torch.nn.Module) -> tuple[int, int]:
    """The widths of ``model`` and ``base`` from their parameter shapes (as mup does, but checked).

    Every axis that differs must scale by one common factor; the reference width n is the most
    frequent differing size among the parameters (d_model in a transformer), ties to the smallest.
    """
    shapes_a = {k: tuple(v.shape) for k, v in _state(model).items()}
    shapes_b = {k: tuple(v.shape) for k, v in _state(base).items()}
    if shapes_a.keys() != shapes_b.keys():
        missing = sorted(shapes_a.keys() ^ shapes_b.keys())[:5]
        raise WidthError(f"`base` does not have the same parameters as the model (e.g. {missing}); pass the same "
                         "architecture at another width")
    factors: set[Fraction] = set()
    sizes: Counter[tuple[int, int]] = Counter()
    for name, sa in shapes_a.items():
        sb = shapes_b[name]
        if len(sa) != len(sb):
            raise WidthError(f"parameter {name!r} has shape {sa} in the model but {sb} in `base`")
        for x, y in zip(sa, sb, strict=True):
            if x != y:
                factors.add(Fraction(x, y))
                sizes[(x, y)] += 1
    if not sizes:
        raise WidthError("the model and `base` have identical parameter shapes: nothing grows with width. "
                         "Pass `base=` the same architecture at a different width")
    if len(factors) != 1:
        raise WidthError(f"the parameter sizes of the model and `base` do not scale by one common factor "
                         f"(factors {sorted(map(str, factors))}); every width axis must grow in proportion")
    (n, n_base), _ = min(sizes.items(), key=lambda kv: (-kv[1], kv[0][0]))
    return n, n_base


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    return state


def check_no_state_updates(model: torch.nn.Module, width: int, inputs: tuple) -> None:
    """Refuse a model whose forward changes its own parameters or buffers.

    ``torch.export`` drops such updates silently (a decorrelation matrix updated inside forward
    would be frozen), so the program would not be the model. Batch-norm running statistics are
    allowed: in train mode they do not affect the output.
    """
    allowed = _batchnorm_statistics(model)
    probe = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in _state(probe).items()}
    with torch.no_grad():
        try:
            probe(*inputs)
        except Exception as error:  # noqa: BLE001 - any failure of the user's forward is reported as such
            raise TraceError(_inputs_hint(model, width, error)) from error
    after = _state(probe)
    for name, old in before.items():
        if name in allowed:
            continue
        new = after.get(name)
        if new is None or new.shape != old.shape or not torch.equal(new.detach(), old):
            raise TraceError(
                f"the forward pass of {type(model).__name__} changes {name!r}. State updated inside forward "
                "is dropped by torch.export, so the lowered program would not be this model. Move the update "
                "out of forward (for a decorrelation matrix: make it a parameter and update it with the "
                "decorrelation optimizer rule)."
            )


def _batchnorm_statistics(model: torch.nn.Module) -> set[str]:
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._NormBase):
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                names.add(f"{prefix}.{buf}" if prefix else buf)
    return names


def build_pair(build: Callable[[int], torch.nn.Module], inputs: tuple, n: int, n_other: int,
               width: int) -> ModelPair:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build(n)
        other = build(n_other)
    return ModelPair(model, other, inputs, n, n_other, width)


def trace_pair(pair: ModelPair) -> WidthTrace:
    """Trace both models of ``pair`` and compare them."""
    check_no_state_updates(*smaller(pair), pair.inputs)
    return compare_widths(pair, trace_graph(pair.model, pair.inputs))


def smaller(pair: ModelPair) -> tuple[torch.nn.Module, int]:
    """The smaller model of ``pair`` and its width (the cheaper one to run)."""
    return (pair.model, pair.n) if _numel(pair.model) <= _numel(pair.other) else (pair.other, pair.n_other)


def compare_widths(pair: ModelPair, main: GraphTrace) -> WidthTrace:
    """``main`` (the trace of ``pair.model``) compared with a trace of ``pair.other``.

    The second trace is taken on more examples (along :func:`batch_axis`) when the inputs have a batch
    axis, so that it also tells which sizes grow with the batch size (:mod:`tplimits.core.batch`); should
    that fail (a model whose graph depends on the batch size), it is taken again on the same inputs. A
    fake-tensor ``make_fx``
    trace is tried first, ``torch.export`` after it.
    """
    axis = batch_axis(smaller(pair)[0], pair.inputs)
    size = batch_size(pair.inputs, axis)
    batches = [None] if size is None else [(size, other_batch_size(size, (pair.n, pair.n_other))), None]
    tracers = [make_fx_trace] + ([export_trace] if main.tracer == "torch.export" else [])
    for batch in batches:
        inputs = pair.inputs if batch is None else resize_batch(pair.inputs, batch[1], axis)
        for tracer in tracers:
            last = batch is None and tracer is tracers[-1]
            try:
                other = tracer(pair.other, inputs)
            except Exception as error:  # noqa: BLE001 - the cheaper traces are optimisations; the last one decides
                if last and tracer is export_trace:
                    raise TraceError(_inputs_hint(pair.other, pair.n_other, error)) from error
                if last:
                    raise
                continue
            try:
                compared = compare_traces(main, other, pair.n, pair.n_other, batch)
            except Exception:  # noqa: BLE001
                if last:
                    raise
                continue
            return attrs.evolve(compared, aliases=tied_names(pair.model), second_tracer=other.tracer,
                                batch_trace=other if batch else None, batch_sizes=batch, batch_axis=axis)
    raise AssertionError("unreachable: the last trace returns or raises")


def _inputs_hint(model: torch.nn.Module, width: int, error: Exception) -> str:
    return (f"{type(model).__name__} at width {width} fails on the example inputs: {error_reason(error)}. The example "
            "inputs must fit the model at every width (an input whose size grows with width is not a Tensor "
            "Program input; build such state inside the model).")


def tied_names(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """For every tensor registered under several names (tied weights): name -> the other names."""
    groups: dict[int, list[str]] = {}
    for name, tensor in _state(model).items():
        groups.setdefault(id(tensor), []).append(name)
    return {name: tuple(n for n in names if n != name)
            for names in groups.values() if len(names) > 1 for name in names}


def _numel(model: torch.nn.Module) -> int:
    return sum(t.numel() for t in _state(model).values())


# --------------------------------------------------------------------------------------------
# Another batch size: the same model traced on more examples
# --------------------------------------------------------------------------------------------


def batch_size(inputs: tuple, axis: int = 0) -> int | None:
    """The batch size of ``inputs``: axis ``axis`` of the first tensor input (None without one)."""
    first = next((t for t in pytree.tree_leaves(inputs) if torch.is_tensor(t)), None)
    return None if first is None or first.dim() <= axis else int(first.shape[axis])


def resize_batch(inputs: tuple, size: int, axis: int = 0) -> tuple:
    """``inputs`` with ``size`` examples along ``axis``: every tensor whose ``axis`` is the batch axis has its
    examples repeated cyclically (valid token ids stay valid); other inputs are kept."""
    current = batch_size(inputs, axis)
    rows = torch.arange(size) % current

    def resize(t: Any) -> Any:
        if torch.is_tensor(t) and t.dim() > axis and t.shape[axis] == current:
            return t.index_select(axis, rows.to(t.device))
        return t

    return pytree.tree_map(resize, inputs)


def batch_axis(model: torch.nn.Module, inputs: tuple) -> int:
    """The axis of the inputs that holds the examples: axis 0, unless the model's examples along it are not
    independent and along a later axis of the first tensor input they are (sequence-first layers: ``nn.LSTM``,
    ``nn.TransformerEncoderLayer(batch_first=False)``). Examples along an axis are independent when one more
    example, a copy of the first, adds one entry along an axis of every output, equal to the first example's,
    and leaves the others as they were. A model that couples its examples (batch norm in train mode) or draws
    at random (dropout) shows no such axis and keeps axis 0."""
    first = next((t for t in pytree.tree_leaves(inputs) if torch.is_tensor(t)), None)
    if first is None or first.dim() < 2 or _independent_along(model, inputs, 0):
        return 0
    return next((axis for axis in range(1, first.dim()) if _independent_along(model, inputs, axis)), 0)


def _independent_along(model: torch.nn.Module, inputs: tuple, axis: int) -> bool:
    size = batch_size(inputs, axis)
    probe = copy.deepcopy(model)  # batch-norm statistics and the like stay the user's
    with torch.no_grad(), torch.random.fork_rng():
        try:
            before, after = probe(*inputs), probe(*resize_batch(inputs, size + 1, axis))
        except Exception:  # noqa: BLE001 - a model that refuses more entries along this axis: not its batch axis
            return False
    pairs = [(a, b) for a, b in zip(pytree.tree_leaves(before), pytree.tree_leaves(after), strict=False)
             if torch.is_tensor(a) and torch.is_tensor(b)]
    return bool(pairs) and all(_one_more_example(a, b, size) for a, b in pairs)


def _one_more_example(before: torch.Tensor, after: torch.Tensor, size: int) -> bool:
    """Whether ``after`` is ``before`` with its first example repeated once more along one axis of size ``size``."""
    grown = [k for k in range(before.dim()) if after.dim() == before.dim() and after.shape[k] == before.shape[k] + 1]
    if len(grown) != 1 or before.shape[grown[0]] != size or not before.is_floating_point():
        return False
    k, atol = grown[0], 1e-5 * float(before.abs().max()) if before.numel() else 0.0
    return (torch.allclose(after.narrow(k, 0, size), before, rtol=1e-4, atol=atol)
            and torch.allclose(after.select(k, size), before.select(k, 0), rtol=1e-4, atol=atol))


def trace_like(wt: WidthTrace, model: torch.nn.Module, inputs: tuple) -> GraphTrace:
    """``model`` traced on ``inputs`` the way the traces of ``wt`` were, so that the two line up op by op."""
    if wt.trace.tracer == "fx.symbolic_trace":
        return make_fx_trace(fx.symbolic_trace(model), inputs, tracer="fx.symbolic_trace", fake=False)
    if wt.second_tracer == "torch.export":
        return export_trace(model, inputs)
    return make_fx_trace(model, inputs)


def carry_over(wt: WidthTrace, other: GraphTrace, sizes: tuple[int, int], n_other: int) -> WidthTrace:
    """The compared traces ``wt`` carried over to ``other``, a trace of the same model family at width ``n_other``
    on inputs of another batch size (``sizes``: wt's and other's): ``other``'s own fixed sizes and arguments,
    ``wt``'s width axes and width-dependent arguments, which must take their values at ``n_other`` there (a size
    that is a product of width and batch size does not). Lowering the result gives the program at that batch
    size, at ``wt``'s width."""
    layouts: dict[str, Any] = {}
    placeholder_layouts = {}
    for node, lowered in matched_placeholders(other, wt.trace, (f"batch size {sizes[1]}", f"batch size {sizes[0]}")):
        layout = _carry_layout(wt.placeholder_layouts[lowered.name], _value_shape(node, other), node.name, n_other)
        layouts[node.name] = placeholder_layouts[node.name] = layout
    args: dict[str, tuple[tuple, dict]] = {}
    _carry_calls(wt, (wt.trace.graph_module, ""), (other.graph_module, ""), (*sizes, n_other), layouts, args)
    return WidthTrace(other, wt.n, layouts, args, placeholder_layouts, wt.aliases, wt.second_tracer)


def _carry_calls(wt: WidthTrace, a: tuple[fx.GraphModule, str], b: tuple[fx.GraphModule, str],
                 sizes: tuple[int, int, int], layouts: dict[str, Any], args: dict[str, tuple[tuple, dict]]) -> None:
    """``sizes``: the two batch sizes and the width of ``b``'s trace."""
    (gm_a, prefix_a), (gm_b, prefix_b) = a, b
    nodes_a, nodes_b = _call_nodes(gm_a), _call_nodes(gm_b)
    check_aligned(nodes_a, nodes_b, *sizes[:2], what="batch size")
    for node_a, node_b in zip(nodes_a, nodes_b, strict=True):
        key_a, key_b = prefix_a + node_a.name, prefix_b + node_b.name
        if node_b.op == "get_attr":
            value = graph_attribute(gm_b, node_b.target)
            if isinstance(value, fx.GraphModule):
                layouts[key_b] = None
                _carry_calls(wt, (graph_attribute(gm_a, node_a.target), subgraph_prefix(prefix_a, node_a.target)),
                             (value, subgraph_prefix(prefix_b, node_b.target)), sizes, layouts, args)
                continue
            shape = _shape_of(value)
        else:
            shape = _shape_of(_meta_value(node_b))
        layouts[key_b] = _carry_layout(wt.layouts[key_a], shape, key_b, sizes[2])
        if node_b.op == "call_function":
            merged_args, merged_kwargs = wt.args[key_a]
            _, (args_b, kwargs_b) = _with_defaults(node_a, node_b)
            args_b = _pad_args(node_b, args_b, len(merged_args))
            kwargs_b = {**_schema_defaults(node_b, merged_kwargs.keys() - kwargs_b.keys()), **kwargs_b}
            where = f"node {key_b!r} ({_target_name(node_b.target)}) at batch size {sizes[1]}"
            args[key_b] = (_carry_args(merged_args, args_b, where, sizes[2]),
                           _carry_args(merged_kwargs, kwargs_b, where, sizes[2]))


def _carry_layout(layout: Any, shape: Any, where: str, n: int) -> Any:
    """``layout``'s width axes (which must have their size at width n in ``shape``) with the fixed sizes of
    ``shape``."""
    if layout is None or shape is None:
        return None if layout is None and shape is None else _mismatch(where, layout, shape)
    if layout and isinstance(layout[0], tuple | type(None)):  # multi-output
        if len(layout) != len(shape):
            _mismatch(where, layout, shape)
        return tuple(_carry_layout(x, y, where, n) for x, y in zip(layout, shape, strict=True))
    if len(layout) != len(shape) or any(isinstance(axis, Width) and axis.ratio * n != size
                                        for axis, size in zip(layout, shape, strict=True)):
        _mismatch(where, layout, shape)
    return tuple(axis if isinstance(axis, Width) else size for axis, size in zip(layout, shape, strict=True))


def _mismatch(where: str, layout: Any, shape: Any) -> None:
    same_rank = isinstance(layout, tuple) and isinstance(shape, tuple) and len(layout) == len(shape)
    what = "a width axis of it depends on the batch size too" if same_rank else "its rank depends on the batch size"
    if isinstance(layout, tuple) and all(isinstance(axis, int | Width) for axis in layout):
        layout = format_layout(layout)
    raise TraceError(f"node {where!r} has layout {layout} at one batch size but shape {shape} at another: {what}")


def _carry_args(merged: Any, other: Any, where: str, n: int) -> Any:
    """``other``'s arguments (at width n) with the width-dependent leaves of ``merged`` (the same node's at
    another batch size)."""
    if isinstance(merged, WidthInt | WidthPower):
        if not isinstance(other, int | float) or not math.isclose(merged.resolve(n), other, rel_tol=1e-9):
            raise TraceError(f"{where}: argument {other!r} is not {merged} at width {n}: it depends on the batch "
                             "size too")
        return merged
    if isinstance(other, fx.Node):
        return other
    if isinstance(merged, list | tuple) and isinstance(other, list | tuple) and len(merged) == len(other):
        return type(other)(_carry_args(m, o, where, n) for m, o in zip(merged, other, strict=True))
    if isinstance(merged, dict) and isinstance(other, dict) and merged.keys() == other.keys():
        return {k: _carry_args(merged[k], other[k], where, n) for k in other}
    if isinstance(merged, fx.Node | list | tuple | dict):
        raise TraceError(f"{where}: argument {other!r} does not match {merged!r} at the other batch size")
    return other


def _pad_args(node: fx.Node, args: tuple, length: int) -> tuple:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return args
    positional = [a for a in schema.arguments if not a.kwarg_only]
    return args + tuple(positional[i].default_value for i in range(len(args), min(length, len(positional))))


def _schema_defaults(node: fx.Node, names: Any) -> dict[str, Any]:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {}
    return {a.name: a.default_value for a in schema.arguments if a.name in names and a.has_default_value()}
