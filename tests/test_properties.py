"""Property tests: random bad (and valid) arguments thrown at every public function. Each call either
succeeds with finite results or raises a ``TplimitsError`` subclass — never another exception type,
never a non-finite result without an error (issue 11, "make the class impossible").

Bounded for CI: 25 examples per function, no shrinking, tiny models (depth 1, widths 4–16, 64–128
particles, 0–2 steps). Every argument is drawn from its valid values, then up to two of them are
replaced by values from a pool of bad ones (``BAD``), so that bad arguments meet otherwise working
calls and about a third of the calls are valid ones that must return finite numbers. When this suite
finds a bug, the fix belongs at the public entry point's validation, with a regression test naming
the argument in tests/test_bad_input.py.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import tplimits as tpl
from tplimits.cli import main
from tplimits.core.program import Program
from tplimits.limit.check import CheckReport
from tplimits.limit.limit import Trajectory
from tplimits.training.coordcheck import CoordCheckReport

# no shrinking: each example lowers a model, and the first failing example is readable as it is
# (TPLIMITS_PROPERTY_EXAMPLES raises the count for a longer hunt; CI runs the default)
SETTINGS = settings(max_examples=int(os.environ.get("TPLIMITS_PROPERTY_EXAMPLES", "25")), deadline=None,
                    derandomize=True, database=None, phases=[Phase.generate],
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

D_IN = 3
X = torch.randn(4, D_IN, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = torch.randn(4, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

# values no argument of tplimits accepts in the place they are drawn for (or only some of them)
BAD = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([2**40, -(2**40)]),
    st.floats(allow_nan=True, allow_infinity=True, width=64), st.text(max_size=4),
    st.sampled_from(["nope", "mlp", "muP", "sgd", "mse", "UP_abc", "UP_0.5", "cpu", "float16"]),
    st.lists(st.integers(-2, 16), max_size=3), st.just(()), st.just({}), st.just({"nope": 1}),
    st.just(object()), st.just(torch.tensor(float("nan"))), st.just(torch.zeros(0)), st.just(torch.float16),
    st.just(torch.int64), st.just(torch.randn(2, 5)), st.just(lambda *a: None),
)


def _strategy(valid):
    return valid if isinstance(valid, st.SearchStrategy) else st.just(valid)


@st.composite
def arguments(draw, valid: dict, max_bad: int = 2) -> dict:
    """Keyword arguments: each drawn from its valid values, then up to ``max_bad`` of them (chosen at
    random) replaced by a bad value, so that bad arguments meet otherwise working calls."""
    kwargs = {key: draw(_strategy(v)) for key, v in valid.items()}
    for key in draw(st.lists(st.sampled_from(sorted(valid)), max_size=max_bad, unique=True)):
        kwargs[key] = draw(BAD)
    return kwargs


def call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or None when it raised a named error; any other exception propagates."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    except tpl.TplimitsError:
        return None


def assert_finite(result) -> None:
    """No non-finite number in a returned result (standard errors may be NaN: 'none exists')."""
    if isinstance(result, torch.Tensor):
        if result.is_floating_point():
            assert torch.isfinite(result).all(), result
    elif isinstance(result, Trajectory):
        for t in (result.outputs, result.loss, result.test_outputs, *result.kernels.values()):
            if t is not None:
                assert_finite(t)
    elif isinstance(result, CheckReport):
        for t in (result.gap, result.mean_gap, result.finite_mean):
            assert_finite(t)
        assert math.isfinite(result.slope)
    elif isinstance(result, tuple):
        for r in result:
            assert_finite(r)


LIMIT = tpl.derive("mlp", optimizer="sgd", depth=1, d_in=D_IN)  # lowered once, at its first use
NT_LIMIT = tpl.derive("mlp", param="NTP", optimizer="sgd", depth=1, d_in=D_IN)


ARCH = st.sampled_from(["mlp", "nope", "", 3, None, torch.nn.Linear(3, 4), lambda width: torch.nn.Linear(D_IN, width),
                        lambda width: width, lambda width: torch.nn.Sequential(torch.nn.Linear(D_IN, width),
                                                                               torch.nn.Tanh(),
                                                                               torch.nn.Linear(width, 1))])
SOME_ARCH = st.one_of(st.just("mlp"), ARCH)  # mostly a model that lowers
MLP = {"depth": st.integers(1, 2), "d_out": st.integers(1, 2), "activation": st.sampled_from(["tanh", "relu", "gelu"])}


def _setup(arch, config: dict) -> tuple:
    """(example inputs, options) for ``arch``: the MLP's options, or example inputs for the others."""
    return (None, {"d_in": D_IN, **config}) if arch == "mlp" else ((X,), {})


