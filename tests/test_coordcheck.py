"""Measured finite-width behaviour against the classification: coordinate-check slopes over widths.

Expected behaviour comes from the theory (μP: features move Θ(1); NTP: like n^-1/2; SP with
Adam at c = 1 and depth ≥ 2: the output's change grows like n^1/2, Thm 2.8.12), and the numbers
from training real networks at widths 128-2048.
"""

from __future__ import annotations

import math

import pytest
import torch

import tplimits as tpl
from tests.conftest import default_dtype
from tplimits import coord_check
from tplimits.cli import main

WIDTHS = (128, 256, 512, 1024, 2048)


@pytest.fixture(autouse=True)
def float32():
    with default_dtype(torch.float32):
        yield


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adam", 0.01)])
def test_mlp_mup_and_ntp_slopes(optimizer, lr):
    report = coord_check("mlp", params=("muP", "NTP"), optimizer=optimizer, widths=WIDTHS, steps=3, lr=lr, seeds=2)
    mup = report["muP"].hidden_change_slopes
    ntp = report["NTP"].hidden_change_slopes
    assert all(abs(s) <= 0.1 for s in mup), mup
    assert all(abs(s + 0.5) <= 0.15 for s in ntp), ntp
    for _, slope in report["muP"].spectral.values():  # ‖ΔW‖/√(out/in) width-independent (seed 001)
        assert abs(slope) <= 0.15


def test_sp_with_adam_diverges_as_classified():
    """SP with Adam at c = 1 for depth 3: classified unstable (a_out+b+r = 1/2 < 1) and measured so."""
    sp_c1 = tpl.parametrization("SP").with_all(c=1)
    verdict = tpl.classify("mlp", param=sp_c1, optimizer="adam", depth=3)
    assert verdict.regime == "unstable"
    report = coord_check("mlp", params=(sp_c1, "muP"), optimizer="adam", widths=WIDTHS, steps=3, lr=0.01,
                         seeds=2, depth=3)
    (sp_output,) = report[sp_c1.name].outputs
    (mup_output,) = report["muP"].outputs
    assert sp_output.change_slope > 0.3, sp_output  # grows like n^1/2 in theory
    # One output (8 numbers) fluctuates by O(n^-1/2) around its limit; hidden values average over n coordinates.
    assert abs(mup_output.change_slope) < 0.2, mup_output
    assert sp_output.change_slope - mup_output.change_slope > 0.25
    shallow = tpl.classify("mlp", param=sp_c1, optimizer="adam", depth=1)
    assert shallow.regime == "operator"  # depth 1: stable, r = 1
    report = coord_check("mlp", params=(sp_c1,), optimizer="adam", widths=WIDTHS, steps=3, lr=0.01, seeds=1,
                         depth=1)
    (out,) = report[sp_c1.name].outputs
    assert out.change_slope < 0.1, out


def test_sp_with_sgd_grows():
    report = coord_check("mlp", params=("SP",), optimizer="sgd", widths=(128, 512, 2048), steps=3, lr=0.1, seeds=1)
    assert "GROWS" in report["SP"].verdict
    assert max(report["SP"].hidden_change_slopes) > 0.3


def test_transformer_sees_attention_logits():
    """Attention logits are program values (module hooks cannot see them). μP scales them by 1/d_head, so
    at initialization (q, k independent) they are O(n^-1/2); SP keeps sdpa's 1/√d_head, O(1)."""
    report = coord_check("transformer", params=("muP", "SP"), optimizer="adam", widths=(64, 128, 256), steps=2,
                         lr=0.01, seeds=2, n_layers=1)
    slopes = {}
    for name in ("muP", "SP"):
        logits = [n for n in report[name].nodes if n.kind == "scalar" and "scaled_dot_product_attention" in n.op]
        assert len(logits) >= 3
        scaled = logits[1]  # the sum over d_head times the scale
        slopes[name] = scaled.init_slope
        assert all(math.isfinite(n.change_slope) for n in logits)
        assert all(abs(s) <= 0.1 for s in report[name].hidden_change_slopes) or name == "SP"
    assert abs(slopes["muP"] + 0.5) < 0.15 and abs(slopes["SP"]) < 0.15, slopes


def test_cli(capsys):
    assert main(["coordcheck", "mlp", "--param", "muP", "--widths", "64", "128", "--seeds", "1", "--steps", "1",
                 "-o", "depth=2"]) == 0
    out = capsys.readouterr().out
    assert "muP:" in out and "change slope" in out
