"""``tpl.diagnose``: lazy (NTP) against rich (μP) training, from finite-width training at growing widths.

Expected slopes come from the theory's exponents (Lee et al. 2019; seeds 000-002): under NTP the
linearization gap, kernel drift and weak correlation vanish at least like n^-1/2 and the spectral ratio
like n^-1/2; under μP all are Θ(1). The measured slopes come from training. The building blocks are
checked against independent computations: the NTK against a dense autograd Jacobian, the weak
correlation against finite differences, power iteration against LAPACK, the fit against a closed form.
"""

from __future__ import annotations

import math

import pytest
import torch

import tplimits as tpl
from tplimits.diagnostics.diagnose import Measure
from tplimits.diagnostics.kernels import empirical_ntk, weak_correlation
from tplimits.errors import Diverged, TplimitsError
from tplimits.limit.runs import default_dtype
from tplimits.training.coordcheck import fit_slope, spectral_norm

MLP = {"depth": 3, "d_in": 8, "d_out": 1}


def _data(rows: int = 16, d_in: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, d_in, generator=g), torch.randn(rows, 1, generator=g)


@pytest.fixture(scope="module")
def mlp_sgd():
    with default_dtype(torch.float64):  # the autouse float64 fixture is per test; this one is per module
        X, y = _data()
        return tpl.diagnose("mlp", X, y, param=["NTP", "muP"], optimizer="sgd", widths=[64, 256, 1024], seeds=2,
                            steps=5, lr=0.5, **MLP)


def test_ntp_is_lazy(mlp_sgd):
    ntp = mlp_sgd["NTP"]
    for name in ("linearization gap", "kernel drift", "weak correlation"):
        assert ntp[name].slope <= -0.4, (name, ntp[name].describe())
    assert abs(ntp["spectral ratio"].slope + 0.5) <= 0.15, ntp["spectral ratio"].describe()
    assert ntp.regime == "lazy" and not ntp.contradictions, ntp.verdict
    assert ntp.predicted == "operator"


def test_mup_is_rich(mlp_sgd):
    mup = mlp_sgd["muP"]
    for name, m in mup.measures.items():
        assert abs(m.slope) <= 0.15, (name, m.describe())
    # Θ(1), not merely flat at zero: features and the kernel move by a visible fraction
    assert min(mup["feature movement"].mean) > 0.1 and min(mup["kernel drift"].mean) > 0.1
    assert mup.regime == "rich" and not mup.contradictions, mup.verdict


def test_report_formats_and_plots(mlp_sgd, tmp_path):
    text = mlp_sgd.format()
    assert "NTP (sgd): lazy" in text and "muP (sgd): rich" in text and "n=1024" in text
    path = mlp_sgd.plot(str(tmp_path / "diagnose.png"))
    assert (tmp_path / "diagnose.png").stat().st_size > 10_000 and path.endswith(".png")
    with pytest.raises(TplimitsError, match="no parametrization 'SP'"):
        mlp_sgd["SP"]
    with pytest.raises(TplimitsError, match="no measure"):
        mlp_sgd["NTP"]["loss"]


def test_empirical_ntk_is_the_dense_jacobian_product():
    model, _ = tpl.instantiate("mlp", width=12, param="muP", optimizer="sgd", depth=2, d_in=3, d_out=2)
    lin = tpl.linearize(model)
    x = torch.randn(4, 3)
    fn, point = lin.function(x), lin.point()
    weights = {name: 0.5 + i for i, name in enumerate(point)}
    kernel = empirical_ntk(fn, point, weights, columns=3)
    names = list(point)
    jac = torch.autograd.functional.jacobian(lambda *ps: fn(dict(zip(names, ps, strict=True))),
                                             tuple(point.values()))
    dense = torch.cat([j.reshape(8, -1) * math.sqrt(weights[n]) for n, j in zip(names, jac, strict=True)], dim=1)
    assert torch.allclose(kernel, dense @ dense.T, rtol=1e-12, atol=1e-12)


def test_weak_correlation_is_the_second_difference_over_the_first():
    model, _ = tpl.instantiate("mlp", width=24, param="NTP", optimizer="sgd", depth=2, d_in=3, d_out=1)
    lin = tpl.linearize(model)
    torch.manual_seed(0)
    x = torch.randn(6, 3)
    fn, point = lin.function(x), lin.point()
    u = {k: torch.randn_like(v) for k, v in point.items()}
    h = 1e-4  # truncation ~h² and rounding ~eps/h² of the second difference both below 1e-7 relative
    f = {s: fn({k: v + s * h * u[k] for k, v in point.items()}) for s in (-1, 0, 1)}
    first, second = (f[1] - f[-1]) / (2 * h), (f[1] - 2 * f[0] + f[-1]) / h**2
    expected = float(0.5 * second.square().mean().sqrt() / first.square().mean().sqrt())
    assert weak_correlation(fn, point, u) == pytest.approx(expected, rel=1e-5)


