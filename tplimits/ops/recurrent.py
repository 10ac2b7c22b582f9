"""Recurrent layers: LSTM, GRU, Elman RNN (tanh / relu), whole sequences and single cells.

A recurrent layer over a sequence of fixed length is the classic Tensor Program: unrolled over the
time axis, each step multiplies the hidden state by the *same* recurrent weight ``W_hh``. The rules
emit one MatMul per step on that one parameter; sharing a weight across uses is how the program
already treats a layer applied twice, and the limit sums the contributions of every use to its
update (MATH.md §5.5: the sum over all pairs ``h = W z``, ``g = W y``). The width is the hidden size;
the input-to-hidden products of a whole sequence are taken at once, before the recurrence.

Gates are fused along the hidden axis (LSTM: i, f, g, o; GRU: r, z, n), so splitting them is a
block regroup, as for a fused q/k/v projection. ``nn.LSTM(proj_size=p)`` adds ``W_hr`` after each step
(``h = W_hr (o ⊙ tanh c)``): a hidden matrix when p grows with width, a readout into fixed coordinates
(a bottleneck, which the μ-limit refuses) when it does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tplimits.plugin import (
    Layout,
    LoweringContext,
    OpNode,
    Pick,
    Value,
    Width,
    aten,
    hookimpl,
    lower_einsum,
)

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


# --------------------------------------------------------------------------------------------
# emission helpers
# --------------------------------------------------------------------------------------------


def _affine(ctx: LoweringContext, x: Value, weight: Any, bias: Any) -> Value:
    """``x @ weight.T + bias`` over the last axis of ``x`` (any leading axes)."""
    lead = "btu"[: x.ndim - 1]
    layout = (*x.layout[:-1], weight.layout[0])
    y = lower_einsum(ctx, f"{lead}i,oi->{lead}o", x, weight, layout)
    if bias is None:
        return y
    return ctx.nonlin(aten.add.Tensor, y, bias, layout=layout)


def _gates(ctx: LoweringContext, x: Value, count: int) -> list[Value]:
    """The ``count`` fused gates of ``x`` (split along its last axis)."""
    if count == 1:
        return [x]
    axis = x.layout[-1]
    part = Width(axis.ratio / count) if isinstance(axis, Width) else axis // count
    layout = (*x.layout[:-1], part)
    if isinstance(axis, Width):
        return [ctx.regroup(Pick(aten.chunk.default, k), x, count, -1, layout=layout, block=part.ratio)
                for k in range(count)]
    return [ctx.nonlin(Pick(aten.chunk.default, k), x, count, -1, layout=layout) for k in range(count)]


class _Emit:
    """Coordinatewise arithmetic on values of one layout (the hidden state's)."""

    def __init__(self, ctx: LoweringContext, layout: Layout) -> None:
        self.ctx, self.layout = ctx, layout

    def __call__(self, fn: Callable, *args: Any, smooth: bool = True) -> Value:
        return self.ctx.nonlin(fn, *args, layout=self.layout, smooth=smooth)

    def add(self, a: Any, b: Any) -> Value:
        return self(aten.add.Tensor, a, b)

    def mul(self, a: Any, b: Any) -> Value:
        return self(aten.mul.Tensor, a, b)

    def sigmoid(self, a: Value) -> Value:
        return self(aten.sigmoid.default, a)

    def tanh(self, a: Value) -> Value:
        return self(aten.tanh.default, a)


# --------------------------------------------------------------------------------------------
# one step of each cell: ``gi`` is the input's contribution (W_ih x + b_ih), ``state`` the hidden state
# --------------------------------------------------------------------------------------------


def _lstm_step(ctx: LoweringContext, gi: Value, state: tuple, w_hh: Any, b_hh: Any,
               w_hr: Any = None) -> tuple[tuple, Value]:
    """With a projection (``proj_size > 0``) the hidden state is ``W_hr (o ⊙ tanh c)``: a product by one more
    weight, a matrix when ``proj_size`` grows with width, a readout into fixed coordinates when it does not."""
    h, c = state
    gates = ctx.nonlin(aten.add.Tensor, gi, _affine(ctx, h, w_hh, b_hh), layout=gi.layout)
    i, f, g, o = _gates(ctx, gates, 4)
    e = _Emit(ctx, c.layout)
    c = e.add(e.mul(e.sigmoid(f), c), e.mul(e.sigmoid(i), e.tanh(g)))
    h = e.mul(e.sigmoid(o), e.tanh(c))
    if w_hr is not None:
        h = _affine(ctx, h, w_hr, None)
    return (h, c), h


def _gru_step(ctx: LoweringContext, gi: Value, state: tuple, w_hh: Any, b_hh: Any) -> tuple[tuple, Value]:
    (h,) = state
    i_r, i_z, i_n = _gates(ctx, gi, 3)
    h_r, h_z, h_n = _gates(ctx, _affine(ctx, h, w_hh, b_hh), 3)
    e = _Emit(ctx, h.layout)
    r = e.sigmoid(e.add(i_r, h_r))
    z = e.sigmoid(e.add(i_z, h_z))
    new = e.tanh(e.add(i_n, e.mul(r, h_n)))
    h = e.add(new, e.mul(z, e(aten.sub.Tensor, h, new)))  # (1 - z) n + z h
    return (h,), h


def _elman_step(activation: Callable, smooth: bool):
    def step(ctx: LoweringContext, gi: Value, state: tuple, w_hh: Any, b_hh: Any) -> tuple[tuple, Value]:
        (h,) = state
        pre = ctx.nonlin(aten.add.Tensor, gi, _affine(ctx, h, w_hh, b_hh), layout=gi.layout)
        h = ctx.nonlin(activation, pre, layout=pre.layout, smooth=smooth)
        return (h,), h

    return step


STEPS = {
    "lstm": _lstm_step,
    "gru": _gru_step,
    "rnn_tanh": _elman_step(aten.tanh.default, True),
    "rnn_relu": _elman_step(aten.relu.default, False),
}


# --------------------------------------------------------------------------------------------
# whole sequences: aten.lstm / gru / rnn_tanh / rnn_relu (.input overloads)
# --------------------------------------------------------------------------------------------


def _select(ctx: LoweringContext, x: Value, axis: int, index: int) -> Value:
    layout = tuple(a for i, a in enumerate(x.layout) if i != axis)
    return ctx.nonlin(aten.select.int, x, axis, index, layout=layout)


def _stack(ctx: LoweringContext, values: Sequence[Value], axis: int) -> Value:
    layout = list(values[0].layout)
    layout.insert(axis, len(values))
    return ctx.nonlin(aten.stack.default, list(values), axis, layout=tuple(layout))


def _concat_directions(ctx: LoweringContext, parts: list[Value]) -> Value:
    if len(parts) == 1:
        return parts[0]
    axis = parts[0].layout[-1]
    if isinstance(axis, Width):
        layout = (*parts[0].layout[:-1], Width(axis.ratio * len(parts)))
        return ctx.regroup(aten.cat.default, parts, -1, layout=layout, block=axis.ratio)
    return ctx.nonlin(aten.cat.default, parts, -1, layout=(*parts[0].layout[:-1], axis * len(parts)))


def _sequence(ctx: LoweringContext, kind: str, x: Value, initial: list[tuple], params: Sequence[Any],
              layers: int, directions: int, time_axis: int) -> tuple[Value, list[tuple]]:
    """Run ``layers`` x ``directions`` recurrences over ``x``; the last layer's outputs and every final state."""
    per = len(params) // (layers * directions)
    finals = []
    for layer in range(layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w_ih, w_hh, *rest = params[k * per:(k + 1) * per]
            b_ih, b_hh = rest[:2] if len(rest) >= 2 else (None, None)
            projection = rest[-1:] if len(rest) % 2 else []  # LSTM's W_hr follows the biases
            gi = _affine(ctx, x, w_ih, b_ih)  # every time step at once
            steps = range(x.layout[time_axis])
            state, hs = initial[k], {}
            for t in (reversed(steps) if direction else steps):
                state, hs[t] = STEPS[kind](ctx, _select(ctx, gi, time_axis, t), state, w_hh, b_hh, *projection)
            finals.append(state)
            outputs.append(_stack(ctx, [hs[t] for t in steps], time_axis))
        x = _concat_directions(ctx, outputs)
    return x, finals


def recurrent_sequence(kind: str):
    """The rule for ``aten.<kind>.input``: (input, hx, params, has_biases, num_layers, dropout, train,
    bidirectional, batch_first)."""

    def rule(ctx: LoweringContext, node: OpNode) -> tuple[Value, ...]:
        x, hx, params, has_biases, layers, dropout, train, bidirectional, batch_first = node.args[:9]
        directions = 2 if bidirectional else 1
        per = len(params) // (layers * directions)
        projected = kind == "lstm" and per == (5 if has_biases else 3)  # nn.LSTM(proj_size > 0): W_hr last
        if per != (4 if has_biases else 2) + projected or len(params) % (layers * directions):
            ctx.unsupported(f"{node.op_name} with {len(params)} weights for {layers} layer(s) x {directions} "
                            f"direction(s) (has_biases={has_biases}): not supported yet")
        if dropout and train and layers > 1:
            ctx.unsupported(f"{node.op_name} with dropout between layers in training mode: not supported yet",
                            "Set dropout=0.")
        if not isinstance(x, Value) or x.ndim != 3:
            ctx.unsupported(f"{node.op_name} on a packed or non-3-d input: not supported yet")
        hx = list(hx) if isinstance(hx, list | tuple) else [hx]
        initial = [tuple(_select(ctx, h, 0, k) for h in hx) for k in range(layers * directions)]
        time_axis = 1 if batch_first else 0
        out, finals = _sequence(ctx, kind, x, initial, params, layers, directions, time_axis)
        states = [_stack(ctx, [state[i] for state in finals], 0) for i in range(len(hx))]
        return (out, *states)

    rule.__name__ = f"{kind}_sequence"
    return rule


# --------------------------------------------------------------------------------------------
# single cells: aten.lstm_cell / gru_cell / rnn_tanh_cell / rnn_relu_cell
# --------------------------------------------------------------------------------------------


def recurrent_cell(kind: str):
    """The rule for ``aten.<kind>_cell``: (input, hx, w_ih, w_hh, b_ih, b_hh)."""

    def rule(ctx: LoweringContext, node: OpNode) -> Any:
        x, hx, w_ih, w_hh = node.args[:4]
        b_ih, b_hh = node.arg(4, "b_ih", None), node.arg(5, "b_hh", None)
        state = tuple(hx) if isinstance(hx, list | tuple) else (hx,)
        state, _ = STEPS[kind](ctx, _affine(ctx, x, w_ih, b_ih), state, w_hh, b_hh)
        return state if kind == "lstm" else state[0]

    rule.__name__ = f"{kind}_cell"
    return rule


@hookimpl
def tplimits_lowering_rules() -> dict:
    rules = {getattr(aten, kind).input: recurrent_sequence(kind) for kind in GATES}
    rules.update({getattr(aten, f"{kind}_cell").default: recurrent_cell(kind) for kind in GATES})
    return rules

