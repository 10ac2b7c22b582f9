"""``derive(...).train(...)``: schedules, test points, kernels, determinism, checkpoints, options and errors."""

from __future__ import annotations

import pytest
import torch

import tplimits as tpl
from tests.conftest import particle_steps
from tplimits.limit import mu as engine
from tplimits.limit.kets import MatrixOperator
from tplimits.limit.mu import ParticleNetwork
from tplimits.limit.runs import batch_schedule, default_dtype
from tplimits.training.init import multiplier


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)


def test_batch_schedule_covers_each_epoch():
    schedule = batch_schedule(5, 2, 6, seed=0)
    assert [len(b) for b in schedule] == [2, 2, 1, 2, 2, 1]
    assert sorted(torch.cat(schedule[:3]).tolist()) == list(range(5))
    assert all(len(b) == 5 for b in batch_schedule(5, None, 3, seed=0))


def test_deterministic_under_seed_and_loss_recorded(data):
    X, y = data
    limit = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=3)
    a = limit.train(X, y, steps=3, lr=0.5, particles=1024, seed=5, progress=False)
    b = limit.train(X, y, steps=3, lr=0.5, particles=1024, seed=5, progress=False)
    c = limit.train(X, y, steps=3, lr=0.5, particles=1024, seed=6, progress=False)
    assert torch.equal(a.outputs, b.outputs)
    assert not torch.equal(a.outputs, c.outputs)
    expected = torch.stack([torch.nn.functional.mse_loss(o, y) for o in a.outputs])
    torch.testing.assert_close(a.loss, expected)
    assert a.outputs.shape == (4, 4, 1) and a.loss_se.shape == (4,)
    # check trains the limit under its seed too (it used to pass seed twice to train: a TypeError)
    report = limit.check(X, y, widths=[16, 32], seeds=2, steps=3, lr=0.5, particles=1024, seed=6, progress=False)
    assert torch.equal(report.limit.outputs, c.outputs)


def test_test_points_carry_no_error_signal(data):
    """A test point equal to a training point follows it exactly (same hats, zero error signal of its own)."""
    X, y = data
    limit = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=3)
    traj = limit.train(X, y, steps=3, lr=0.5, particles=1024, X_test=X[:1], progress=False)
    torch.testing.assert_close(traj.test_outputs[:, 0], traj.outputs[:, 0], rtol=1e-9, atol=1e-12)
    assert (traj.outputs[-1, 0] - traj.outputs[0, 0]).abs() > 0.05


def test_kernel_of_the_first_layer_matches_closed_form(data):
    X, y = data
    limit = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=3, bias=False)
    program = limit.family(X).program
    first = next(ins.name for ins in program.instructions if ins.kind == "vector" and ins.name.startswith("linear"))
    traj = limit.train(X, y, steps=1, lr=0.5, particles=2**14, kernels=[first], progress=False)
    expected = X @ X.T / X.shape[1]  # u ~ N(0, 1/d) per coordinate
    z = (traj.kernels[first][0] - expected).abs() / traj.kernels_se[first][0].clamp_min(1e-12)
    assert z.max() < 4


def test_setup_takes_floating_inputs_in_the_models_dtype(data):
    """``limit.train`` lowers the model for its data in the default dtype; ``setup`` and ``family`` called
    directly with float64 data under a float32 default do the same (they failed tracing a float32 model on
    float64 inputs, with a hint about inputs that grow with width)."""
    X, _ = data
    with default_dtype(torch.float32):
        limit = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=3)
        assert limit.setup(X.double()) is limit.setup(X.float())
        assert limit.family(X.double()).inputs[0].dtype == torch.float32


def test_resume_continues_exactly(data):
    X, y = data
    setup = tpl.derive("mlp", optimizer="adam", depth=2, d_in=3).setup(X)
    a = ParticleNetwork(setup, 256, 0, torch.float64, "cpu", "stein", 0.02, 4)
    particle_steps(a, X, y, 2)
    saved = a.state_dict()
    b = ParticleNetwork(setup, 256, 99, torch.float64, "cpu", "stein", 0.02, 4)
    b.load_state_dict(saved)
    for out_a, out_b in zip(particle_steps(a, X, y, 2), particle_steps(b, X, y, 2), strict=True):
        assert torch.equal(out_a, out_b)


