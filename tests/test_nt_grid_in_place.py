"""The NT limit's grids updated in place, tile by tile (``GridDynamics(in_place=True)``, the default), against the
pure rule on whole grids (``in_place=False``: the path before, each rule's ``update`` through ``apply_rule``) on
the same particle system: outputs, accumulated updates and rule states equal to 1e-12 relative, for several rules,
weight decay, a matrix used twice, a convolution's offsets (tiles strided along the grid) and copies fewer than the
particles. Normalized updates take the whole grid in both and agree exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tplimits as tpl
from tplimits.limit.nt import GridDynamics, TangentSystem


class Twice(nn.Module):
    """One hidden matrix used twice (two gradient terms of the same grid)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(3, width), nn.Linear(width, width), nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.hidden(h)))


class SmallCNN(nn.Module):
    """Two 3×3 convolutions: the hidden one's grid has 9 offsets ahead of its rows (``F = 9``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3)))


def _mlp(optimizer: str, param: str = "NTP", **options) -> tuple[tpl.Limit, torch.Tensor]:
    X = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    return tpl.derive("mlp", optimizer=optimizer, param=param, depth=2, d_in=3, activation="tanh", **options), X


def _model(arch: type[nn.Module], X: torch.Tensor, optimizer: str) -> tuple[tpl.Limit, torch.Tensor]:
    return tpl.derive(arch, optimizer=optimizer, param="NTP", example_inputs=(X,)), X


CASES = {
    "adam": lambda: _mlp("adam"),
    "adam, eps 0": lambda: _mlp("adam", optimizer_options={"eps": 0.0}),
    "adamw (weight decay)": lambda: _mlp("adamw", weight_decay=0.05),
    "momentum, nesterov": lambda: _mlp("momentum", optimizer_options={"nesterov": True}),
    "signsgd": lambda: _mlp("signsgd"),
    "lion": lambda: _mlp("lion"),
    "rmsprop": lambda: _mlp("rmsprop"),
    "adagrad": lambda: _mlp("adagrad"),
    "adamax": lambda: _mlp("adamax"),
    "adam, a matrix used twice": lambda: _model(Twice, torch.randn(4, 3, generator=torch.Generator().manual_seed(0)),
                                                "adam"),
    "adam, convolution": lambda: _model(SmallCNN, torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0)),
                                        "adam"),
}


def _run(limit: tpl.Limit, X: torch.Tensor, in_place: bool, tile: int | None, particles: int = 256, copies: int = 96,
         steps: int = 4) -> tuple[GridDynamics, list[torch.Tensor], bool]:
    """One system (seed 0) trained ``steps`` steps on mse against fixed targets, the error signal fed back
    (``copies < particles``: the grids' columns are a subset). Also whether every grid is still the tensor it
    started as (updated where it lies)."""
    system = TangentSystem(limit.setup(X), particles, 0, torch.float64, torch.device("cpu"), "stein", 0.05, steps)
    tangents = system.tangents(X)
    dynamics = GridDynamics(system, tangents, copies, in_place=in_place)
    dynamics.tile = tile
    storage = {name: dynamics.displacement[name].data_ptr() for name in tangents.matrices}
    y = torch.randn(tangents.outputs.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows, loss = torch.arange(y.shape[0]), tpl.loss("mse")
    outputs, f = [], tangents.outputs
    for _ in range(steps):
        f = tangents.outputs + dynamics.step(loss.error_signal(f, y, rows)).reshape(y.shape)
        outputs.append(f)
    kept = all(dynamics.displacement[name].data_ptr() == ptr for name, ptr in storage.items())
    return dynamics, outputs, kept


def _close(new: torch.Tensor, old: torch.Tensor) -> None:
    """Equal to 1e-12 of the old tensor's largest entry."""
    torch.testing.assert_close(new, old, rtol=1e-12, atol=1e-12 * float(old.abs().max()))


def _assert_same_dynamics(new: GridDynamics, new_outputs: list[torch.Tensor], old: GridDynamics,
                          old_outputs: list[torch.Tensor]) -> None:
    for f_new, f_old in zip(new_outputs, old_outputs, strict=True):
        _close(f_new, f_old)
    assert (old_outputs[-1] - old_outputs[0]).abs().max() > 1e-3  # the outputs moved
    for name, value in old.displacement.items():
        _close(new.displacement[name], value)
        assert new.states[name]["step"] == old.states[name]["step"] == len(old_outputs)
        for key, state in old.states[name]["q_state"].items():
            _close(new.states[name]["q_state"][key], state)


@pytest.mark.parametrize("case", sorted(CASES))
def test_grids_in_place_equal_the_pure_rule_on_whole_grids(case):
    limit, X = CASES[case]()
    old, old_outputs, old_kept = _run(limit, X, in_place=False, tile=None)
    new, new_outputs, new_kept = _run(limit, X, in_place=True, tile=5000)
    assert new_kept and not old_kept  # the in-place path ran, and the reference did not
    assert all(new.displacement[name].numel() > 3 * 5000 for name in new.tangents.matrices)  # several tiles
    _assert_same_dynamics(new, new_outputs, old, old_outputs)


def test_normalized_updates_take_the_whole_grid_in_both():
    """NTP-normalized SGD: the norm is the whole update's, so the in-place dynamics fall back to the pure rule."""
    limit, X = _mlp("sgd", param="NTP-normalized")
    old, old_outputs, _ = _run(limit, X, in_place=False, tile=None)
    new, new_outputs, new_kept = _run(limit, X, in_place=True, tile=5000)
    assert not new_kept
    for f_new, f_old in zip(new_outputs, old_outputs, strict=True):
        assert torch.equal(f_new, f_old)
    assert (old_outputs[-1] - old_outputs[0]).abs().max() > 1e-3