@SETTINGS
@given(arch=ARCH, inputs=st.sampled_from([None, (X,), X, (torch.randn(2, 5),), ("x",), ()]),
       base=st.sampled_from([None, torch.nn.Linear(D_IN, 8), torch.nn.Linear(D_IN, 4), 3]),
       config=arguments({**MLP, "width": st.sampled_from([8, 16])}))
def test_lower(arch, inputs, base, config):
    program = call(tpl.lower, arch, inputs, base, **config)
    assert program is None or isinstance(program, Program)


@SETTINGS
@given(arch=SOME_ARCH, kwargs=arguments({"param": st.sampled_from(["muP", "SP", "UP_0.5"]),
                                    "optimizer": st.sampled_from(["sgd", "adam"])}),
       config=arguments(MLP, max_bad=1))
def test_classify(arch, kwargs, config):
    inputs, config = _setup(arch, config)
    call(tpl.classify, arch, example_inputs=inputs, **kwargs, **config)


@SETTINGS
@given(arch=SOME_ARCH, kwargs=arguments({"width": st.sampled_from([8, 16]), "param": "muP", "lr": 0.1,
                                    "optimizer": st.sampled_from(["sgd", "adam"]), "seed": st.integers(0, 3),
                                    "weight_decay": 0.0, "clip": st.sampled_from([None, 1.0]),
                                    "optimizer_options": None, "center": st.booleans(), "update_rules": None}),
       config=arguments(MLP, max_bad=1))
def test_instantiate(arch, kwargs, config):
    inputs, config = _setup(arch, config)
    made = call(tpl.instantiate, arch, example_inputs=inputs, **kwargs, **config)
    if made is not None:
        model, opt = made
        model(X).square().mean().backward()
        opt.step()
        assert_finite(model(X).detach())


@SETTINGS
@given(rule=st.sampled_from(["sgd", "adam", "signsgd", "nope", 3]), params_ok=st.integers(0, 3).map(bool),
       kwargs=arguments({"lr": 0.1}, max_bad=1), data=st.data())
def test_make_optimizer(rule, params_ok, kwargs, data):
    options = {"weight_decay": 0.01, "momentum": 0.5, "betas": (0.9, 0.99), "eps": 1e-8, "clip": 1.0, "nope": 1}
    chosen = data.draw(st.lists(st.sampled_from(sorted(options)), max_size=2, unique=True))
    kwargs.update({key: data.draw(st.one_of(st.just(options[key]), BAD)) for key in chosen})
    layer = torch.nn.Linear(D_IN, 2)
    params = layer.parameters() if params_ok else data.draw(BAD)
    opt = call(tpl.make_optimizer, rule, params, **kwargs)
    if opt is not None:
        layer(X).square().mean().backward()
        call(opt.step)
        assert_finite(layer.weight.detach())


@SETTINGS
@given(arch=SOME_ARCH,
       kwargs=arguments({"param": "muP", "optimizer": st.sampled_from(["sgd", "adam"]), "weight_decay": 0.0,
                         "clip": st.sampled_from([None, 1.0]), "optimizer_options": st.sampled_from([None, {}]),
                         "update_rules": None}),
       config=arguments(MLP, max_bad=1))
def test_derive(arch, kwargs, config):
    inputs, config = _setup(arch, config)
    limit = call(tpl.derive, arch, example_inputs=inputs, **kwargs, **config)
    if limit is not None:  # what derive stored must work, or be refused by name when it is used
        assert_finite(call(limit.train, X, Y, steps=1, lr=0.1, particles=64, batches=2, progress=False))


TRAIN = {
    "X": st.sampled_from([X, X.float(), X.tolist()]),
    "y": st.sampled_from([Y, Y.float(), Y.tolist(), Y[:3], Y.squeeze(1), torch.tensor([0, 1, 0, 1])]),
    "steps": st.integers(0, 2), "lr": st.sampled_from([0.0, 0.1, 0.5]),
    "loss": st.sampled_from(["mse", "cross_entropy", lambda out, y: (out - y).square().mean()]),
    "batch_size": st.sampled_from([None, 1, 2, 4, 9]), "X_test": st.sampled_from([None, X[:2]]),
    "particles": st.sampled_from([64, 128]), "seed": st.integers(0, 3), "device": "cpu",
    "dtype": st.sampled_from([torch.float32, torch.float64]), "batches": st.sampled_from([1, 2, 4]),
    "dots": st.sampled_from(["auto", "stein", "autograd"]), "kernels": st.sampled_from([(), ("nope",)]),
    "checkpoint_every": st.integers(1, 3), "checkpoint": None, "center": st.booleans(),
}