def test_dense_grid_updated_in_tiles_follows_torch_adamw(data, monkeypatch):
    """The dense grid of Q values, updated in row tiles in place (3 rows per tile, uneven last tile), is
    exactly ``torch.optim.AdamW`` run on the whole grid with the same gradients."""
    X, y = data
    setup = tpl.derive("mlp", optimizer="adamw", weight_decay=0.1, depth=3, d_in=3).setup(X)
    monkeypatch.setattr(engine, "DENSE_TILE_ENTRIES", 1000)
    gradients: dict[str, list[torch.Tensor]] = {}
    tiled_gradient = MatrixOperator.dense_gradient

    def record(operator, terms, rows=slice(None)):
        if rows.start in (None, 0):  # once per step: the whole gradient
            gradients.setdefault(operator.name, []).append(tiled_gradient(operator, terms).clone())
        return tiled_gradient(operator, terms, rows)

    monkeypatch.setattr(MatrixOperator, "dense_gradient", record)
    P = 256
    net = ParticleNetwork(setup, P, 0, torch.float64, "cpu", "stein", 0.02, 4)
    outs = particle_steps(net, X, y, 4)
    assert len(gradients) == 2 and all(len(g) == 4 for g in gradients.values())
    for name, grads in gradients.items():
        group = net.groups[name]
        lr = group["lr"] * group["lr_scale"]
        weight = multiplier(setup.chosen[name], P) / P * group["grad_scale"]
        grid = torch.zeros_like(grads[0], requires_grad=True)
        reference = torch.optim.AdamW([grid], lr=lr, betas=net.hyper["betas"], eps=net.hyper["eps"],
                                      weight_decay=group["weight_decay"] / lr)
        for g in grads:
            grid.grad = g * weight
            reference.step()
        assert grid.abs().max() > 0
        torch.testing.assert_close(net.operators[name].dense, grid.detach(), rtol=1e-10, atol=1e-13)
    assert (outs[-1] - outs[0]).abs().max() > 0.02  # the grid moved the outputs


def test_checkpoint_file_resumes(tmp_path, data):
    X, y = data
    limit = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=3)
    path = str(tmp_path / "run.pt")
    first = limit.train(X, y, steps=4, lr=0.5, particles=1024, dots="stein", checkpoint=path, checkpoint_every=2,
                        progress=False)
    again = limit.train(X, y, steps=4, lr=0.5, particles=1024, dots="stein", checkpoint=path, progress=False)
    assert torch.equal(first.outputs, again.outputs)
    with pytest.raises(tpl.TplimitsError, match="another run"):
        limit.train(X, y, steps=5, lr=0.5, particles=1024, dots="stein", checkpoint=path, progress=False)
    with pytest.raises(tpl.TplimitsError, match="stein"):
        limit.train(X, y, steps=4, lr=0.5, particles=1024, dots="autograd", checkpoint=path, progress=False)


@pytest.mark.parametrize("options", [
    dict(optimizer="sgd", batch_size=2),
    dict(optimizer="sgd", weight_decay=0.1),
    dict(optimizer="momentum"),
    dict(optimizer="adamw", weight_decay=0.1),
    dict(optimizer="signsgd", lr=0.01),
    dict(optimizer="sgd", param="muP-normalized", lr=0.3),
])
def test_options_converge_to_their_limit(data, options):
    """Minibatches with test points, weight decay (Eq. 2.51-2.53), memoryful and sign rules, normalized updates
    (Eq. 2.56-2.58): each limit against finite training."""
    X, y = data
    options = dict(options)
    lr = options.pop("lr", 0.5 if options["optimizer"] in ("sgd", "momentum") else 0.02)
    batch_size = options.pop("batch_size", None)
    limit = tpl.derive("mlp", depth=2, d_in=3, **options)
    particles = 2**15 if limit.rule.linear and limit.param.update == "plain" else 2**14
    report = limit.check(X, y, widths=[64, 256, 1024], seeds=6, steps=4, lr=lr, batch_size=batch_size,
                         X_test=torch.randn(2, 3) if batch_size else None, particles=particles, progress=False)
    assert report.passed, report.format()


def test_errors(data):
    X, y = data
    with pytest.raises(tpl.TplimitsError, match="neither the μ-limit.*nor the NT limit"):  # SP + Adam, depth 3
        tpl.derive("mlp", optimizer="adam", param="SP", d_in=3).train(X, y, steps=1, particles=256, progress=False)
    limit = tpl.derive("mlp", optimizer="sgd", d_in=3)
    with pytest.raises(tpl.TplimitsError, match="multiple of batches"):
        limit.train(X, y, steps=1, particles=1001, progress=False)
    with pytest.raises(tpl.PluginError, match="no loss named 'hinge'"):
        limit.train(X, y, steps=1, particles=256, loss="hinge", progress=False)
    with pytest.raises(tpl.TplimitsError, match="dots must be one of"):
        limit.train(X, y, steps=1, particles=256, dots="exact", progress=False)
    with pytest.raises(TypeError, match="no hyperparameter"):
        tpl.derive("mlp", optimizer="adam", optimizer_options={"beta": 0.9})
