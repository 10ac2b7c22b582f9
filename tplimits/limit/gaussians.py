"""Standard normal draws for the hat kets' Gaussian coordinates, the same numbers as ``torch.randn``.

On a CPU, ``torch.randn`` in float64 fills a tensor with uniforms and turns each block of 16 into normals
by the Box–Muller transform in scalar code, about 30 ns a number: 9 % of the SGD reference case's time
(docs/performance.md). :func:`standard_normal` runs the same transform on the same uniforms, drawn in
chunks that stay in cache, with torch's vectorized ``log``/``cos``/``sin``: the numbers agree with
``torch.randn``'s to a unit or two in the last place and the generator ends in the same state, so a
run's random stream, its checkpoints and a sharded run's draws are those of ``torch.randn``. Elsewhere
(a GPU, float32, whose CPU path is vectorized already, or fewer than 16 numbers, which torch draws
another way) it is ``torch.randn``.
"""

from __future__ import annotations

import math

import torch

BLOCK = 16  # torch's CPU normal fill transforms blocks of 16 uniforms: u₁ from the first 8, u₂ from the last 8
CHUNK = 2 ** 14  # uniforms transformed at a time (a multiple of BLOCK), so the temporaries stay in cache


def standard_normal(shape: tuple[int, ...] | list[int], generator: torch.Generator, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """iid ``N(0, 1)`` numbers of ``shape``, drawn from ``generator``: ``torch.randn``'s numbers (module doc)."""
    count = math.prod(shape)
    if torch.device(device).type != "cpu" or dtype != torch.float64 or count < BLOCK:
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    out = torch.empty(count, dtype=dtype)
    whole = count - count % BLOCK
    for start in range(0, whole, CHUNK):
        chunk = out[start: min(start + CHUNK, whole)]
        torch.rand(chunk.shape, generator=generator, dtype=dtype, out=chunk)
        _box_muller(chunk)
    if whole < count:
        # torch draws a uniform for every number first, then redraws and transforms the last 16 afresh
        torch.rand(count - whole, generator=generator, dtype=dtype)
        last = torch.rand(BLOCK, generator=generator, dtype=dtype)
        _box_muller(last)
        out[count - BLOCK:] = last
    return out.view(shape)


def _box_muller(uniforms: torch.Tensor) -> None:
    """In place: each block of 16 uniforms ``(u₁[8], u₂[8])`` becomes ``r·cos θ, r·sin θ`` with
    ``r = √(−2 log(1 − u₁))`` and ``θ = 2π u₂``, torch's order."""
    blocks = uniforms.view(-1, 2, BLOCK // 2)
    radius = torch.log1p(blocks[:, 0].neg()).mul_(-2).sqrt_()
    angle = blocks[:, 1].mul(2 * math.pi)
    torch.mul(radius, torch.cos(angle), out=blocks[:, 0])
    torch.mul(radius, angle.sin_(), out=blocks[:, 1])
