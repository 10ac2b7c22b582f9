"""Inputs that used to give a silent or meaningless result get a named error naming the argument
(issue cases: one width, duplicate widths, no examples, more examples than there are, every label
ignored, labels out of range, a trajectory of another run, no standard error, non-positive widths)."""

from __future__ import annotations

import pytest
import torch

import tplimits as tpl
from tplimits.cli import main


@pytest.fixture(scope="module")
def limit():
    return tpl.derive("mlp", optimizer="sgd", depth=1, d_in=3)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)


@pytest.mark.parametrize("widths, match", [([64], "two distinct widths"), ([64, 64, 128], "each once"),
                                           ([0, 64], "positive integers"), ([64.0, 128], "positive integers")])
def test_check_widths(limit, data, widths, match):
    with pytest.raises(tpl.TplimitsError, match=match):
        limit.check(*data, widths=widths, seeds=2, steps=1, particles=256, progress=False)


def test_check_shared_draws_is_a_bool(limit, data):
    with pytest.raises(tpl.TplimitsError, match="shared_draws must be True or False"):
        limit.check(*data, widths=[32, 64], seeds=2, steps=1, particles=256, progress=False, shared_draws="yes")


def test_check_seeds(limit, data):
    with pytest.raises(tpl.TplimitsError, match="seeds=1"):
        limit.check(*data, widths=[32, 64], seeds=1, steps=1, particles=256, progress=False)
    with pytest.raises(tpl.TplimitsError, match="seed must be an integer, got 'x'"):  # the limit's, checked first
        limit.check(*data, widths=[32, 64], seeds=2, steps=1, particles=256, seed="x", progress=False)


def test_coord_check_needs_two_widths():
    with pytest.raises(tpl.TplimitsError, match=r"widths=\[128\].*two distinct"):
        tpl.coord_check("mlp", widths=(128,))


def test_a_trajectory_of_another_run_is_refused(limit, data):
    X, y = data
    traj = limit.train(X, y, steps=2, lr=0.1, particles=256, progress=False)
    with pytest.raises(tpl.TplimitsError, match="another run: its lr differ"):
        limit.check(X, y, widths=[32, 64], seeds=2, steps=2, lr=0.2, trajectory=traj, progress=False)
    with pytest.raises(tpl.TplimitsError, match="another run: its X, y differ"):
        limit.check(X + 1, -y, widths=[32, 64], seeds=2, steps=2, lr=0.1, trajectory=traj, progress=False)
    with pytest.raises(tpl.TplimitsError, match="another run: its steps differ"):
        limit.check(X, y, widths=[32, 64], seeds=2, steps=3, lr=0.1, trajectory=traj, progress=False)


def test_one_system_has_no_standard_error(limit, data):
    X, y = data
    traj = limit.train(X, y, steps=1, lr=0.1, particles=256, batches=1, progress=False)
    assert torch.isnan(traj.outputs_se).all() and torch.isfinite(traj.outputs).all()
    with pytest.raises(tpl.TplimitsError, match="no standard errors"):
        limit.check(X, y, widths=[32, 64], seeds=2, steps=1, lr=0.1, trajectory=traj, progress=False)


def test_cross_entropy_labels():
    limit = tpl.derive("mlp", optimizer="sgd", depth=1, d_in=3, d_out=3)
    X = torch.randn(4, 3)
    with pytest.raises(tpl.TplimitsError, match="every label of the batch is -100"):
        limit.train(X, torch.full((4,), -100), steps=1, loss="cross_entropy", particles=256, progress=False)
    with pytest.raises(tpl.TplimitsError, match=r"labels must be in \[0, 2\].*from 0 to 7"):
        limit.train(X, torch.tensor([0, 1, 2, 7]), steps=1, loss="cross_entropy", particles=256, progress=False)


