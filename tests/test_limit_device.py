"""The limits on a CUDA device (skipped where there is none): the μ-limit checked against finite-width training
on the CPU and against the CPU limit, and the NT limit's kernels and dynamics against the CPU's."""

from __future__ import annotations

import pytest
import torch

import tplimits as tpl
from tests.test_nt_limit import _data, _ntp_relu_mlp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(11)
    return torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)


@pytest.mark.parametrize("optimizer, lr, particles", [("sgd", 0.5, 2**17), ("adam", 0.02, 2**14)])
def test_gpu_limit_matches_training(data, optimizer, lr, particles):
    X, y = data
    limit = tpl.derive("mlp", optimizer=optimizer, depth=3, d_in=3)
    report = limit.check(X, y, widths=[64, 256, 1024], seeds=8, steps=4, lr=lr, particles=particles, device="cuda",
                         progress=False)
    assert report.passed, report.format()


@pytest.mark.parametrize("dtype, expected", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                             (None, torch.float64)])
def test_gpu_and_cpu_limits_agree(data, dtype, expected):
    """Independent particle systems on the two devices (float32 on the GPU too, where asked for) estimate the
    same limit. 16 systems a side: a standard error from 4 has 3 degrees of freedom, and two CPU runs of 4
    systems with seeds 0 and 1 already part by 6.0 of them at one output (RMS 2.9); with 16, six pairs of CPU
    seeds give RMS 1.14, largest 2.7."""
    X, y = data
    limit = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=3)
    options = dict(steps=5, lr=0.5, particles=2**15, batches=16, progress=False)
    cpu = limit.train(X, y, seed=0, **options)
    gpu = limit.train(X, y, seed=1, device="cuda", dtype=dtype, **options)
    assert gpu.outputs.dtype == expected
    z = (gpu.outputs.double() - cpu.outputs) / (gpu.outputs_se.double().square() + cpu.outputs_se.square()).sqrt()
    assert z.abs().max() < 4.5 and z[1:].square().mean().sqrt() < 1.8, z
    assert (cpu.outputs[-1] - cpu.outputs[0]).abs().max() > 0.1


def test_gpu_kernels_match_the_cpu_and_the_arc_cosine_recursion():
    """The NT limit's kernels on the GPU: the Monte Carlo path against the closed form of a ReLU network, and the
    exact path (Gaussian integrals through the program) against the same path on the CPU."""
    X, _ = _data(4, 5)
    limit = tpl.derive("mlp", optimizer="sgd", param="NTP", depth=2, d_in=4, activation="relu")
    nngp, ntk = _ntp_relu_mlp(X, 2, True)
    for kind, expected in (("ntk", ntk), ("nngp", nngp)):
        K = limit.kernel(X, kind=kind, particles=2**16, batches=8, path="monte carlo", device="cuda")
        assert ((K.value.cpu() - expected) / K.se.cpu()).abs().max() < 4.5
        exact = limit.kernel(X, kind=kind, path="exact", device="cuda")
        on_cpu = limit.kernel(X, kind=kind, path="exact")
        assert exact.path == on_cpu.path == "exact"
        torch.testing.assert_close(exact.value.cpu(), on_cpu.value, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("optimizer, lr, options", [("sgd", 0.5, {}), ("adam", 0.02, {"copies": 512})])
def test_gpu_and_cpu_nt_limits_agree(data, optimizer, lr, options):
    """The NT limit's dynamics on the two devices, independent systems (16 a side): kernel dynamics under SGD,
    grids against a copy population under Adam."""
    X, y = data
    limit = tpl.derive("mlp", optimizer=optimizer, param="NTP", depth=2, d_in=3)
    run = dict(steps=5, lr=lr, particles=2**14, batches=16, progress=False, **options)
    cpu = limit.train(X, y, seed=0, **run)
    gpu = limit.train(X, y, seed=1, device="cuda", **run)
    z = (gpu.outputs - cpu.outputs) / (gpu.outputs_se.square() + cpu.outputs_se.square()).sqrt()
    assert z.abs().max() < 4.5, z
    assert (cpu.outputs[-1] - cpu.outputs[0]).abs().max() > 0.05
