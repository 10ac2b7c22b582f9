"""Which new directions a hat family keeps (``HatFamily._kept``).

Under Stein dots every direction kept adds its own noise, of second moment about ``E[δ²]/P``, to every later dot
through that matrix, a bias downstream that grows with the directions (docs/limit.md, "Which directions a hat
keeps"); a direction carrying less than ``STEIN_SHARE / P`` of its ket's energy is therefore left out, hat and
dot alike. Expected values: the directions a ket of known residual shares adds, and, where directions are left
out, updates equal to the same system's with explicit factors.
"""

from __future__ import annotations

import torch

from tests.test_low_rank_coordinates import _run
from tplimits.limit.kets import STEIN_PARTICLES_PER_DIRECTION, HatFamily


def _family(particles: int, autograd: bool = False) -> HatFamily:
    family = HatFamily(1, particles, particles, torch.Generator().manual_seed(0), torch.float64,
                       torch.device("cpu"), autograd)
    family.remembers = True
    return family


def _ket_and_residuals(particles: int, shares: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A ket of 4 orthonormal components, and the same ket with one new orthogonal direction per share added to
    its first components, each carrying that share of the new ket's energy."""
    g = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(particles, 4 + len(shares), generator=g, dtype=torch.float64)).Q
    x = q[:, :4].clone()
    moved = x.clone()
    for k, share in enumerate(shares):
        moved[:, k] += (4 * share / (1 - sum(shares))) ** 0.5 * q[:, 4 + k]
    return x[None], moved[None]


def test_directions_below_their_stein_noise_are_left_out_and_the_ket_is_not_taken_as_spanned():
    particles = 4096
    small, large = 0.2 * HatFamily.STEIN_SHARE / particles, 5 * HatFamily.STEIN_SHARE / particles
    x, moved = _ket_and_residuals(particles, (small, large))
    family = _family(particles)
    family.sample(x)
    assert family.basis.cat().shape[-1] == 4 and family.coordinates(x) is not None
    family.sample(moved)
    assert family.basis.cat().shape[-1] == 5  # the large direction only
    assert family.left_out == 1
    assert family.coordinates(moved) is None  # its coordinates on the basis would miss the small direction
    residual = moved[0] - family.basis.cat()[0] @ (family.basis.cat()[0].T @ moved[0])
    assert abs(float(residual.square().sum() / moved.square().sum()) - small) < 1e-3 * small


def test_every_direction_above_rounding_is_kept_under_autograd_dots_or_with_few_particles():
    particles = 4096
    small = 0.2 * HatFamily.STEIN_SHARE / particles
    x, moved = _ket_and_residuals(particles, (small,))
    family = _family(particles, autograd=True)
    family.sample(x)
    family.sample(moved)
    assert family.basis.cat().shape[-1] == 5 and family.left_out == 0
    few = STEIN_PARTICLES_PER_DIRECTION * 4 - 1  # fewer than the Stein dots' warning asks for 4 components
    x, moved = _ket_and_residuals(few, (0.2 * HatFamily.STEIN_SHARE / few,))
    family = _family(few)
    family.sample(x)
    family.sample(moved)
    assert family.basis.cat().shape[-1] == 5 and family.left_out == 0
    assert family.coordinates(moved) is not None


def test_updates_stay_exact_where_directions_are_left_out():
    """The default rule on a system of 512 particles (4 components: the rule applies): directions are left
    out (at this size at every step), those kets' factors stay explicit columns, and the run equals the one with
    every factor explicit."""
    outputs, net = _run("mlp", "sgd", explicit=False)
    explicit, _ = _run("mlp", "sgd", explicit=True)
    assert sum(f.left_out for op in net.operators.values() for f in op.families.values()) > 0
    for got, ref in zip(outputs, explicit, strict=True):
        assert float((got - ref).abs().max()) <= 1e-10 * float(ref.abs().max())
