"""The μ-limit against finite-width training, per architecture family and optimizer.

Expected values come from training only: for every case, finite models at three widths (several
seeds each) are trained by a plain torch loop, and the check asserts that their distance to the
limit shrinks like ``width^-1/2`` (fitted slope <= -0.4) and that the seed average at the largest
width agrees with the limit within 3 standard errors. Sizes are small enough for CI.
"""

from __future__ import annotations

import pytest
import torch

import tplimits as tpl


def _regression(d_in: int, rows: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d_in, generator=g), torch.randn(rows, 1, generator=g)


def _targets_for(limit: tpl.Limit, X: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Random class labels, one per output position of the model."""
    out = limit.family(X).model(32, 0)(X)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, out.shape[-1], out.shape[:-1], generator=g)


class GPT2Logits(torch.nn.Module):
    """A tiny ``transformers`` GPT-2 built from a config, returning its logits."""

    def __init__(self, width: int) -> None:
        super().__init__()
        hf = pytest.importorskip("transformers")
        self.model = hf.GPT2LMHeadModel(hf.GPT2Config(
            n_embd=width, n_layer=1, n_head=2, vocab_size=16, n_positions=8, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, use_cache=False, attn_implementation="sdpa", bos_token_id=0, eos_token_id=0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits


MLP_CASES = [(1, "gelu"), (2, "relu"), (3, "tanh")]


@pytest.mark.parametrize("optimizer, lr, particles", [("sgd", 0.5, 2**15), ("adam", 0.02, 2**14)])
@pytest.mark.parametrize("depth, activation", MLP_CASES)
def test_mlp(depth, activation, optimizer, lr, particles):
    limit = tpl.derive("mlp", optimizer=optimizer, depth=depth, d_in=4, activation=activation)
    X, y = _regression(4)
    report = limit.check(X, y, widths=[64, 256, 1024], seeds=6, steps=4, lr=lr, particles=particles, progress=False)
    assert report.passed, report.format()


@pytest.mark.parametrize("optimizer, lr, particles", [("sgd", 0.5, 2**14), ("adam", 0.02, 2**12)])
def test_resnet(optimizer, lr, particles):
    limit = tpl.derive("resnet", optimizer=optimizer, stages=1, image_size=4, batch=2, num_classes=3)
    X = tpl.architecture("resnet").example_inputs(image_size=4, batch=2)[0]
    y = torch.tensor([0, 2])
    report = limit.check(X, y, widths=[16, 64, 256], seeds=6, steps=3, lr=lr, loss="cross_entropy",
                         particles=particles, progress=False)
    assert report.passed, report.format()


@pytest.mark.parametrize("optimizer, lr, particles", [("sgd", 0.5, 2**14), ("adam", 0.02, 2**12)])
def test_transformer(optimizer, lr, particles):
    config = dict(n_layers=1, n_heads=2, vocab=16, seq_len=4, batch=2)
    limit = tpl.derive("transformer", optimizer=optimizer, **config)
    X = tpl.architecture("transformer").example_inputs(**config)[0]
    y = _targets_for(limit, X)
    with pytest.warns(UserWarning, match="attention scale"):
        report = limit.check(X, y, widths=[32, 128, 512], seeds=6, steps=3, lr=lr, loss="cross_entropy",
                             particles=particles, progress=False)
    assert report.passed, report.format()


@pytest.mark.parametrize("optimizer, lr, particles", [("sgd", 0.5, 2**15), ("adam", 0.02, 2**13)])
def test_decorrelated_mlp(optimizer, lr, particles):
    limit = tpl.derive("decorrelated-mlp", optimizer=optimizer, depth=2, d_in=4)
    X, y = _regression(4)
    report = limit.check(X, y, widths=[64, 256, 1024], seeds=6, steps=4, lr=lr, particles=particles, progress=False)
    assert report.passed, report.format()


@pytest.mark.parametrize("optimizer, lr, particles", [("sgd", 0.5, 2**14), ("adam", 0.02, 2**12)])
def test_gpt2_from_config(optimizer, lr, particles):
    ids = torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(0))
    limit = tpl.derive(GPT2Logits, optimizer=optimizer, example_inputs=(ids,))
    y = _targets_for(limit, ids)
    with pytest.warns(UserWarning, match="attention scale"):
        report = limit.check(ids, y, widths=[32, 128, 512], seeds=6, steps=3, lr=lr, loss="cross_entropy",
                             particles=particles, progress=False)
    assert report.passed, report.format()


class LlamaLogits(torch.nn.Module):
    """A tiny ``transformers`` Llama: RoPE (a float32 ``inv_freq`` buffer, a geometric coordinate law),
    grouped-query attention (one key/value head for two query heads), SwiGLU, RMSNorm, bias-free."""

    def __init__(self, width: int) -> None:
        super().__init__()
        hf = pytest.importorskip("transformers")
        self.model = hf.LlamaForCausalLM(hf.LlamaConfig(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=16, max_position_embeddings=16, attn_implementation="sdpa",
            use_cache=False))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.5), ("adam", 0.02)])
def test_llama_from_config(optimizer, lr):
    ids = torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(1))
    limit = tpl.derive(LlamaLogits, optimizer=optimizer, example_inputs=(ids,))
    with pytest.warns(UserWarning, match="attention scale"):
        report = limit.check(ids, y, widths=[32, 128, 512], seeds=4, steps=3, lr=lr, loss="cross_entropy",
                             particles=2**12, progress=False)
    assert report.passed, report.format()


class BertLogits(torch.nn.Module):
    """A tiny ``transformers`` BERT classifier: int64 position and token-type buffers, post-LayerNorm, GELU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        hf = pytest.importorskip("transformers")
        self.model = hf.BertForSequenceClassification(hf.BertConfig(
            hidden_size=width, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * width, vocab_size=16,
            max_position_embeddings=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits


@pytest.mark.parametrize("optimizer, lr, particles", [("sgd", 0.5, 2**14), ("adam", 0.02, 2**12)])
def test_bert_from_config(optimizer, lr, particles):
    ids = torch.randint(0, 16, (4, 4), generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2, 1, 0])
    limit = tpl.derive(BertLogits, optimizer=optimizer, example_inputs=(ids,))
    with pytest.warns(UserWarning, match="attention scale"):
        report = limit.check(ids, y, widths=[32, 128, 512], seeds=8, steps=3, lr=lr, loss="cross_entropy",
                             particles=particles, progress=False)
    assert report.passed, report.format()


class ViTCLS(torch.nn.Module):
    """A ``transformers`` ViT built from a config (8×8 images, patch 4: a CLS token, position embeddings, a
    convolutional patch embedding, pre-LN with eps 1e-12, bidirectional sdpa), read out by a Linear on the
    CLS token. Its MLP hidden size grows with the width: left at the config's constant it would be a
    fixed-size layer with no μ-limit (tests/test_bottleneck.py)."""

    layers = 1
    heads = 2

    def __init__(self, width: int) -> None:
        super().__init__()
        hf = pytest.importorskip("transformers")
        self.vit = hf.ViTModel(hf.ViTConfig(
            hidden_size=width, num_hidden_layers=self.layers, num_attention_heads=self.heads,
            intermediate_size=4 * width, image_size=8, patch_size=4, num_channels=3, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, attn_implementation="sdpa"), add_pooling_layer=False)
        self.head = torch.nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit(pixel_values=x).last_hidden_state[:, 0])


class ViTCLSDeep(ViTCLS):
    layers = 2


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 2, generator=g)


