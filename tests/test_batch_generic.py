"""A program lowered at one batch size runs at any other: replay at batch 7 of a program lowered at batch 4
equals the model's own forward and its autograd gradients (float64, 1e-10), and so do the gradients of the
total program re-specialised to batch 7. A model whose graph depends on the batch size is refused at another
batch size with a named error. Expected values come from the torch model itself."""

from __future__ import annotations

import attrs
import pytest
import torch
import torch.nn as nn

import tplimits as tpl
from tests.conftest import assert_close_tree
from tplimits.core.backprop import total_program
from tplimits.core.frontend import resolve
from tplimits.core.trace import batch_axis, other_batch_size, trace_pair

LOWERED, OTHER = 4, 7


def _rows(inputs: tuple, size: int, seed: int) -> tuple:
    """``inputs`` with ``size`` rows drawn from the example rows (token ids stay valid), shuffled by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(0, inputs[0].shape[0], (size,), generator=gen)
    return tuple(x[index] + (0 if not x.is_floating_point() else 0.1 * torch.randn(x[index].shape, generator=gen))
                 for x in inputs)


def _gradients(model: nn.Module, output: torch.Tensor, cotangent: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    grads = torch.autograd.grad((output * cotangent).sum(), list(params.values()), allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads, strict=True)}


def _check_other_batch(prog: tpl.Program, model: nn.Module, inputs: tuple, pick=lambda out: out) -> None:
    """Replay at batch OTHER: forward and autograd gradients equal the model's."""
    assert prog.batch_generic, prog.batch_dependence
    expected, got = pick(model(*inputs)), pick(prog.replay(model, *inputs))
    assert got.shape[0] == OTHER
    assert_close_tree(got, expected)
    cotangent = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))
    _assert_gradients_close(_gradients(model, got, cotangent), _gradients(model, expected, cotangent))


def _assert_gradients_close(got: dict, expected: dict) -> None:
    """Relative to the largest gradient: some are zero up to rounding (attention's key bias)."""
    scale = max(g.abs().max() for g in expected.values())
    assert scale > 0
    for key, value in expected.items():
        assert (got[key] - value).abs().max() <= 1e-10 * scale, key


FAMILIES = [("mlp", {}), ("resnet", {}), ("transformer", {}), ("transformer", {"attention": "explicit", "tied": True})]