@pytest.mark.parametrize("argv, match", [
    (["check", "--examples", "0"], "--examples must be in \\[1, 1797\\]"),
    (["check", "--examples", "5000"], "--examples must be in \\[1, 1797\\]"),
    (["inspect", "mlp", "--width", "0"], "--width must be a positive integer"),
    (["inspect", "mlp", "--width", "-5"], "--width must be a positive integer"),
])
def test_cli_refuses(argv, match, capsys):
    assert main(argv) == 2
    assert pytest.importorskip("re").search(match, capsys.readouterr().err)


def test_lower_width_must_be_positive():
    with pytest.raises(tpl.TplimitsError, match="width must be a positive integer, got 0"):
        tpl.lower("mlp", width=0)


@pytest.mark.parametrize("option, value, match", [
    ("steps", -1, "steps must be an integer >= 0"), ("steps", 2.5, "steps must be an integer"),
    ("particles", 512.0, "particles must be an integer"), ("batch_size", 1.5, "batch_size must be an integer"),
    ("checkpoint_every", 0, "checkpoint_every must be an integer >= 1"), ("lr", float("nan"), "lr must be a finite"),
    ("lr", float("inf"), "lr must be a finite"), ("dtype", torch.float16, "dtype=torch.float16"),
    ("dtype", torch.int64, "dtype=torch.int64"), ("device", "tpu9", "device='tpu9'"),
    ("draw_seed", -1, "draw_seed must be a non-negative integer"), ("draw_seed", 1.5, "draw_seed must be"),
])
def test_train_options_are_checked_before_any_work(limit, data, option, value, match):
    options = {"steps": 1, "particles": 256, "progress": False, option: value}
    with pytest.raises(tpl.TplimitsError, match=match):
        limit.train(*data, **options)


def test_cuda_without_cuda(limit, data):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(tpl.TplimitsError, match="CUDA is not available"):
        limit.train(*data, steps=1, particles=256, device="cuda", progress=False)


@pytest.mark.parametrize("which", ["X", "y", "X_test"])
def test_non_finite_data(limit, data, which):
    X, y = data
    values = {"X": X.clone(), "y": y.clone(), "X_test": X[:2].clone()}
    values[which][0, 0] = float("nan")
    with pytest.raises(tpl.TplimitsError, match=f"{which} has non-finite entries"):
        limit.train(values["X"], values["y"], X_test=values["X_test"], steps=1, particles=256, progress=False)


def test_x_test_with_other_features(limit, data):
    with pytest.raises(tpl.TplimitsError, match=r"X_test has rows of shape \(5,\), X of \(3,\)"):
        limit.train(*data, X_test=torch.randn(2, 5), steps=1, particles=256, progress=False)


def test_memory_is_estimated_before_allocating(data):
    adam = tpl.derive("mlp", optimizer="adam", depth=2, d_in=3)
    with pytest.raises(tpl.TplimitsError, match=r"grids of Q values need about .* GiB.*at most about \d+"):
        adam.train(*data, steps=1, particles=2**22, progress=False)
    # a system sharded over ranks needs its share per rank: the size that overflows one process fits in enough ranks
    setup, device = adam.setup(data[0]), torch.device("cpu")
    particles = 2**19  # one system: its grids and Adam's state need 3 · 8 · P² bytes ≈ 6 TiB
    with pytest.raises(tpl.TplimitsError, match=r"per rank \(a system split over 2\)"):
        adam._check_memory(setup, particles, 1, torch.float64, device, particles, shards=2)
    adam._check_memory(setup, particles, 1, torch.float64, device, particles, shards=2**20)


def test_a_callable_must_build_a_module():
    with pytest.raises(tpl.TplimitsError, match="built a int, not an nn.Module"):
        tpl.lower(lambda width: width, example_inputs=(torch.randn(2, 3),))


