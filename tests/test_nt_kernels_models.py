"""The NT limit's NTK against finite NTP networks of four architectures — the MLP, the ResNet, the Transformer
and a ``transformers`` GPT-2 built from a config — and what one small SGD step changes in them.

Expected values come from the instantiated networks only: their empirical NTK (torch.func, each parameter
weighted by its optimizer's ``lr_scale·grad_scale``, :func:`tplimits.diagnostics.kernels.empirical_ntk`) and
the change of their centered outputs after one SGD step at a small learning rate, ``(f_1 − f_0)/lr → −K χ_0``.
Each comparison is judged as ``limit.check`` judges a trajectory: the mean over seeds of each network's
relative distance to the limit shrinks with width (fitted slope ≤ −0.4), and the seed average at the largest
width is within 3 standard errors of the limit (the seeds' and the limit's Monte Carlo errors combined).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import tplimits as tpl
from tplimits.diagnostics.kernels import empirical_ntk

LR = 1e-4  # the one step's learning rate: its second-order change is far below the finite widths' gaps


def _flat(kernel: tpl.limit.nt.Kernel) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel and its standard error over flattened (row, output) coordinates, ``[J, J]``."""
    value, se = kernel.value, kernel.se
    if value.ndim == 2:
        return value, se
    n, _, e, _ = value.shape
    return value.permute(0, 2, 1, 3).reshape(n * e, n * e), se.permute(0, 2, 1, 3).reshape(n * e, n * e)


def _finite(arch, width: int, seed: int, X: torch.Tensor, y: torch.Tensor, loss: str, example, config):
    """One centered NTP network: its empirical NTK ``[J, J]`` and ``(f_1 − f_0)/lr`` after one SGD step ``[J]``."""
    model, opt = tpl.instantiate(arch, width=width, param="NTP", optimizer="sgd", lr=LR, seed=seed, center=True,
                                 example_inputs=example, **config)
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    names = {id(p): name for name, p in model.named_parameters()}
    rates = {names[id(p)]: g["lr_scale"] * g["grad_scale"] for g in opt.param_groups for p in g["params"]}
    buffers = dict(model.named_buffers())

    def outputs(ps):  # fresh buffers per call: batch norm updates its running statistics in place
        return torch.func.functional_call(model, {**ps, **{k: b.clone() for k, b in buffers.items()}},
                                          (X,)).reshape(-1)

    with sdpa_kernel(SDPBackend.MATH):  # the CPU flash-attention kernel has no forward-mode derivative
        K = empirical_ntk(outputs, params, rates)
    tpl.loss(loss)(model(X), y).backward()
    opt.step()
    with torch.no_grad():
        return K, (model(X) / LR).reshape(-1)


def _slope(widths, gaps) -> float:
    w, g = torch.tensor(widths, dtype=torch.float64).log(), torch.tensor(gaps, dtype=torch.float64).log()
    return float(((w - w.mean()) * (g - g.mean())).sum() / (w - w.mean()).square().sum())


def _judge(what: str, widths, runs: list[torch.Tensor], limit: torch.Tensor, limit_se: torch.Tensor) -> dict:
    """``runs[w]``: ``[seeds, ...]`` at width ``widths[w]``. Relative gaps per seed and their slope — fitted, as
    ``limit.check`` does, to what is left of each gap once the limit's own Monte Carlo error is removed in
    quadrature — and the seed average at the largest width against the limit in units of the combined
    standard error."""
    scale = float(limit.norm())
    floor = float(limit_se.norm()) / scale
    gaps = [float(torch.stack([(r - limit).norm() for r in at]).mean()) / scale for at in runs]
    excess = [math.sqrt(max(g**2 - floor**2, 1e-300)) for g in gaps]
    last = runs[-1]
    seeds = last.shape[0]
    mean_gap = float((last.mean(0) - limit).square().mean().sqrt())
    se = float((last.var(0) / seeds + limit_se.square()).mean().sqrt())
    found = {"what": what, "gaps": [round(g, 4) for g in gaps], "slope": round(_slope(widths, excess), 3),
             "seed average / SE": round(mean_gap / se, 2),
             "seed average gap": round(mean_gap * math.sqrt(limit.numel()) / scale, 4),
             "limit's relative error": round(floor, 4)}
    print(found)
    assert floor < gaps[-1] / 2, found  # the limit's error does not decide the gaps
    assert found["slope"] <= -0.4, found
    assert mean_gap <= 3 * se, found
    return found


def _compare(arch, X, y, loss, widths, seeds, particles=2**12, example=None, **config) -> None:
    limit = tpl.derive(arch, optimizer="sgd", param="NTP", example_inputs=example, **config)
    K, K_se = _flat(limit.kernel(X, particles=particles, batches=4))
    out_shape = limit.family(X).model(16, 0)(X).shape
    chi = tpl.loss(loss).error_signal(torch.zeros(out_shape), y, torch.arange(len(X))).reshape(-1)
    predicted, predicted_se = -(K @ chi), (K_se.square() @ chi.square()).sqrt()
    kernels, steps = [], []
    for width in widths:
        pairs = [_finite(arch, width, seed, X, y, loss, example, config) for seed in range(seeds)]
        kernels.append(torch.stack([k for k, _ in pairs]))
        steps.append(torch.stack([s for _, s in pairs]))
    _judge("empirical NTK", widths, kernels, K, K_se)
    _judge("one SGD step", widths, steps, predicted, predicted_se)


def test_mlp():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(4, 4, generator=g), torch.randn(4, 1, generator=g)
    _compare("mlp", X, y, "mse", [32, 128, 512, 2048], 6, depth=2, d_in=4, activation="tanh")


def test_resnet():
    config = dict(stages=1, image_size=4, batch=2, num_classes=3)
    X = tpl.architecture("resnet").example_inputs(image_size=4, batch=2)[0]
    _compare("resnet", X, torch.tensor([0, 2]), "cross_entropy", [16, 64, 256], 4, **config)


def test_transformer():
    config = dict(n_layers=1, n_heads=2, vocab=4, seq_len=2, batch=2)
    X = tpl.architecture("transformer").example_inputs(**config)[0]
    y = torch.randint(0, 4, (2, 2), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="attention scale"):
        _compare("transformer", X, y, "cross_entropy", [32, 128, 512], 4, **config)


def _gpt2(vocab: int) -> type[torch.nn.Module]:
    hf = pytest.importorskip("transformers")

    class GPT2Logits(torch.nn.Module):
        """A tiny ``transformers`` GPT-2 from a config (tied embeddings, as GPT-2 has), returning its logits."""

        def __init__(self, width: int) -> None:
            super().__init__()
            self.model = hf.GPT2LMHeadModel(hf.GPT2Config(
                n_embd=width, n_layer=1, n_head=2, vocab_size=vocab, n_positions=8, resid_pdrop=0.0,
                embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, attn_implementation="sdpa", bos_token_id=0,
                eos_token_id=0))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.model(ids).logits

    return GPT2Logits


@pytest.mark.parametrize("vocab, positions, seeds, particles", [
    (4, 2, 4, 2**12), pytest.param(8, 3, 6, 2**14, marks=pytest.mark.slow)])
def test_gpt2_from_config(vocab, positions, seeds, particles):
    arch = _gpt2(vocab)
    ids = torch.randint(0, vocab, (2, positions), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, vocab, (2, positions), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="attention scale"):
        _compare(arch, ids, y, "cross_entropy", [32, 128, 512], seeds, particles, example=(ids,))
