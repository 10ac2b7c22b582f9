"""The μ-limit of models nobody on the team wrote (``transformers`` from configs, torch's own layers): it
runs, stays finite and trains. Integer tensors (token ids, token-type ids, position ids, index buffers)
must stay integer inside the limit engine, which computes everything else in its float dtype."""

from __future__ import annotations

import pytest
import torch

import tplimits as tpl


class _Classifier(torch.nn.Module):
    """A tiny ``transformers`` sequence classifier built from a config, returning its logits."""

    def __init__(self, width: int, family: str) -> None:
        super().__init__()
        hf = pytest.importorskip("transformers")
        if family == "bert":
            config = hf.BertConfig(hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=2 * width, vocab_size=16, max_position_embeddings=8,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
            self.model = hf.BertForSequenceClassification(config)
        else:
            config = hf.DistilBertConfig(dim=width, n_layers=1, n_heads=2, hidden_dim=2 * width, vocab_size=16,
                                         max_position_embeddings=8, dropout=0.0, attention_dropout=0.0,
                                         seq_classif_dropout=0.0, num_labels=3)
            self.model = hf.DistilBertForSequenceClassification(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_encoder_limit_trains_with_integer_buffers(family):
    pytest.importorskip("transformers")
    ids = torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2])
    limit = tpl.derive(lambda width: _Classifier(width, family), example_inputs=(ids,))
    integer = {name: init.dtype for name, init in limit.setup(ids).initial.items() if init.dtype is not None}
    if family == "bert":  # position ids (fixed) and token-type ids (constant zeros) are int64 buffers
        assert set(integer.values()) == {torch.int64} and len(integer) == 2, integer
    trajectory = limit.train(ids, y, steps=2, lr=0.1, loss="cross_entropy", particles=2**9, batches=2,
                             progress=False)
    assert trajectory.outputs.shape == (3, 2, 3)
    assert torch.isfinite(trajectory.outputs).all() and torch.isfinite(trajectory.loss).all()
    assert trajectory.outputs.dtype == torch.float64
    assert trajectory.loss[-1] < trajectory.loss[0], trajectory.loss


class _CrossAttention(torch.nn.Module):
    """``nn.MultiheadAttention`` with keys and values of another width (kdim = vdim = width/2)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.query, self.memory = torch.nn.Linear(5, width), torch.nn.Linear(5, width // 2)
        self.attention = torch.nn.MultiheadAttention(width, 2, kdim=width // 2, vdim=width // 2, batch_first=True)
        self.out = torch.nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = self.memory(x)
        return self.out(self.attention(self.query(x), memory, memory, need_weights=False)[0])


def test_multihead_attention_with_kdim_vdim():
    """Its head split is a view of a ket the matrix operators lay out with strided particles."""
    x = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    y = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1))
    limit = tpl.derive(_CrossAttention, example_inputs=(x,))
    model = _CrossAttention(48)
    torch.testing.assert_close(tpl.lower(_CrossAttention, example_inputs=(x,)).replay(model, x), model(x),
                               rtol=1e-10, atol=1e-12)
    trajectory = limit.train(x, y, steps=2, lr=0.1, loss="mse", particles=2**9, batches=2, progress=False)
    assert torch.isfinite(trajectory.outputs).all() and trajectory.outputs.shape == (3, 2, 4, 3)
    assert trajectory.loss[-1] < trajectory.loss[0], trajectory.loss


class _Swin(torch.nn.Module):
    """A tiny ``transformers`` Swin: its relative-position index buffer is an int64 index into a table."""

    def __init__(self, width: int) -> None:
        super().__init__()
        hf = pytest.importorskip("transformers")
        config = hf.SwinConfig(image_size=8, patch_size=2, num_channels=3, embed_dim=width, depths=[1], num_heads=[2],
                               window_size=2, mlp_ratio=2.0, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0, drop_path_rate=0.0, num_labels=3)
        self.model = hf.SwinForImageClassification(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def test_swin_limit_indexes_with_integer_buffers():
    pytest.importorskip("transformers")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    limit = tpl.derive(_Swin, example_inputs=(x,))
    integer = [name for name, init in limit.setup(x).initial.items() if init.dtype == torch.int64]
    assert any(name.endswith("relative_position_index") for name in integer), integer
    trajectory = limit.train(x, torch.tensor([0, 2]), steps=2, lr=0.1, loss="cross_entropy", particles=2**9,
                             batches=2, progress=False)
    assert torch.isfinite(trajectory.outputs).all()
    assert trajectory.loss[-1] < trajectory.loss[0], trajectory.loss


def _rope_model(family: str, width: int) -> torch.nn.Module:
    hf = pytest.importorskip("transformers")
    common = {"vocab_size": 16, "max_position_embeddings": 16, "attn_implementation": "sdpa", "use_cache": False,
              "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 1, "num_attention_heads": 2}
    if family == "mistral":  # grouped-query attention
        return hf.MistralForCausalLM(hf.MistralConfig(num_key_value_heads=1, head_dim=width // 2, **common))
    if family == "qwen2":  # biased q/k/v projections
        return hf.Qwen2ForCausalLM(hf.Qwen2Config(num_key_value_heads=1, **common))
    if family == "gpt-neox":  # rotary on half of each head, fused qkv
        return hf.GPTNeoXForCausalLM(hf.GPTNeoXConfig(rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0,
                                                      **common))
    return hf.PhiForCausalLM(hf.PhiConfig(partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attention_dropout=0.0, **common))


class _RopeLogits(torch.nn.Module):
    def __init__(self, width: int, family: str) -> None:
        super().__init__()
        self.model = _rope_model(family, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gpt-neox", "phi"])
def test_rope_families_replay_and_limit(family):
    """Rotary models: replay to 1e-10, and a μ-limit whose ``inv_freq`` is sampled by its coordinate law."""
    pytest.importorskip("transformers")
    ids = torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(1))
    limit = tpl.derive(lambda width: _RopeLogits(width, family), example_inputs=(ids,), optimizer="sgd")
    model = _RopeLogits(40, family)
    torch.testing.assert_close(limit.family(ids).program.replay(model, ids), model(ids), rtol=1e-10, atol=1e-12)
    laws = [init.value.family for init in limit.setup(ids).initial.values() if init.kind == "coordinate"]
    assert laws == ["geometric"]
    trajectory = limit.train(ids, y, steps=2, lr=0.1, loss="cross_entropy", particles=2**8, batches=2,
                             progress=False)
    assert torch.isfinite(trajectory.outputs).all()
    assert trajectory.loss[-1] < trajectory.loss[0], trajectory.loss