def test_architecture_options_are_named_errors():
    with pytest.raises(tpl.ConfigError, match="tanhh"):
        tpl.lower("mlp", activation="tanhh")
    with pytest.raises(tpl.ConfigError, match="depth=0 must be a positive integer"):
        tpl.lower("mlp", depth=0)
    with pytest.raises(tpl.TplimitsError, match="UP_s needs a number"):
        tpl.parametrization("UP_abc")


def test_cli_plot_in_a_missing_directory(capsys, tmp_path):
    assert main(["check", "--plot", str(tmp_path / "missing" / "x.png")]) == 2
    assert "directory does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("source, match", [("def broken(:\n", "SyntaxError"), ("import no_such_module_xyz\n",
                                                                             "ModuleNotFoundError")])
def test_cli_user_file_errors_are_one_line(tmp_path, capsys, source, match):
    path = tmp_path / "user_model.py"
    path.write_text(source)
    assert main(["inspect", f"{path}:make", "--inputs", f"{path}:inputs"]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_debug_shows_the_error(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text("def broken(:\n")
    with pytest.raises(tpl.TplimitsError, match="SyntaxError"):
        main(["--debug", "inspect", f"{path}:make", "--inputs", f"{path}:inputs"])


class _Branchy(torch.nn.Module):
    """Adds a layer once its width reaches 1000: both trace widths take the other branch."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp, self.out = torch.nn.Linear(3, width), torch.nn.Linear(width, 1)
        self.extra = torch.nn.Linear(width, width) if width >= 1000 else None

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        if h.shape[-1] >= 1000:
            h = torch.tanh(self.extra(h))
        return self.out(h)


class _Reuse(torch.nn.Module):
    """Applies its hidden layer twice once its width reaches 1000 (same parameters, another program)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp, self.hid, self.out = (torch.nn.Linear(3, width), torch.nn.Linear(width, width),
                                        torch.nn.Linear(width, 1))

    def forward(self, x):
        h = torch.tanh(self.hid(torch.tanh(self.inp(x))))
        if h.shape[-1] >= 1000:
            h = torch.tanh(self.hid(h))
        return self.out(h)


@pytest.mark.parametrize("model, match", [(_Branchy, "it has parameters \\['extra.bias', 'extra.weight'\\]"),
                                          (_Reuse, "its outputs differ from the program's")])
def test_an_architecture_that_changes_with_width_is_refused(model, match):
    x = torch.randn(4, 3)
    tpl.instantiate(model, width=256, example_inputs=(x,), param="muP", optimizer="sgd")
    with pytest.raises(tpl.WidthError, match=f"width 1024 is not the one lowered at widths \\(64, 128\\): {match}"):
        tpl.instantiate(model, width=1024, example_inputs=(x,), param="muP", optimizer="sgd")
    limit = tpl.derive(model, optimizer="sgd", example_inputs=(x,))
    with pytest.raises(tpl.WidthError, match="width 1024"):
        limit.check(x, torch.randn(4, 1), widths=[256, 1024], seeds=2, steps=1, particles=256, progress=False)


# Found by the property suite (tests/test_properties.py): each raised a raw TypeError/RuntimeError before.
def test_options_a_callable_does_not_take():
    with pytest.raises(tpl.ConfigError, match=r"cannot be called as .*\(width, \*\*\{'d_in': 3\}\)"):
        tpl.lower(lambda width: torch.nn.Linear(3, width), example_inputs=(torch.randn(2, 3),), d_in=3)


@pytest.mark.parametrize("key, value, match", [("d_in", {"a": 1}, "d_in=\\{'a': 1\\} must be a positive integer"),
                                               ("d_in", -1, "d_in=-1 must be a positive integer"),
                                               ("activation", 3, "activation=3 must be str"),
                                               ("bias", 1, "bias=1 must be bool")])
def test_architecture_options_keep_the_kind_of_their_default(key, value, match):
    with pytest.raises(tpl.ConfigError, match=f"architecture 'mlp': {match}"):
        tpl.lower("mlp", **{key: value})


def test_make_optimizer_options():
    params = list(torch.nn.Linear(3, 2).parameters())
    with pytest.raises(tpl.errors.OptionError, match=r"unknown option\(s\) \['betas'\] for update rule 'signsgd'"):
        tpl.make_optimizer("signsgd", params, lr=0.1, betas=(0.9, 0.99))
    with pytest.raises(tpl.ConfigError, match="lr must be a finite number >= 0, got \\{'a': 1\\}"):
        tpl.make_optimizer("sgd", params, lr={"a": 1})
    with pytest.raises(tpl.ConfigError, match="update rule 'adam': betas=3 must be tuple"):
        tpl.make_optimizer("adam", params, lr=0.1, betas=3)
    with pytest.raises(tpl.errors.OptionError, match="params must be an iterable of parameters"):
        tpl.make_optimizer("sgd", 3, lr=0.1)
    with pytest.raises(tpl.ConfigError, match="params is empty"):
        tpl.make_optimizer("sgd", [], lr=0.1)


def test_check_data_must_be_numbers(limit, data):
    with pytest.raises(tpl.TplimitsError, match="X must be a tensor \\(or array\\) of numbers, got function"):
        limit.check(lambda: 0, data[1], widths=[8, 16], seeds=2, steps=1, particles=64, progress=False)
    with pytest.raises(tpl.TplimitsError, match="tolerance must be a finite number >= 0, got nan"):
        limit.check(*data, widths=[8, 16], seeds=2, steps=1, tolerance=float("nan"), particles=64, progress=False)
    with pytest.raises(tpl.TplimitsError, match="trajectory must be a Trajectory returned by Limit.train, got int"):
        limit.check(*data, widths=[8, 16], seeds=2, steps=1, trajectory=3, particles=64, progress=False)


@pytest.mark.parametrize("option, value, match", [("params", None, "params must be a non-empty sequence"),
                                                  ("steps", 0, "steps must be an integer >= 1"),
                                                  ("seeds", 0, "seeds must be an integer >= 1"),
                                                  ("lr", float("inf"), "lr must be a finite number")])
def test_coord_check_arguments(option, value, match):
    with pytest.raises(tpl.TplimitsError, match=match):
        tpl.coord_check("mlp", widths=(8, 16), **{option: value})


@pytest.mark.parametrize("option, value, match", [("width", True, "width must be an integer >= 1, got True"),
                                                  ("seed", 1.5, "seed must be an integer"),
                                                  ("clip", "x", "clip must be a finite number"),
                                                  ("optimizer_options", {"momentum": "x"},
                                                   "update rule 'momentum': momentum='x' must be a finite number")])
def test_instantiate_arguments(option, value, match):
    options = {"width": 16, "optimizer": "momentum", option: value}
    with pytest.raises(tpl.TplimitsError, match=match):
        tpl.instantiate("mlp", d_in=3, **options)


def test_derive_refuses_what_train_could_not_use():
    with pytest.raises(tpl.TplimitsError, match="weight_decay must be a finite number >= 0, got \\[9, 5\\]"):
        tpl.derive("mlp", weight_decay=[9, 5])
    with pytest.raises(tpl.TplimitsError, match="weight_decay is the decoupled lambda of Eq. 2.50, in \\[0, 1\\]"):
        tpl.derive("mlp", weight_decay=2.0)


@pytest.mark.parametrize("make", [lambda **o: tpl.derive("mlp", **o), lambda **o: tpl.instantiate("mlp", width=8, **o)])
def test_clip_of_plain_updates_is_refused_not_ignored(make):
    """Eq. 2.54's threshold divides normalized updates; a plain-update parametrization has none to divide."""
    with pytest.raises(tpl.TplimitsError, match="clip=0.5 .* acts on normalized updates, and param 'muP' has plain"):
        make(param="muP", clip=0.5)
    make(param="muP-normalized", clip=0.5)  # the same threshold where it acts


@pytest.mark.parametrize("kernels, match", [(None, "kernels must be a sequence"), (["nope"], "no program value %nope"),
                                            (["linear_1_2"], "%linear_1_2 is not a vector"),
                                            (["d_tanh_from_linear_1_1"],
                                             "%d_tanh_from_linear_1_1 is a value of the backward pass")])
def test_train_kernels_are_checked_before_training(limit, data, kernels, match):
    with pytest.raises(tpl.TplimitsError, match=f"kernels: {match}" if kernels else match):
        limit.train(*data, steps=1, particles=64, kernels=kernels, progress=False)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("tplimits: error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, match", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["inspect", "mlp", "--bogus", "3"], "unrecognized arguments: --bogus 3"),
    (["check", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["check", "--loss", "hinge"], "argument --loss: invalid choice: 'hinge'"),
    ([], "a command is required"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_cli_bad_options_are_one_line(argv, match, capsys):
    assert main(argv) == 2
    assert match in _one_line_error(capsys)


def test_cli_missing_module_is_one_line(capsys):
    assert main(["inspect", "no_such_module_xyz:make", "--inputs", "no_such_module_xyz:inputs"]) == 2
    assert "ModuleNotFoundError" in _one_line_error(capsys)


@pytest.mark.parametrize("source, where", [
    ("import torch\ndef make(width):\n    raise ValueError('width too odd')\ninputs = (torch.randn(2, 3),)\n", "make"),
    ("undefined_name + 1\n", "<module>"),
])
def test_cli_errors_raised_in_user_code_are_one_line(tmp_path, capsys, source, where):
    path = tmp_path / "user_model.py"
    path.write_text(source)
    assert main(["inspect", f"{path}:make", "--inputs", f"{path}:inputs"]) == 2
    err = _one_line_error(capsys)
    assert f"(raised at {path}:" in err and f"in {where};" in err and "--debug" in err
    assert ("ValueError: width too odd" if where == "make" else "NameError") in err
    with pytest.raises(ValueError if where == "make" else NameError):
        main(["--debug", "inspect", f"{path}:make", "--inputs", f"{path}:inputs"])


def test_a_model_without_width_warns(tmp_path, capsys):
    x = torch.randn(2, 3)
    with pytest.warns(tpl.NoWidthWarning, match="nothing in this model scales with width"):
        program = tpl.lower(lambda width: torch.nn.Linear(3, 2), example_inputs=(x,))
    assert not program.scales_with_width() and tpl.lower("mlp", depth=1).scales_with_width()
    path = tmp_path / "fixed.py"
    path.write_text("import torch\ndef make(width):\n    return torch.nn.Linear(3, 2)\ninputs = (torch.randn(2, 3),)\n")
    assert main(["inspect", f"{path}:make", "--inputs", f"{path}:inputs"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("tplimits: warning: nothing in this model scales with width") and len(err.splitlines()) == 1


@pytest.mark.parametrize("verb", [tpl.derive, lambda arch, **kw: tpl.instantiate(arch, width=16, **kw)])
def test_update_rules_must_be_a_mapping(verb):
    with pytest.raises(tpl.TplimitsError, match="update_rules must be a mapping \\{parameter pattern: rule\\}.*got 3"):
        verb("mlp", update_rules=3)
    with pytest.raises(tpl.PluginError, match="optimizer must be a registered name or an UpdateRule, got int"):
        verb("mlp", update_rules={"*.weight": 3})


def test_examples_checks_its_data_as_train_does(limit):
    with pytest.raises(tpl.TplimitsError, match="X must be a tensor .* got str"):
        limit.examples("rows")
    with pytest.raises(tpl.TplimitsError, match="X has non-finite entries"):
        limit.examples([[1.0, float("nan"), 3.0]])
    assert limit.examples([[1.0, 2.0, 3.0]]) == limit.examples(torch.ones(1, 3))  # a list is data, as in train
