"""Buffers whose coordinates are a deterministic function f(i/m) of their relative position along a width
axis (RoPE's ``inv_freq = base^(-2i/d_head)``): their limit ket is f(U), U ~ Uniform(0, 1) once per particle.
The law is detected at the traced widths and a third, and a buffer that follows none is refused by name."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn as nn

import tplimits as tpl
from tplimits.core.ir import ParameterInfo
from tplimits.training.init import coordinate_law


def _info(layout):
    return ParameterInfo("freq", "vector", layout, (16,), False)


def _inv_freq(d_head: int, base: float = 10000.0, dtype=torch.float32) -> torch.Tensor:
    """HF's RoPE frequencies, computed as HF does (in float32)."""
    return 1.0 / (base ** (torch.arange(0, d_head, 2, dtype=torch.int64).to(dtype) / d_head))


def test_laws_are_detected_across_widths_and_refused_when_absent():
    info = _info((tpl.Width(Fraction(1, 4)),))
    law = coordinate_law(info, [_inv_freq(d) for d in (16, 32, 48)])
    assert law is not None and law.family == "geometric"
    assert "0.0001^u" in law.describe()
    u = torch.tensor([0.0, 0.5, 0.75], dtype=torch.float64)
    torch.testing.assert_close(law(u), 10000.0 ** -u, rtol=1e-5, atol=0)
    affine = coordinate_law(info, [torch.arange(m) / m * 2 - 1 for m in (4, 8, 12)])
    assert affine is not None and affine.family == "affine"
    # arange(m) is affine at each width, but its slope grows with width: no law
    assert coordinate_law(info, [torch.arange(m, dtype=torch.float64) for m in (4, 8, 12)]) is None
    g = torch.Generator().manual_seed(0)
    assert coordinate_law(info, [torch.rand(m, generator=g) + 1 for m in (4, 8, 12)]) is None
    # the same law at one width is not enough: a geometric ratio that changes with width is refused
    assert coordinate_law(info, [_inv_freq(16), _inv_freq(32, base=100.0)]) is None


class _Rotary(nn.Module):
    """A buffer of geometric frequencies over the width axis, used coordinatewise."""

    def __init__(self, width: int, law: str = "geometric") -> None:
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(3, width), nn.Linear(width, width), nn.Linear(width, 1)
        freq = 100.0 ** (-torch.arange(width) / width) if law == "geometric" else torch.arange(width) / 8.0
        self.register_buffer("freq", freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x)) * torch.cos(3 * self.freq)
        return self.out(torch.tanh(self.hidden(h)) * (1 + self.freq))


def test_limit_of_a_coordinate_buffer_matches_training():
    """Expected values from finite-width training: the gap to the limit shrinks like width^-1/2."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)
    limit = tpl.derive(_Rotary, example_inputs=(X,), optimizer="sgd")
    init = limit.setup(X).initial["freq"]
    assert init.kind == "coordinate" and "0.01^u" in init.value.describe()
    report = limit.check(X, y, widths=[32, 128, 512], seeds=6, steps=3, lr=0.5, particles=2**13, progress=False)
    assert report.passed, report.format()


def test_a_buffer_with_no_law_is_refused_by_name():
    X = torch.randn(4, 3)
    limit = tpl.derive(lambda width: _Rotary(width, "arange"), example_inputs=(X,), optimizer="sgd")
    with pytest.raises(tpl.NotRepresentable, match=r"buffer 'freq' grows with width.*no function f\(i/m\)"):
        limit.setup(X)


def test_llama_mu_limit_runs():
    """RoPE (float32 ``inv_freq``: a geometric law), grouped-query attention, SwiGLU, RMSNorm."""
    hf = pytest.importorskip("transformers")

    class Llama(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            config = hf.LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, vocab_size=16,
                                    max_position_embeddings=16, attn_implementation="sdpa", use_cache=False)
            self.model = hf.LlamaForCausalLM(config)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.model(ids).logits

    ids = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(1))
    limit = tpl.derive(Llama, example_inputs=(ids,))
    assert limit.setup(ids).initial["model.model.rotary_emb.inv_freq"].value.family == "geometric"
    trajectory = limit.train(ids, y, steps=2, lr=0.05, loss="cross_entropy", particles=2**9, batches=2,
                             progress=False)
    assert torch.isfinite(trajectory.outputs).all()
    assert trajectory.loss[-1] < trajectory.loss[0]