@pytest.mark.parametrize("name,config", FAMILIES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FAMILIES)])
def test_families_at_another_batch_size(name, config):
    arch = tpl.architecture(name)
    example = arch.example_inputs(**config)
    prog = tpl.lower(name, example_inputs=_rows(example, LOWERED, 0), **config)
    assert [ins.layout[0] for ins in prog.inputs] == [LOWERED]
    torch.manual_seed(1)
    model = arch.build(arch.trace_widths[0] * 3 // 2, **config)  # a width that was never traced
    inputs = _rows(example, OTHER, 1)
    _check_other_batch(prog, model, inputs)

    # the total program (forward + backward in the IR) of the re-specialised program: autograd's gradients
    at_other = prog.at_batch(OTHER)
    assert [ins.layout[0] for ins in at_other.inputs] == [OTHER]
    output = model(*inputs)
    cotangent = torch.randn(output.shape, generator=torch.Generator().manual_seed(4))
    got = total_program(at_other).gradients_at(model, inputs, (cotangent,))
    _assert_gradients_close(got, _gradients(model, output, cotangent))


def test_gpt2_at_another_batch_size():
    hf = pytest.importorskip("transformers")

    def make(width):
        config = hf.GPT2Config(n_embd=width, n_layer=1, n_head=2, vocab_size=20, n_positions=8, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
        return hf.GPT2LMHeadModel(config)

    ids = torch.randint(0, 20, (LOWERED, 6), generator=torch.Generator().manual_seed(0))
    prog = tpl.lower(make, example_inputs=(ids,), width=16)
    torch.manual_seed(0)
    model = make(24)
    other = torch.randint(0, 20, (OTHER, 6), generator=torch.Generator().manual_seed(1))
    _check_other_batch(prog, model, (other,), pick=lambda out: out.logits)


class ByPosition(nn.Module):
    """Weights each example by its position in the batch: the graph holds ``arange(batch)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner, self.out = nn.Linear(3, width), nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        position = torch.arange(x.shape[0], dtype=x.dtype).unsqueeze(1)
        return self.out(torch.tanh(self.inner(x)) * position)


def test_batch_dependent_model_is_refused_at_another_batch_size():
    x = torch.randn(LOWERED, 3, generator=torch.Generator().manual_seed(0))
    prog = tpl.lower(ByPosition, example_inputs=(x,), width=16)
    assert not prog.batch_generic and "constant" in prog.batch_dependence
    model = ByPosition(16)
    assert_close_tree(prog.replay(model, x), model(x))  # its own batch size is fine
    other = torch.randn(OTHER, 3)
    with pytest.raises(tpl.BatchSizeError, match="Lower the model with example inputs"):
        prog.replay(model, other)
    with pytest.raises(tpl.BatchSizeError, match=r"batch size 7.*differs between examples"):
        prog.at_batch(OTHER)


def test_inputs_that_are_not_a_batch_are_named():
    prog = tpl.lower("mlp", example_inputs=(torch.randn(LOWERED, 16),))
    model = tpl.architecture("mlp").build(32)
    with pytest.raises(tpl.BatchSizeError, match="input 0 has size 5 along axis 1"):
        prog.replay(model, torch.randn(OTHER, 5))
    with pytest.raises(tpl.BatchSizeError, match="derived from a lowered program"):
        total_program(prog).program.at_batch(OTHER)
    with pytest.raises(tpl.TplimitsError, match="size must be an integer >= 1"):
        prog.at_batch(0)


def test_limit_lowers_once_for_every_batch_size():
    limit = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=4)
    small, large = torch.randn(LOWERED, 4), torch.randn(OTHER, 4)
    first = limit.family(small)
    second = limit.family(large)
    assert second.program is first.program.at_batch(OTHER)  # the one lowered program, re-specialised
    assert [ins.layout[0] for ins in second.program.inputs] == [OTHER]
    assert limit.family(small).program is first.program


def test_second_width_is_traced_at_another_batch_size():
    """One trace tells both what grows with width and what grows with the batch size (no third trace)."""
    pair = resolve(tpl.architecture("transformer"), (torch.randint(0, 32, (LOWERED, 8)),))
    traced = trace_pair(pair)
    assert traced.batch_sizes == (LOWERED, LOWERED + 1) and traced.batch_trace is not None
    assert traced.placeholder_layouts[next(n for n, p in traced.trace.placeholders.items() if p.role == "input")] \
        == (LOWERED, 8)
    # a ratio of batch sizes equal to (a simple power of) the ratio of widths would let a batch axis pass for a
    # width axis, or a constant proportional to the batch size for a power of width
    assert other_batch_size(1, (32, 64)) == 3 and other_batch_size(4, (32, 64)) == 5
    assert other_batch_size(1, (1024, 256)) == 3 and other_batch_size(3, (64, 48)) == 5  # 2 = 4^½, 4/3 = (3/4)^-1


class GrowingHeads(nn.Module):
    """nn.MultiheadAttention with a head count that grows with width: it folds the batch into the heads, so a
    width axis of the program has b·heads entries."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(3, width), nn.Linear(width, 1)
        self.attn = nn.MultiheadAttention(width, width // 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(h + self.attn(h, h, h, need_weights=False)[0])


def test_width_axis_holding_the_batch_is_refused_at_another_batch_size():
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    prog = tpl.lower(GrowingHeads, example_inputs=(x,), width=16)
    assert not prog.batch_generic and "depends on the batch size too" in prog.batch_dependence
    torch.manual_seed(0)
    model = GrowingHeads(24)
    assert_close_tree(prog.replay(model, x), model(x))
    with pytest.raises(tpl.BatchSizeError, match="depends on the batch size too"):
        prog.replay(model, torch.randn(3, 5, 3))


def test_limit_at_another_batch_size_equals_a_fresh_lowering():
    """The μ-limit trained on 7 rows with the program lowered for 4 rows equals the one lowered for 7 rows."""
    gen = torch.Generator().manual_seed(0)
    X4, y4, X7, y7 = (torch.randn(rows, cols, generator=gen) for rows, cols in ((4, 3), (4, 1), (7, 3), (7, 1)))
    options = dict(steps=2, lr=0.5, particles=256, batches=2, progress=False)
    reused = tpl.derive("mlp", optimizer="sgd", depth=1, d_in=3)
    reused.train(X4, y4, **options)
    got = reused.train(X7, y7, **options)
    expected = tpl.derive("mlp", optimizer="sgd", depth=1, d_in=3).train(X7, y7, **options)
    assert got.outputs.shape[1] == 7
    assert torch.equal(got.outputs, expected.outputs) and torch.equal(got.loss, expected.loss)


class _SequenceFirst(nn.Module):
    """Inputs ``[time, batch, features]``: an LSTM or an encoder layer without ``batch_first``."""

    def __init__(self, width: int, kind: str) -> None:
        super().__init__()
        self.inp = nn.Linear(3, width)
        if kind == "lstm":
            self.layer = nn.LSTM(width, width)
        else:
            self.layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0)
        self.out = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(self.inp(x))
        return self.out(h[0] if isinstance(h, tuple) else h)


@pytest.mark.filterwarnings("ignore:The tensor attributes self.*_flat_weights", "ignore:enable_nested_tensor")
@pytest.mark.parametrize("kind", ["lstm", "encoder-layer"])
def test_sequence_first_models_at_another_batch_size(kind):
    """The batch axis is axis 1 of the inputs (3 time steps, 4 examples); the program lowered there runs 7."""
    def make(width: int) -> _SequenceFirst:
        return _SequenceFirst(width, kind)

    g = torch.Generator().manual_seed(0)
    prog = tpl.lower(make, example_inputs=(torch.randn(3, LOWERED, 3, generator=g),))
    torch.manual_seed(1)
    model = make(24)
    x = torch.randn(3, OTHER, 3, generator=g)
    assert prog.batch_generic, prog.batch_dependence
    expected, got = model(x), prog.replay(model, x)
    assert got.shape[1] == OTHER
    assert_close_tree(got, expected)
    cotangent = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))
    _assert_gradients_close(_gradients(model, got, cotangent), _gradients(model, expected, cotangent))


