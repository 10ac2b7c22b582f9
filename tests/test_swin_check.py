"""Swin's μ-limit against finite μP training (issue 12): with 4 seeds at widths 32/128/512 the check was
undecided; with 16 seeds and width 2048 it decides (docs/architectures.md, "Swin")."""

from __future__ import annotations

import pytest
import torch

import tplimits as tpl
from tests.test_limit_external import _Swin  # the matrix's Swin: image 8, patch 2, one stage, window 2
from tplimits.limit.runs import default_dtype


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
