"""The total program (forward + backpropagation built in the IR) reproduces torch.autograd.

Expected gradients come from ``torch.autograd.grad`` on the model itself. Errors are measured
against the global gradient scale (a parameter with exactly zero gradient would otherwise look
like a large relative error)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tplimits as tpl
from tplimits.core.backprop import Cotangent, total_program

RTOL = 1e-10


def _autograd(model, outputs, cotangents):
    params = dict(model.named_parameters())
    total = sum((o * c).sum() for o, c in zip(outputs, cotangents, strict=True))
    grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(p)) for (k, p), g in zip(params.items(), grads, strict=True)}


def _check(prog, model, inputs, pick=lambda outs: outs):
    total = total_program(prog)
    outs = torch.utils._pytree.tree_leaves(prog.replay(model, *inputs))
    chosen = pick(outs)
    gen = torch.Generator().manual_seed(0)
    cotangents = tuple(torch.randn(o.shape, generator=gen) if any(o is c for c in chosen) else torch.zeros_like(o)
                       for o in outs)
    ref = _autograd(model, outs, cotangents)
    got = total.gradients_at(model, inputs, cotangents)
    assert set(ref) <= set(got)
    scale = max(g.abs().max() for g in ref.values())
    assert scale > 0
    for name, expected in ref.items():
        err = (got[name] - expected).abs().max() / scale
        assert err <= RTOL, f"{name}: relative error {err:.2e}"
    return total


FAMILIES = [
    ("mlp", {}), ("mlp", {"depth": 1, "activation": "relu", "d_out": 3}),
    ("mlp", {"activation": "gelu", "bias": False}),
    ("decorrelated-mlp", {}), ("resnet", {}), ("resnet", {"stages": 3, "blocks": 2}),
    ("transformer", {}), ("transformer", {"attention": "explicit", "tied": True, "n_layers": 1}),
]


@pytest.mark.parametrize("name,config", FAMILIES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FAMILIES)])
def test_total_program_matches_autograd(name, config):
    arch = tpl.architecture(name)
    prog = tpl.lower(name, **config)
    inputs = arch.example_inputs(**config)
    for width in (arch.trace_widths[0], arch.trace_widths[0] * 3 // 2):
        torch.manual_seed(width)
        _check(prog, arch.build(width, **config), inputs)


def test_backward_instructions_are_program_instructions():
    total = total_program(tpl.lower("mlp", depth=3))
    backward = total.program.instructions[total.forward_length:]
    kinds = {type(ins).__name__ for ins in backward}
    assert kinds <= {"Cotangent", "Nonlin", "MatMul", "Avg", "Regroup"}
    transposed = [ins for ins in backward if isinstance(ins, tpl.MatMul)]
    assert transposed and all(ins.transposed for ins in transposed)  # dx = Wᵀ dh
    assert sum(isinstance(ins, Cotangent) for ins in backward) == 1
    grads = total.gradients
    assert grads["layers.1.weight"].kind == "matrix" and len(grads["layers.1.weight"].terms) == 1
    assert grads["layers.0.weight"].kind == "vector" and grads["readout.bias"].kind == "scalar"
    assert "gradients:" in total.format()


class TwoHeads(nn.Module):
    """Two outputs sharing parameters, one also reading a scalar gain (multi-output, Def 2.9.16)."""

    def __init__(self, width: int):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.hidden = nn.Linear(width, width)
        self.gain = nn.Parameter(torch.tensor(0.7))
        self.a = nn.Linear(width, 2)
        self.b = nn.Linear(width, 1)

    def forward(self, x):
        h = torch.tanh(self.hidden(torch.tanh(self.inp(x))) * self.gain)
        return self.a(h), self.b(h).sum(0) * self.gain


@pytest.mark.parametrize("which", [(0,), (1,), (0, 1)])
def test_multiple_outputs(which):
    x = torch.randn(5, 4)
    prog = tpl.lower(TwoHeads, example_inputs=(x,), width=16)
    model = TwoHeads(40)
    _check(prog, model, (x,), pick=lambda outs: [outs[i] for i in which])


def test_shared_weights_sum_their_uses():
    class Shared(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.inp = nn.Linear(3, width)
            self.w = nn.Linear(width, width)
            self.out = nn.Linear(width, 1)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            for _ in range(3):  # one matrix used three times: weight sharing across steps
                h = torch.tanh(self.w(h))
            return self.out(h)

    x = torch.randn(4, 3)
    prog = tpl.lower(Shared, example_inputs=(x,), width=16)
    total = _check(prog, Shared(24), (x,))
    assert len(total.gradients["w.weight"].terms) == 3


def test_vector_outputs_are_refused():
    class Hidden(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.inp = nn.Linear(3, width)

        def forward(self, x):
            return torch.tanh(self.inp(x))

    prog = tpl.lower(Hidden, example_inputs=(torch.randn(2, 3),), width=8)
    with pytest.raises(tpl.TplimitsError, match="scalar outputs"):
        total_program(prog)


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gpt2_gradients(hf, attn):
    def make(width):
        return hf.GPT2LMHeadModel(hf.GPT2Config(
            n_embd=width, n_layer=2, n_head=4, vocab_size=50, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, use_cache=False, attn_implementation=attn, bos_token_id=0, eos_token_id=0))

    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    prog = tpl.lower(make, example_inputs=(ids,), width=32)
    torch.manual_seed(0)
    model = make(48)
    logits = model(ids).logits
    _check(prog, model, (ids,), pick=lambda outs: [o for o in outs if o.shape == logits.shape])


def test_bert_and_torch_encoder_gradients(hf):
    def bert(width):
        return hf.BertForSequenceClassification(hf.BertConfig(
            hidden_size=width, num_hidden_layers=2, num_attention_heads=4, intermediate_size=4 * width,
            vocab_size=50, max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            num_labels=3))

    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    prog = tpl.lower(bert, example_inputs=(ids,), width=32)
    torch.manual_seed(1)
    model = bert(48)
    shape = model(ids).logits.shape
    _check(prog, model, (ids,), pick=lambda outs: [o for o in outs if o.shape == shape])

    class Encoder(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.inp = nn.Linear(7, width)
            self.layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
            self.out = nn.Linear(width, 3)

        def forward(self, x):
            return self.out(self.layer(self.inp(x)))

    x = torch.randn(2, 5, 7)
    prog = tpl.lower(Encoder, example_inputs=(x,), width=32)
    _check(prog, Encoder(48), (x,))


def test_pytorchcv_gradients():
    pytest.importorskip("pytorchcv")
    from pytorchcv.models.resnet_cifar import CIFARResNet

    def make(width):
        return CIFARResNet(channels=[[width], [2 * width], [4 * width]], init_block_channels=width,
                           bottleneck=False, in_size=(32, 32), num_classes=10)

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    prog = tpl.lower(make, example_inputs=(x,), width=8)
    _check(prog, make(12), (x,))
