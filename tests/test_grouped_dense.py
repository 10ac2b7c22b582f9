"""Channel structures of convolutional networks whose width is the channel count: grouped convolutions with a
fixed number of groups (pytorchcv ResNeXt), GroupNorm with groups of a fixed size (their number grows with
width, like attention heads) and DenseNet's concatenation of growing channel blocks of unequal width.

Expected values come from the models: replay against the forward, the total program against autograd; the
μ-limit must run and train."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tplimits as tpl
from tests.conftest import assert_close_tree
from tests.test_backprop import _check as check_gradients


def _densenet(width: int, stages: int = 2, bottleneck: bool = False) -> nn.Module:
    """pytorchcv's CIFAR DenseNet: each unit concatenates its input (w, then 2w) with w new channels."""
    from pytorchcv.models.densenet_cifar import CIFARDenseNet

    channels = [[2 * width, 3 * width], [2 * width]][:stages]
    size = 8 * 2 ** (stages - 1)
    return CIFARDenseNet(channels=channels, init_block_channels=width, bottleneck=bottleneck, in_size=(size, size),
                         num_classes=3)


def _resnext(width: int, stages: int = 2) -> nn.Module:
    """pytorchcv's CIFAR ResNeXt: cardinality 2 (a fixed number of groups), each group 2w/2 = w channels wide."""
    from pytorchcv.models.resnext_cifar import CIFARResNeXt

    size = 8 * 2 ** (stages - 1)
    return CIFARResNeXt(channels=[[4 * width], [8 * width]][:stages], init_block_channels=width, cardinality=2,
                        bottleneck_width=64, in_size=(size, size), num_classes=3)


class _GroupNormNet(nn.Module):
    """GroupNorm with 4 channels per group (width/4 groups), and a grouped convolution with 2 groups."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.norm = nn.GroupNorm(width // 4, width)
        self.mix = nn.Conv2d(width, 2 * width, 3, groups=2, bias=False)
        self.fixed_groups = nn.GroupNorm(2, 2 * width)
        self.out = nn.Linear(2 * width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fixed_groups(self.mix(torch.relu(self.norm(self.stem(x)))))
        return self.out(torch.tanh(h).mean((2, 3)))


CASES = {
    "pytorchcv-densenet": _densenet,
    "pytorchcv-densenet-bottleneck": lambda width: _densenet(width, bottleneck=True),
    "pytorchcv-resnext": _resnext,
    "group-norm-fixed-size-groups-and-grouped-conv": _GroupNormNet,
}
NEEDS_PYTORCHCV = {"pytorchcv-densenet", "pytorchcv-densenet-bottleneck", "pytorchcv-resnext"}


def _images(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CASES)
def test_channel_structures_lower_replay_and_match_autograd(name):
    if name in NEEDS_PYTORCHCV:
        pytest.importorskip("pytorchcv")
    make, x = CASES[name], _images(16)
    prog = tpl.lower(make, example_inputs=(x,), width=8)
    for width in (8, 12):
        torch.manual_seed(width)
        model = make(width)
        assert_close_tree(prog.replay(model, x), model(x))
        check_gradients(prog, model, (x,))


LIMIT_CASES = {
    "pytorchcv-densenet": lambda width: _densenet(width, stages=1),
    "pytorchcv-resnext": lambda width: _resnext(width, stages=1),
    "group-norm-fixed-size-groups-and-grouped-conv": _GroupNormNet,
}


@pytest.mark.parametrize("name", LIMIT_CASES)
def test_channel_structures_mu_limit_runs(name):
    if name in NEEDS_PYTORCHCV:
        pytest.importorskip("pytorchcv")
    x = _images(8, seed=1)
    limit = tpl.derive(LIMIT_CASES[name], example_inputs=(x,), optimizer="sgd")
    trajectory = limit.train(x, torch.tensor([0, 2]), steps=3, lr=0.1, loss="cross_entropy", particles=2**9,
                             batches=2, progress=False)
    assert trajectory.outputs.shape == (4, 2, 3)
    assert torch.isfinite(trajectory.outputs).all() and torch.isfinite(trajectory.loss).all()
    assert trajectory.loss[-1] < trajectory.loss[0], trajectory.loss


@pytest.mark.slow
@pytest.mark.parametrize("name", LIMIT_CASES)
def test_channel_structures_mu_limit_against_training_sgd(name):
    """Expected values from finite models trained at widths 16/64/256 (4 seeds); 33-150 s each, loaded."""
    if name in NEEDS_PYTORCHCV:
        pytest.importorskip("pytorchcv")
    x = _images(8, seed=1)
    limit = tpl.derive(LIMIT_CASES[name], example_inputs=(x,), optimizer="sgd")
    report = limit.check(x, torch.tensor([0, 2]), widths=[16, 64, 256], seeds=4, steps=3, lr=0.1,
                         loss="cross_entropy", particles=2**12, progress=False)
    assert report.passed, report.format()


class _FractionalGroups(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 1)
        self.grouped = nn.Conv2d(width, 4, 1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grouped(self.stem(x)).mean((2, 3))


def test_grouped_convolution_to_fixed_channels_is_refused_by_name():
    with pytest.raises(tpl.UnsupportedOperation, match="2 groups over growing channels.*not supported yet"):
        tpl.lower(_FractionalGroups, example_inputs=(_images(4),))
