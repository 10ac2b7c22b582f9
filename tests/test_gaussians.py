"""The hat kets' Gaussian draws (tplimits.limit.gaussians) against torch.randn, their reference."""

import pytest
import torch

from tplimits.limit.gaussians import standard_normal


@pytest.mark.parametrize("shape", [(1, 16384, 16), (3, 100, 7), (5, 5), (2, 8), (9, 40, 37), (3, 5)])
def test_same_numbers_and_generator_state_as_randn(shape):
    ours, theirs = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    got = standard_normal(shape, ours, torch.float64, torch.device("cpu"))
    want = torch.randn(shape, generator=theirs, dtype=torch.float64)
    assert got.shape == want.shape and got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=4 * torch.finfo(torch.float64).eps, atol=0)
    assert torch.equal(ours.get_state(), theirs.get_state())  # the next draw is randn's next draw too


def test_float32_is_randn():
    ours, theirs = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    got = standard_normal((4, 33), ours, torch.float32, torch.device("cpu"))
    assert torch.equal(got, torch.randn(4, 33, generator=theirs, dtype=torch.float32))


def test_law_of_a_large_draw():
    z = standard_normal((2 ** 20,), torch.Generator().manual_seed(0), torch.float64, torch.device("cpu"))
    se = 2 ** -10
    assert abs(float(z.mean())) < 4 * se
    assert abs(float(z.var()) - 1) < 4 * se * 2 ** 0.5
    assert abs(float((z > 1.959963984540054).double().mean()) - 0.025) < 4 * (0.025 * 0.975) ** 0.5 * se
