"""Swin's μ-limit against finite μP training (issue 12): with 4 seeds at widths 32/128/512 the check was
undecided; with 16 seeds and width 2048 it decides (docs/architectures.md, "Swin")."""

from __future__ import annotations

import pytest
import torch

import tplimits as tpl
from tplimits.limit.runs import default_dtype


class _Swin(torch.nn.Module):
    """``bench_architectures.py``'s Swin: image 8, patch 2, one stage of depth 1, 2 heads, window 2."""

    def __init__(self, width: int) -> None:
        super().__init__()
        hf = pytest.importorskip("transformers")
        config = hf.SwinConfig(image_size=8, patch_size=2, num_channels=3, embed_dim=width, depths=[1], num_heads=[2],
                               window_size=2, mlp_ratio=2.0, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0, drop_path_rate=0.0, num_labels=3)
        self.model = hf.SwinForImageClassification(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


@pytest.mark.slow
def test_swin_check_passes_with_enough_seeds_and_widths():
    pytest.importorskip("transformers")
    with default_dtype(torch.float64):
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        y = torch.randint(0, 3, (2,), generator=torch.Generator().manual_seed(1))
        limit = tpl.derive(_Swin, example_inputs=(x,), optimizer="sgd")
        report = limit.check(x, y, widths=[32, 128, 512, 2048], seeds=16, steps=3, lr=0.1, loss="cross_entropy",
                             particles=2**14, batches=16, progress=False, center=True)
    assert report.passed, (report.status, report.slope, report.slope_se, report.mean_gap / report.mean_gap_se)