def test_batch_axis_is_where_examples_are_independent():
    """Axis 1 for sequence-first layers; axis 0 for batch-first ones, and for a model that couples its examples
    (batch norm in train mode), where no axis has independent examples."""
    x = torch.randn(3, 4, 3, generator=torch.Generator().manual_seed(0))
    assert batch_axis(_SequenceFirst(8, "lstm"), (x,)) == 1
    assert batch_axis(_SequenceFirst(8, "encoder-layer"), (x,)) == 1
    assert batch_axis(nn.LSTM(3, 8, batch_first=True), (x,)) == 0
    assert batch_axis(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12)).train(), (x,)) == 0


@pytest.mark.filterwarnings("ignore:The tensor attributes self.*_flat_weights")
def test_sequence_first_model_traced_again_along_its_batch_axis():
    """Without the second width's trace at another batch size, the model itself is traced on one example more:
    along axis 1 of a sequence-first model's inputs (along axis 0 it would add a time step, and the program
    would hold at its own batch size only)."""
    from tplimits.core.frontend import with_batch_spec
    from tplimits.core.lower import lower_trace
    from tplimits.registry.manager import lowering_rules

    def make(width: int) -> _SequenceFirst:
        return _SequenceFirst(width, "lstm")

    g = torch.Generator().manual_seed(0)
    pair = resolve(make, (torch.randn(3, LOWERED, 3, generator=g),))
    traced = attrs.evolve(trace_pair(pair), batch_trace=None, batch_sizes=None)
    assert traced.batch_axis == 1
    rules = lowering_rules()
    prog = with_batch_spec(lower_trace(traced, rules, width=pair.width), traced, pair, rules)
    assert prog.batch_generic, prog.batch_dependence
    torch.manual_seed(1)
    model = make(24)
    x = torch.randn(3, OTHER, 3, generator=g)
    got = prog.replay(model, x)
    assert got.shape[1] == OTHER
    assert_close_tree(got, model(x))
