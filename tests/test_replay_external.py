"""Models nobody on the team wrote: transformers GPT-2 / BERT from configs, torch's own attention
layers, a pytorchcv CIFAR ResNet. Replay must reproduce each to 1e-10 in float64."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn as nn

import tplimits as tpl
from tests.conftest import assert_close_tree


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out.logits


def _check(make, inputs, widths, pick=lambda o: o, **lower_kwargs):
    prog = tpl.lower(make, example_inputs=inputs, width=widths[0], **lower_kwargs)
    for width in widths:
        torch.manual_seed(width)
        model = make(width)
        assert_close_tree(pick(prog.replay(model, *inputs)), pick(model(*inputs)))
    return prog


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gpt2(hf, attn):
    def make(width):
        config = hf.GPT2Config(n_embd=width, n_layer=2, n_head=4, vocab_size=50, n_positions=16, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, attn_implementation=attn,
                               bos_token_id=0, eos_token_id=0)
        return hf.GPT2LMHeadModel(config)

    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    prog = _check(make, (ids,), (32, 48), pick=_logits)
    params = prog.parameters
    attn_w = params["transformer.h.0.attn.c_attn.weight"]
    assert attn_w.kind == "matrix" and attn_w.shape == (32, 96)
    assert attn_w.fan_in_axes == (0,), "GPT-2 stores (in, out): fan-in must come from the op"
    readout = params["lm_head.weight"]
    assert readout.kind == "vector" and readout.aliases == ("transformer.wte.weight",)
    if attn == "eager":  # HF divides by full([], sqrt(d_head)): a width-dependent constant made explicit
        assert "n^-1/2" in prog.format()


def test_bert_classifier(hf):
    def make(width):
        config = hf.BertConfig(hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=4 * width, vocab_size=50, max_position_embeddings=16,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
        return hf.BertForSequenceClassification(config)

    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    prog = _check(make, (ids,), (32, 48), pick=_logits)
    assert prog.parameters["bert.encoder.layer.0.intermediate.dense.weight"].layout[0] == tpl.Width(4)
    assert prog.parameters["bert.pooler.dense.weight"].kind == "matrix"
    assert prog.parameters["classifier.weight"].kind == "vector"


def test_bert_hidden_states(hf):
    """A model whose output is a vector (last hidden state) replays too."""

    def make(width):
        config = hf.BertConfig(hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=2 * width, vocab_size=30, max_position_embeddings=8,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return hf.BertModel(config, add_pooling_layer=False)

    ids = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(2))
    _check(make, (ids,), (16, 40), pick=lambda o: o["last_hidden_state"] if isinstance(o, dict)
           else o.last_hidden_state)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama(hf, attn):
    """RoPE (a float32 ``inv_freq`` buffer of d_head/2 frequencies), grouped-query attention (one key/value
    head for two query heads), SwiGLU and RMSNorm, bias-free."""

    def make(width):
        config = hf.LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, vocab_size=16,
                                max_position_embeddings=16, attn_implementation=attn, use_cache=False)
        return hf.LlamaForCausalLM(config)

    ids = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0))
    prog = _check(make, (ids,), (32, 48), pick=_logits)
    assert prog.parameters["model.layers.0.self_attn.k_proj.weight"].layout == (tpl.Width(Fraction(1, 2)), tpl.Width(1))
    assert prog.parameters["model.rotary_emb.inv_freq"].layout == (tpl.Width(Fraction(1, 4)),)


class _Encoder(nn.Module):
    def __init__(self, width: int, layer: str):
        super().__init__()
        self.inp = nn.Linear(7, width)
        self.kind = layer
        if layer == "mha":
            self.layer = nn.MultiheadAttention(width, 4, batch_first=True)
        else:
            self.layer = nn.TransformerEncoderLayer(width, 4, dim_feedforward=4 * width, dropout=0.0,
                                                    batch_first=True, norm_first=layer == "pre")
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        h = self.layer(h, h, h, need_weights=False)[0] if self.kind == "mha" else self.layer(h)
        return self.out(h)


@pytest.mark.parametrize("layer", ["mha", "post", "pre"])
def test_torch_attention_layers(layer):
    x = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(3))
    prog = _check(lambda w: _Encoder(w, layer), (x,), (32, 48, 96))
    kinds = {name: info.kind for name, info in prog.parameters.items()}
    in_proj = "layer.in_proj_weight" if layer == "mha" else "layer.self_attn.in_proj_weight"
    assert kinds[in_proj] == "matrix"
    assert prog.parameters[in_proj].layout == (tpl.Width(3), tpl.Width(1))


def test_pytorchcv_cifar_resnet():
    pytest.importorskip("pytorchcv")
    from pytorchcv.models.resnet_cifar import CIFARResNet

    def make(width):
        return CIFARResNet(channels=[[width], [2 * width], [4 * width]], init_block_channels=width,
                           bottleneck=False, in_size=(32, 32), num_classes=10)

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    prog = _check(make, (x,), (8, 12))
    conv = prog.parameters["features.stage2.unit1.body.conv1.conv.weight"]
    assert conv.kind == "matrix" and conv.layout[2:] == (3, 3)
    assert prog.parameters["features.init_block.conv.weight"].kind == "vector"
    assert prog.parameters["output.weight"].kind == "vector"