def test_power_iteration_matches_lapack():
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(400, 3, generator=g) @ torch.randn(3, 300, generator=g)
    matrix = low_rank + 0.01 * torch.randn(400, 300, generator=g)
    assert spectral_norm(matrix) == pytest.approx(float(torch.linalg.matrix_norm(matrix, ord=2)), rel=1e-6)


def test_slope_fit_and_its_standard_error():
    widths = [64, 64, 256, 256, 1024, 1024]
    slope, se = fit_slope(widths, [3.0 * w ** -0.5 for w in widths])
    assert slope == pytest.approx(-0.5, abs=1e-12) and se == pytest.approx(0.0, abs=1e-12)
    noisy = [3.0 * w ** -0.5 * (1.1 if i % 2 else 0.9) for i, w in enumerate(widths)]
    x, yv = torch.tensor(widths, dtype=torch.float64).log(), torch.tensor(noisy).log()
    xc = x - x.mean()
    beta = float((xc * yv).sum() / xc.square().sum())
    resid = yv - yv.mean() - beta * xc
    want_se = float((resid.square().sum() / (len(widths) - 2) / xc.square().sum()).sqrt())
    assert fit_slope(widths, noisy) == pytest.approx((beta, want_se), rel=1e-12)


def test_an_exact_zero_is_not_a_slope():
    m = Measure.fit("linearization gap", [64, 128], [(64, 0.0), (128, 0.0)])
    assert m.regime == "exact" and math.isnan(m.slope)
    with pytest.raises(Diverged, match="kernel drift is not finite at width 128"):
        Measure.fit("kernel drift", [64, 128], [(64, 0.1), (128, float("nan"))])


def test_bad_arguments_are_named_before_training():
    X, y = _data()
    with pytest.raises(TplimitsError, match="X has 16 rows but y has 3"):
        tpl.diagnose("mlp", X, y[:3], widths=[8, 16], **MLP)
    with pytest.raises(TplimitsError, match="widths"):
        tpl.diagnose("mlp", X, y, widths=[8], **MLP)
    with pytest.raises(TplimitsError, match="twice"):
        tpl.diagnose("mlp", X, y, param=["NTP", "NTP"], widths=[8, 16], **MLP)
    with pytest.raises(TplimitsError, match="driven by layer inputs"):
        tpl.diagnose("mlp", X, y, optimizer="decorrelation", widths=[8, 16], **MLP)
    with pytest.raises(TplimitsError, match=r"do not match outputs of shape \(16, 1\)"):
        tpl.diagnose("mlp", X, torch.randn(16, 5), widths=[8, 16], **MLP)
    with pytest.raises(TplimitsError, match=r"cannot compare the model's outputs \(shape \(16, 1\)\) with y"):
        tpl.diagnose("mlp", X, y, loss=lambda out, target: (out @ target).mean(), widths=[8, 16], **MLP)
    with pytest.raises(TplimitsError, match="non-finite"):
        tpl.diagnose("mlp", X.masked_fill(X > 2, float("nan")), y, widths=[8, 16], **MLP)


def test_a_diverging_run_raises():
    X, y = _data()
    with pytest.raises(Diverged, match="diverged"):
        tpl.diagnose("mlp", X, y, param="SP", widths=[256, 512], seeds=1, steps=6, lr=50.0, **MLP)


def test_the_nt_limit_next_to_the_linearization():
    """Under NTP the width-n trajectory (centered) nears the NT limit like n^-1/2; μP has no NT limit to show."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
    report = tpl.diagnose("mlp", X, y, param=["NTP", "muP"], widths=[64, 256], seeds=2, steps=3, lr=0.5, limit=True,
                          depth=2, d_in=4, d_out=1)
    assert report["NTP"].limit_check.slope <= -0.4 and report["muP"].limit_check is None
    assert "distance to the NT limit" in report.format()


def test_empirical_ntk_of_a_function_using_sdpa_matches_a_dense_jacobian():
    """torch's CPU flash attention has no forward-mode derivative: the kernel runs attention by the math
    kernel, and equals J Jᵀ from a dense autograd Jacobian."""
    from torch.func import functional_call

    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8).double()
    x = torch.randn(4, 8, dtype=torch.float64)

    def fn(params: dict) -> torch.Tensor:
        q = functional_call(layer, params, (x,)).view(1, 2, 4, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q).sum(-1).flatten()

    params = {k: v.detach() for k, v in layer.named_parameters()}
    jac = torch.autograd.functional.jacobian(lambda w, b: fn({"weight": w, "bias": b}), tuple(params.values()))
    dense = sum(j.flatten(1) @ j.flatten(1).T for j in jac)
    torch.testing.assert_close(empirical_ntk(fn, params), dense, rtol=1e-10, atol=1e-12)
