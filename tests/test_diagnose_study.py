"""The lazy/rich contrast on every built-in family, at the sizes of benchmarks/bench_diagnose.py (slow:
``python -m pytest -m slow tests/test_diagnose_study.py``; docs/diagnose.md lists the measured slopes).

Theory (expected, not measured): under NTP the linearization gap, kernel drift and weak correlation
fall at least like n^-1/2 and the spectral ratio like n^-1/2; under μP all five numbers are Θ(1). The
widths start where μP's kernel drift and linearization gap are flat (below them they still approach
their limit: docs/diagnose.md, "Measured"), and the ResNet trains at lr 0.1 (at 0.5 its kernel moves by
six times its norm in 5 steps and 256 channels are not yet in the limit).
"""

from __future__ import annotations

import pytest
import torch

import tplimits as tpl
from tplimits.limit.runs import default_dtype

STUDIES = {
    "mlp-adam": ("mlp", "adam", 0.01, [256, 512, 1024, 2048, 4096], 3, {"depth": 3, "d_in": 8, "d_out": 1}),
    "transformer": ("transformer", "sgd", 0.5, [128, 256, 512, 1024], 2,
                    {"n_layers": 1, "n_heads": 2, "vocab": 8, "seq_len": 4, "batch": 4}),
    "resnet": ("resnet", "sgd", 0.1, [32, 64, 128, 256], 2,
               {"stages": 1, "blocks": 1, "image_size": 4, "num_classes": 2, "batch": 8}),
}


@pytest.mark.slow
@pytest.mark.parametrize("study", list(STUDIES))
def test_lazy_under_ntp_and_rich_features_under_mup(study):
    arch, optimizer, lr, widths, seeds, config = STUDIES[study]
    g = torch.Generator().manual_seed(0)
    with default_dtype(torch.float64):
        X = torch.randn(16, 8, generator=g) if arch == "mlp" else tpl.architecture(arch).example_inputs(**config)[0]
        model, _ = tpl.instantiate(arch, width=32, param="muP", optimizer="sgd", example_inputs=(X,), **config)
        y = torch.randn(model(X).shape, generator=g)
        report = tpl.diagnose(arch, X, y, param=["NTP", "muP"], optimizer=optimizer, widths=widths, seeds=seeds,
                              steps=5, lr=lr, **config)
    ntp, mup = report["NTP"], report["muP"]
    for name in ("linearization gap", "kernel drift", "weak correlation"):
        assert ntp[name].slope <= -0.4, (study, name, ntp[name].describe())
    assert abs(ntp["spectral ratio"].slope + 0.5) <= 0.15, (study, ntp["spectral ratio"].describe())
    for name in ("linearization gap", "kernel drift", "weak correlation", "feature movement", "spectral ratio"):
        assert abs(mup[name].slope) <= 0.15, (study, name, mup[name].describe())