def _check_vit(make: type[ViTCLS], optimizer: str, lr: float, widths: list[int], steps: int,
               particles: int) -> None:
    X, y = _images()
    limit = tpl.derive(make, optimizer=optimizer, example_inputs=(X,))
    with pytest.warns(UserWarning, match="attention scale"):
        report = limit.check(X, y, widths=widths, seeds=6, steps=steps, lr=lr, particles=particles, progress=False)
    assert report.passed, report.format()


def test_vit_from_config_sgd():  # 2^14 particles: at 2^12 the limit's own error left 1 of 4 seeds undecided
    _check_vit(ViTCLS, "sgd", 0.1, [64, 256, 1024], 4, 2**14)


@pytest.mark.slow
def test_vit_from_config_adam():  # about 2 min on 2 shared cores
    # 2^14 particles: at 2^12 the limit's own error (0.017 with hats of one matrix, 0.024 independent) was as large
    # as the gap at width 1024, UNDECIDED; at 2^14 it is 0.0042
    _check_vit(ViTCLS, "adam", 0.01, [64, 256, 1024], 4, 2**14)


@pytest.mark.slow
def test_vit_two_layers_sgd():  # about 4 min on 2 shared cores
    _check_vit(ViTCLSDeep, "sgd", 0.1, [256, 1024], 5, 2**13)
