"""The ``transformer`` architecture: a GPT-style pre-LayerNorm decoder with ``d_model = width``.

``x = tok_emb(ids) + pos_emb[:T]``; ``n_layers`` blocks ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``;
``ln_f``; readout to vocabulary logits. Attention is causal multi-head self-attention with
``n_heads`` heads of size ``d_head = width // n_heads``, separate ``q``, ``k``, ``v`` projections
and an output projection ``proj``, scaled by ``1 / sqrt(d_head)``. It is computed either by
``F.scaled_dot_product_attention`` (``attention="sdpa"``) or written out (``"explicit"``); both
modes have the same parameters and compute the same function. The MLP is
``fc_out(gelu(fc_in(x)))`` with hidden size ``4 * width``. The readout is ``head`` (no bias), or,
with ``tied=True``, the token embedding itself (``logits = x @ tok_emb.weight.T``, no ``head``).

Parameter names: ``tok_emb.weight``, ``pos_emb.weight``,
``blocks.{i}.{ln1,ln2}.{weight,bias}``, ``blocks.{i}.attn.{q,k,v,proj}.{weight,bias}``,
``blocks.{i}.mlp.{fc_in,fc_out}.{weight,bias}``, ``ln_f.{weight,bias}`` and ``head.weight``
(untied only). There is no dropout and there are no buffers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tplimits.plugin import Architecture, ConfigError, hookimpl

ATTENTION_MODES = ("sdpa", "explicit")

DEFAULTS: dict[str, Any] = {
    "n_layers": 2,
    "n_heads": 4,
    "vocab": 32,
    "seq_len": 8,
    "tied": False,
    "attention": "sdpa",
    "batch": 2,
    "seed": 0,
}


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with separate ``q``, ``k``, ``v`` projections."""

    def __init__(self, d_model: int, n_heads: int, attention: str = "sdpa") -> None:
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ConfigError(f"unknown attention mode {attention!r}; known modes: {list(ATTENTION_MODES)}")
        if n_heads < 1 or d_model % n_heads != 0:
            raise ConfigError(
                f"width (d_model) {d_model} must be divisible by n_heads={n_heads}; "
                "pick a width that is a multiple of the head count"
            )
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.attention = attention
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scale = self.d_head**-0.5
            scores = (q @ k.transpose(-2, -1)) * scale
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
            y = scores.softmax(dim=-1) @ v
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.proj(y)


class MLPBlock(nn.Module):
    """``fc_out(gelu(fc_in(x)))`` with hidden size ``4 * d_model``."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, 4 * d_model)
        self.fc_out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class Block(nn.Module):
    """Pre-LayerNorm decoder block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, d_model: int, n_heads: int, attention: str = "sdpa") -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, attention)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLPBlock(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """GPT-style decoder mapping token ids ``[batch, T]`` (``T <= seq_len``) to logits
    ``[batch, T, vocab]``."""

    def __init__(
        self,
        width: int,
        n_layers: int = 2,
        n_heads: int = 4,
        vocab: int = 32,
        seq_len: int = 8,
        tied: bool = False,
        attention: str = "sdpa",
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ConfigError(f"n_layers must be >= 1, got {n_layers}")
        self.tied = bool(tied)
        self.tok_emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, n_heads, attention) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(width)
        self.head: nn.Linear | None = None if self.tied else nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.tok_emb(ids) + self.pos_emb.weight[:t]
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if self.head is None:
            return F.linear(x, self.tok_emb.weight)
        return self.head(x)


def build(
    width: int,
    n_layers: int = 2,
    n_heads: int = 4,
    vocab: int = 32,
    seq_len: int = 8,
    tied: bool = False,
    attention: str = "sdpa",
    **_: Any,
) -> Transformer:
    """A :class:`Transformer` with ``d_model = width``."""
    return Transformer(
        width,
        n_layers=n_layers,
        n_heads=n_heads,
        vocab=vocab,
        seq_len=seq_len,
        tied=tied,
        attention=attention,
    )


def example_inputs(
    vocab: int = 32, seq_len: int = 8, batch: int = 2, seed: int = 0, **_: Any
) -> tuple[torch.Tensor]:
    """Uniformly random token ids of shape ``[batch, seq_len]``, deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (batch, seq_len), generator=g),)


@hookimpl
def tplimits_architectures() -> list[Architecture]:
    return [
        Architecture(
            name="transformer",
            build=build,
            example_inputs=example_inputs,
            trace_widths=(32, 64),
            defaults=dict(DEFAULTS),
            description="GPT-style pre-LayerNorm decoder: causal multi-head attention (sdpa or explicit), "
            "4x GELU MLP, optional tied readout.",
        )
    ]
