"""The exact kernel path of the NT limit (Gaussian integrals through the program) against independent
computations: the arc-cosine and error-function recursions of the MLP's kernels written here from the
model and NTP's abcd factors, and the Monte Carlo path within its standard errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tplimits as tpl
from tplimits.errors import TplimitsError
from tplimits.limit.exact import ExactInterpreter, NotGaussian, kernels_at, law_moment


def _inputs(rows: int, d_in: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _angle(S: torch.Tensor) -> torch.Tensor:
    """The angle between (u, v) ~ N(0, S) entrywise, by atan2 (exactly 0 on the diagonal)."""
    var = S.diagonal()
    return torch.atan2((torch.outer(var, var) - S**2).clamp_min(0).sqrt(), S)


def _relu_duals(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E[relu(u) relu(v)] and E[relu'(u) relu'(v)] (Cho & Saul's arc-cosine kernels of degree 1 and 0)."""
    theta = _angle(S)
    norms = torch.outer(S.diagonal(), S.diagonal()).sqrt()
    return norms / (2 * math.pi) * (torch.sin(theta) + (math.pi - theta) * torch.cos(theta)), (math.pi - theta) / (
        2 * math.pi)


def _erf_duals(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E[erf(u) erf(v)] (Williams) and E[erf'(u) erf'(v)] = (4/π) det(I + 2S)^{-1/2}."""
    d = 1 + 2 * S.diagonal()
    outer = torch.outer(d, d)
    return 2 / math.pi * torch.arcsin(2 * S / outer.sqrt()), 4 / math.pi / (outer - 4 * S**2).sqrt()


def _ntp_mlp(X: torch.Tensor, depth: int, bias: bool, duals) -> tuple[torch.Tensor, torch.Tensor]:
    """NNGP and NTK of an MLP under NTP: first layer N(0, 1/d) entries, hidden n^-1/2·N(0, 1), biases N(0, 1),
    readout n^-1/2·N(0, 1), every learning-rate × gradient scale times multiplier² giving 1 per coordinate;
    the output bias enters times n^-1/2 and leaves no limit term."""
    b = 1.0 if bias else 0.0
    S = X @ X.T / X.shape[1] + b
    Ks, dKs = [], []
    for _ in range(depth):
        K, dK = duals(S)
        Ks.append(K)
        dKs.append(dK)
        S = K + b
    ntk, back = Ks[-1].clone(), dKs[-1]
    for layer in range(depth - 1, -1, -1):
        below = Ks[layer - 1] if layer > 0 else X @ X.T
        ntk = ntk + back * (below + b)
        if layer > 0:
            back = back * dKs[layer - 1]
    return Ks[-1], ntk


@pytest.mark.parametrize("bias", [True, False])
def test_relu_mlp_matches_the_arc_cosine_recursion(bias):
    X = _inputs(6)
    limit = tpl.derive("mlp", optimizer="sgd", param="NTP", depth=3, d_in=4, activation="relu", bias=bias)
    nngp, ntk = _ntp_mlp(X, 3, bias, _relu_duals)
    for kind, expected in (("nngp", nngp), ("ntk", ntk)):
        K = limit.kernel(X, kind=kind)
        assert K.path == "exact" and K.shape == (6, 6) and not K.se.any()
        assert (K.value - expected).abs().max() < 1e-10, (kind, (K.value - expected).abs().max())


def test_several_outputs_and_a_second_set():
    """Independent readout rows: the kernel is the one-output kernel times the identity over outputs; the
    block between X and X2 is the same numbers as the kernel of both sets."""
    X, X2 = _inputs(3), _inputs(2, seed=1)
    limit = tpl.derive("mlp", optimizer="sgd", param="NTP", depth=2, d_in=4, d_out=2, activation="relu")
    _, ntk = _ntp_mlp(torch.cat([X, X2]), 2, True, _relu_duals)
    K = limit.kernel(X, X2=X2)
    assert K.shape == (3, 2, 2, 2) and K.path == "exact"
    expected = ntk[:3, 3:, None, None] * torch.eye(2, dtype=torch.float64)
    assert (K.value - expected).abs().max() < 1e-10


class _ErfMLP(nn.Module):
    def __init__(self, width: int, d_in: int = 4, depth: int = 2) -> None:
        super().__init__()
        sizes = [d_in] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False))
        self.readout = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.erf(layer(x))
        return self.readout(x)


def test_erf_mlp_matches_its_closed_form():
    X = _inputs(5)
    limit = tpl.derive(_ErfMLP, optimizer="sgd", param="NTP", example_inputs=(X.float(),))
    nngp, ntk = _ntp_mlp(X, 2, True, _erf_duals)
    for kind, expected in (("nngp", nngp), ("ntk", ntk)):
        K = limit.kernel(X, kind=kind)
        assert K.path == "exact"
        assert (K.value - expected).abs().max() < 1e-10, (kind, (K.value - expected).abs().max())


def test_quadrature_matches_closed_forms():
    """The two-dimensional quadrature on erf and on the smooth bump erf' against their closed forms, at
    pre-activation variances from 1 to 30."""
    A = _inputs(5)
    mu = torch.zeros(5, dtype=torch.float64)
    bump = lambda t: 2 / math.sqrt(math.pi) * torch.exp(-t**2)  # noqa: E731
    for scale in (0.25, 1.0, 4.0):
        S = A @ A.T * scale
        closed, closed_prime = _erf_duals(S)
        assert (law_moment(("quadrature",), torch.erf, mu, S) - closed).abs().max() < 1e-12
        assert (law_moment(("quadrature",), bump, mu, S) - closed_prime).abs().max() < 1e-12


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_monte_carlo_path_agrees_with_the_exact_path(activation):
    """relu: closed forms; tanh: quadrature. Every entry of both kernels within 3 Monte Carlo SE."""
    X = _inputs(4)
    limit = tpl.derive("mlp", optimizer="sgd", param="NTP", depth=2, d_in=4, activation=activation)
    for kind in ("nngp", "ntk"):
        exact = limit.kernel(X, kind=kind, path="exact")
        mc = limit.kernel(X, kind=kind, path="monte carlo", particles=2**14, batches=16)
        assert mc.path == "monte carlo"
        z = ((mc.value - exact.value) / mc.se).abs()
        assert z.max() < 3.0, (kind, z)


def test_exact_path_refuses_what_it_cannot_integrate_and_auto_falls_back():
    limit = tpl.derive("transformer", optimizer="sgd", param="NTP", n_layers=1, n_heads=2, vocab=5, seq_len=3,
                       batch=1)
    (ids,) = tpl.architecture("transformer").example_inputs(vocab=5, seq_len=3, batch=1)
    with pytest.raises(NotGaussian, match="cannot integrate %") as caught:
        limit.kernel(ids, path="exact")
    assert caught.value.instruction and "layer_norm" not in caught.value.instruction  # past the layer norms
    K = limit.kernel(ids, particles=2**8, batches=2)
    assert K.path == "monte carlo" and K.se.abs().sum() > 0
    with pytest.raises(TplimitsError, match="path must be one of"):
        limit.kernel(ids, path="closed form")


class _SmallCNN(nn.Module):
    """A first convolution (fixed input channels), a hidden 3x3 convolution (one matrix per offset), relu,
    global average pooling and a linear readout."""

    def __init__(self, width: int, c_in: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.mean(dim=(2, 3)))


def test_small_cnn_exact_path_agrees_with_monte_carlo():
    X = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    limit = tpl.derive(_SmallCNN, optimizer="sgd", param="NTP", example_inputs=(X.float(),))
    for kind in ("nngp", "ntk"):
        exact = limit.kernel(X, kind=kind)
        assert exact.path == "exact"
        mc = limit.kernel(X, kind=kind, path="monte carlo", particles=2**12, batches=16)
        z = ((mc.value - exact.value) / mc.se).abs()
        assert z.max() < 3.0, (kind, z)


class _Conv1dNet(nn.Module):
    """1-D convolutions: a hidden one with dilation 2 and stride 2, no padding (patches by unfolding a height-1
    image, then a squeeze), tanh, a sum over positions and a readout."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, width, 3, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, dilation=2, stride=2)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv2(torch.relu(self.conv1(x)))).sum(dim=2))


def _largest_family(limit, X: torch.Tensor, structured: bool) -> int:
    setup = limit.setup(X)
    interp = ExactInterpreter(setup, 2**10, torch.float64, torch.device("cpu"), structured=structured)
    interp.run(X, stop=setup.total.forward_length)
    return max(size for size, _ in interp.metrics.sources.values())


@pytest.mark.parametrize("model, shape", [(_SmallCNN, (8, 2, 3, 3)), (_Conv1dNet, (6, 2, 9))])
def test_convolution_as_shifted_covariances_agrees_with_the_product_over_patches(model, shape):
    """A hidden convolution's second moment (and NTK) as the sum over kernel offsets of its input's shifted
    second moment, against the generic matrix product over the unfolded patches: the same kernels, and no
    Gaussian family over (rows × offsets × positions)."""
    X = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    limit = tpl.derive(model, optimizer="sgd", param="NTP", example_inputs=(X.float(),))
    setup = limit.setup(X)
    fast, slow = (kernels_at(setup, X, 2**20, torch.float64, torch.device("cpu"), structured=s) for s in (True, False))
    scale = float(slow.nngp.abs().max())
    assert float((fast.nngp - slow.nngp).abs().max()) < 1e-12 * scale
    assert set(fast.ntk) == set(slow.ntk) and len(slow.ntk) == 6
    for param, ntk in slow.ntk.items():
        assert float((fast.ntk[param] - ntk).abs().max()) < 1e-12 * max(float(ntk.abs().max()), scale), param
    positions = math.prod(shape[2:]) if model is _SmallCNN else 3  # the hidden convolution's outputs per row
    assert _largest_family(limit, X, True) == shape[0] * positions
    assert _largest_family(limit, X, False) == shape[0] * positions * 3 ** (len(shape) - 2)


class _SquashedReadout(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, width)
        self.readout = nn.Linear(width, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.readout(torch.relu(self.hidden(x))))


def test_outputs_nonlinear_in_the_readout_are_not_gaussian():
    """tanh of a Gaussian readout is not Gaussian (and tanh'' vanishes at 0, so a value test would miss it)."""
    X = _inputs(3, d_in=3)
    limit = tpl.derive(_SquashedReadout, optimizer="sgd", param="NTP", example_inputs=(X.float(),))
    with pytest.raises(NotGaussian, match="nonlinear function of the averages"):
        limit.kernel(X, path="exact")


class _Residual(nn.Module):
    """h + W tanh(h): the residual sum of two independent Gaussians (quadrature inside), relu, a readout."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Linear(3, width)
        self.block = nn.Linear(width, width)
        self.readout = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.readout(torch.relu(h + self.block(torch.tanh(h))))


def test_residual_block_exact_path_agrees_with_monte_carlo():
    X = _inputs(3, d_in=3)
    limit = tpl.derive(_Residual, optimizer="sgd", param="NTP", example_inputs=(X.float(),))
    for kind in ("nngp", "ntk"):
        exact = limit.kernel(X, kind=kind)
        assert exact.path == "exact"
        mc = limit.kernel(X, kind=kind, path="monte carlo", particles=2**13, batches=16)
        z = ((mc.value - exact.value) / mc.se).abs()
        assert z.max() < 3.0, (kind, z)


class _Square(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def test_a_product_of_a_vector_with_itself_is_not_taken_as_linear():
    """``x * x`` (``mul`` is declared multilinear) was evaluated as if affine in x: the exact NNGP of
    Linear → x·x → Linear came out wrong with no error. With x ~ N(0, K) the closed form is
    E[x_a² x_b²] = K_aa K_bb + 2 K_ab² (Isserlis), K = X Xᵀ / d_in under NTP."""
    def make(width: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(4, width, bias=False), _Square(),
                                   torch.nn.Linear(width, 1, bias=False))
    X = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    limit = tpl.derive(make, optimizer="sgd", param="NTP", example_inputs=(X,))
    kernel = limit.kernel(X, kind="nngp", path="exact")
    K = X @ X.T / 4
    closed = K.diag()[:, None] * K.diag()[None, :] + 2 * K**2
    assert kernel.path == "exact"
    torch.testing.assert_close(kernel.value, closed, rtol=1e-10, atol=1e-12)


class _NormedMLP(nn.Module):
    """Linear → LayerNorm (or RMSNorm) → relu, twice, and a linear readout; the norms' gains (init 1) and
    biases (init 0) trained."""

    def __init__(self, width: int, d_in: int = 4, rms: bool = False, gain: float = 1.0) -> None:
        super().__init__()
        self.inp, self.hidden = nn.Linear(d_in, width), nn.Linear(width, width)
        self.norms = nn.ModuleList(nn.RMSNorm(width, eps=1e-5) if rms else nn.LayerNorm(width) for _ in range(2))
        for norm in self.norms:
            nn.init.constant_(norm.weight, gain)
        self.readout = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norms[0](self.inp(x)))
        return self.readout(torch.relu(self.norms[1](self.hidden(h))))


def _normed_mlp(X: torch.Tensor, rms: bool, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """NNGP and NTK of :class:`_NormedMLP` under NTP. A pre-activation h ~ N(0, S) has coordinate mean 0 and
    variance S_aa in the limit, so the norm is h_a / √(S_aa + eps) (the statistics' own fluctuations and
    tangents are O(n^-1/2)); its output z = y·w + β with w = 1, β = 0 trained adds to the tangent of relu(z)
    the bias's E[relu'relu'] and the gain's E[relu'(z) z relu'(z') z'] = E[relu(z) relu(z')] (the gain's
    tangent y δw has the coefficient y = z, correlated with the argument of relu)."""
    S, T = X @ X.T / X.shape[1] + 1, X @ X.T + 1
    for layer in range(2):
        scale = (S.diagonal() + eps).sqrt()
        Sy, Ty = S / torch.outer(scale, scale), T / torch.outer(scale, scale)
        K, dK = _relu_duals(Sy)
        T_relu = dK * (Ty + (0.0 if rms else 1.0)) + K
        if layer == 0:
            S, T = K + 1, K + 1 + T_relu
    return K, K + T_relu


@pytest.mark.parametrize("rms", [False, True])
def test_normalized_mlp_matches_its_recursion(rms):
    X = _inputs(5)
    limit = tpl.derive(lambda width: _NormedMLP(width, rms=rms), optimizer="sgd", param="NTP", example_inputs=(X,))
    nngp, ntk = _normed_mlp(X, rms)
    for kind, expected in (("nngp", nngp), ("ntk", ntk)):
        K = limit.kernel(X, kind=kind, path="exact")
        assert (K.value - expected).abs().max() < 1e-10, (kind, (K.value - expected).abs().max())


def test_layer_norm_exact_path_agrees_with_monte_carlo():
    X = _inputs(4)
    limit = tpl.derive(_NormedMLP, optimizer="sgd", param="NTP", example_inputs=(X,))
    for kind in ("nngp", "ntk"):
        exact = limit.kernel(X, kind=kind, path="exact")
        mc = limit.kernel(X, kind=kind, path="monte carlo", particles=2**13, batches=16)
        z = ((mc.value - exact.value) / mc.se).abs()
        assert z.max() < 3.0, (kind, z)


def test_a_gain_other_than_one_before_a_nonlinearity_is_refused():
    """The gain's tangent y·δw has the coefficient y = (z − β)/w, not z itself, when w ≠ 1: its Gram through
    relu is not computed, and the exact path says so (auto takes Monte Carlo); the NNGP needs no tangent."""
    X = _inputs(3)
    limit = tpl.derive(lambda width: _NormedMLP(width, gain=2.0), optimizer="sgd", param="NTP", example_inputs=(X,))
    assert limit.kernel(X, kind="nngp", path="exact").path == "exact"
    with pytest.raises(NotGaussian, match="random coefficient"):
        limit.kernel(X, kind="ntk", path="exact")


class _MeanInOutput(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp, self.readout = nn.Linear(3, width), nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.readout(h) + h.mean(-1, keepdim=True)


def test_an_average_that_reaches_the_outputs_is_refused():
    """The mean over width of relu(h) tends to a number, but its tangent (O(1) under NTP) is not carried: the
    exact path refuses rather than leave it out."""
    X = _inputs(3, d_in=3)
    limit = tpl.derive(_MeanInOutput, optimizer="sgd", param="NTP", example_inputs=(X,))
    with pytest.raises(NotGaussian, match="not a readout"):
        limit.kernel(X, path="exact")