@SETTINGS
@given(kwargs=arguments(TRAIN))
def test_train(kwargs):
    assert_finite(call(LIMIT.train, progress=False, **kwargs))


@SETTINGS
@given(kwargs=arguments({
    "X": X, "y": Y, "widths": st.sampled_from([(8, 16), (16, 8), (4, 8, 16)]), "seeds": st.integers(2, 3),
    "steps": st.integers(0, 2), "lr": st.sampled_from([0.0, 0.1]), "loss": "mse", "dtype": torch.float64,
    "max_slope": -0.4, "tolerance": 3.0, "trajectory": None, "batch_size": st.sampled_from([None, 2]),
    "X_test": st.sampled_from([None, X[:2]]), "particles": 64, "center": st.booleans(),
}))
def test_check(kwargs):
    report = call(LIMIT.check, progress=False, **kwargs)
    assert report is None or isinstance(report, CheckReport)
    assert_finite(report)


@SETTINGS
@given(kwargs=arguments({"X": X, "kind": st.sampled_from(["ntk", "nngp"]), "X2": st.sampled_from([None, X[:2]]),
                         "particles": st.sampled_from([64, 128]), "batches": st.sampled_from([2, 4]),
                         "seed": st.integers(0, 2), "dtype": st.sampled_from([torch.float32, torch.float64]),
                         "device": "cpu", "dots": st.sampled_from(["auto", "stein"])}),
       limit=st.sampled_from([NT_LIMIT, NT_LIMIT, LIMIT]))
def test_kernel(kwargs, limit):
    kernel = call(limit.kernel, **kwargs)
    if kernel is not None:
        assert_finite(kernel.value)


@SETTINGS
@given(arch=SOME_ARCH, kwargs=arguments({
    "params": st.sampled_from([("SP", "muP"), ("muP",)]), "optimizer": "sgd", "loss": "mse",
    "widths": st.sampled_from([(8, 16), (16, 8)]), "steps": st.integers(1, 2), "lr": 0.1, "seeds": st.integers(1, 2),
    "tolerance": 0.1}))
def test_coord_check(arch, kwargs):
    inputs, config = _setup(arch, {})
    report = call(tpl.coord_check, arch, example_inputs=inputs, **kwargs, **config)
    assert report is None or isinstance(report, CoordCheckReport)


# the CLI: a small working command, then random options (each value a valid or a bad one) after it
TOKENS = st.sampled_from(["1", "2", "0", "-1", "2.5", "nan", "inf", "x", "", "--", "-o", "depth=0", "depth=1",
                          "activation=tanhh", "mse", "sgd", "adam", "8", "16", "64", "muP", "SP", "--bogus"])
CLI_OPTIONS = {
    "check": ["--optimizer", "--lr", "--loss", "--depth", "--activation", "--examples", "--steps", "--widths",
              "--seeds", "--particles", "-o"],
    "coordcheck": ["--param", "--optimizer", "--lr", "--widths", "--steps", "--seeds", "-o", "--dtype"],
    "inspect": ["-o", "--width", "--origins", "--dtype", "--inputs"],
}
BASE = {
    "check": ["--examples", "4", "--steps", "1", "--widths", "8", "16", "--seeds", "2", "--particles", "64", "--plot",
              "", "--quiet", "--depth", "1"],
    "coordcheck": ["mlp", "--widths", "8", "16", "--steps", "1", "--seeds", "1", "-o", "d_in=3"],
    "inspect": ["mlp", "-o", "depth=1"],
}


@st.composite
def argv(draw):
    command = draw(st.sampled_from(sorted(CLI_OPTIONS)))
    extra = draw(st.lists(st.tuples(st.sampled_from(CLI_OPTIONS[command]), TOKENS), max_size=3))
    words = [w for pair in extra for w in pair]
    return draw(st.sampled_from([[command, *BASE[command], *words], [*words, command, *BASE[command]]]))


@SETTINGS
@given(args=argv())
def test_cli(args, capsys):
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's --help
        code = exit_.code
    err = capsys.readouterr().err
    assert code in (0, 1, 2)
    if code == 2:
        assert "Traceback" not in err and err.strip().startswith("tplimits: error:"), err
