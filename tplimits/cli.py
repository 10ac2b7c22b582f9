"""Command line: ``tplimits check`` (the μ-limit against training), ``tplimits inspect``, ``tplimits coordcheck``,
``tplimits diagnose`` (lazy or rich: linearization, kernel drift, weak correlation, spectral ratios).

``check``, ``coordcheck`` and ``diagnose`` take the model as ``inspect`` does (a registered name, or
``module:attr`` / ``file.py:attr`` with ``--inputs``) and the data from ``--data``: one of scikit-learn's
bundled sets or a ``.pt`` / ``.npz`` file holding ``X`` and ``y``."""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch

from tplimits.api import coord_check, derive, diagnose, instantiate, lower
from tplimits.core.program import Program
from tplimits.errors import NoWidthWarning, TplimitsError
from tplimits.registry.manager import architecture, list_architectures

_USER_FILES: set[str] = set()  # files of the modules `module:attr` / `file.py:attr` arguments were loaded from


def _parse_config(items: list[str]) -> dict[str, Any]:
    config = {}
    for item in items:
        if "=" not in item:
            raise TplimitsError(f"option {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            config[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            config[key] = raw
    return config


def load_object(path: str) -> Any:
    """``package.module:attr`` or ``path/to/file.py:attr`` -> the object."""
    if ":" not in path:
        raise TplimitsError(f"{path!r} is neither a registered architecture ({sorted(list_architectures())}) nor a "
                            "`module:attr` / `file.py:attr` path")
    module_path, attr = path.rsplit(":", 1)
    try:
        module = _import_user_module(module_path)
    except (ImportError, SyntaxError) as error:  # the user's own file or module, not tplimits'
        raise TplimitsError(f"cannot import {module_path!r}: {type(error).__name__}: {error} "
                            "(rerun with --debug for the traceback)") from error
    if not hasattr(module, attr):
        raise TplimitsError(f"{module_path!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _import_user_module(module_path: str) -> Any:
    if not module_path.endswith(".py"):
        spec = importlib.util.find_spec(module_path)
        if spec is not None and spec.origin:
            _USER_FILES.add(spec.origin)
        return importlib.import_module(module_path)
    file = Path(module_path)
    if not file.exists():
        raise TplimitsError(f"no file {module_path!r}")
    spec = importlib.util.spec_from_file_location(file.stem, file)
    _USER_FILES.add(spec.origin)
    module = importlib.util.module_from_spec(spec)
    sys.modules[file.stem] = module
    spec.loader.exec_module(module)
    return module


def inspect_command(args: argparse.Namespace) -> int:
    config = _parse_config(args.option)
    if args.width is not None:
        if args.width < 1:
            raise TplimitsError(f"--width must be a positive integer, got {args.width}")
        config["width"] = args.width
    if args.dtype == "float64":
        torch.set_default_dtype(torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NoWidthWarning)
        program = _lower_target(args, config)
    for warning in caught:
        if issubclass(warning.category, NoWidthWarning):
            print(f"tplimits: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    print(program.format(origins=args.origins))
    print()
    print(program.parameter_table())
    counts = ", ".join(f"{k}: {v}" for k, v in program.counts().items())
    print(f"\n{len(program)} instructions ({counts})")
    for note in program.notes:
        print("note:", note)
    return 0


def _lower_target(args: argparse.Namespace, config: dict[str, Any]) -> Program:
    arch, inputs = _target(args)
    return lower(arch, example_inputs=inputs, **config)


def _target(args: argparse.Namespace) -> tuple[Any, tuple | None]:
    """The model argument (a registered name, or the object ``module:attr`` names) and, for the latter, its
    example inputs from ``--inputs``."""
    if args.target in list_architectures():
        return args.target, None
    build = load_object(args.target)
    if args.inputs is None:
        raise TplimitsError("a `module:attr` model needs --inputs `module:attr` (a tuple of example inputs, "
                            "or a callable returning one)")
    inputs = load_object(args.inputs)
    inputs = inputs() if callable(inputs) else inputs
    return build, inputs if isinstance(inputs, tuple) else (inputs,)


SKLEARN_SETS = ("digits", "iris", "wine", "breast_cancer")


def load_data(source: str, examples: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, y)`` from one of scikit-learn's bundled sets (standardized features, integer labels) or from a
    ``.pt`` / ``.npz`` file holding ``X`` and ``y``; ``examples`` rows drawn at random (all when None)."""
    if source in SKLEARN_SETS:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, f"load_{source}")()
        X, y = torch.as_tensor(bunch.data, dtype=torch.float64), torch.as_tensor(bunch.target)
    elif source.endswith((".pt", ".npz")):
        X, y = _data_file(source)
    else:
        raise TplimitsError(f"--data {source!r}: use one of scikit-learn's bundled sets {list(SKLEARN_SETS)} or a "
                            ".pt / .npz file holding X and y")
    if examples is not None:
        if not 1 <= examples <= len(y):
            raise TplimitsError(f"--examples must be in [1, {len(y)}] ({source} has {len(y)} rows), got {examples}")
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:examples]
        X, y = X[order], y[order]
    if source in SKLEARN_SETS:  # standardized over the rows used
        X = (X - X.mean(0)) / X.std(0).clamp_min(1e-8)
    return X, y


def _data_file(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not Path(path).is_file():
        raise TplimitsError(f"--data {path!r}: no such file")
    try:
        if path.endswith(".pt"):
            content = torch.load(path, weights_only=True)
        else:
            import numpy

            with numpy.load(path) as arrays:
                content = {key: torch.as_tensor(arrays[key]) for key in arrays.files}
    except Exception as error:  # a file we cannot read is the user's, whatever the reader raised
        raise TplimitsError(f"--data {path!r} cannot be read: {type(error).__name__}: {error}") from error
    if not isinstance(content, dict) or not {"X", "y"} <= set(content):
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise TplimitsError(f"--data {path!r} must hold a dict with tensors 'X' and 'y'; it holds {keys}")
    X, y = torch.as_tensor(content["X"]), torch.as_tensor(content["y"])
    return (X.double() if X.is_floating_point() else X), y


def _data_config(args: argparse.Namespace, config: dict[str, Any], X: torch.Tensor, outputs: int) -> dict[str, Any]:
    """A registered architecture sized to the data: its ``d_in`` / ``d_out`` options (where it has them and
    ``-o`` did not set them) from the features and the number of outputs."""
    if args.target not in list_architectures():
        return config
    defaults = architecture(args.target).defaults
    sized = dict(config)
    if "d_in" in defaults and X.ndim == 2:
        sized.setdefault("d_in", X.shape[1])
    if "d_out" in defaults:
        sized.setdefault("d_out", outputs)
    return sized


def _targets(y: torch.Tensor, loss: str) -> tuple[torch.Tensor, int]:
    """Targets for ``loss`` and the number of outputs: integer labels are kept for cross-entropy and one-hot
    encoded for a regression loss; real targets are used as they are."""
    if y.is_floating_point():
        if loss == "cross_entropy":
            raise TplimitsError("--loss cross_entropy needs integer class labels in y; these are real numbers")
        return y, (1 if y.ndim == 1 else y.shape[1])
    classes = int(y.max()) + 1
    if loss == "cross_entropy":
        return y.long(), classes
    return torch.nn.functional.one_hot(y.long(), classes).double(), classes


def _study_target(args: argparse.Namespace) -> tuple[dict, Any, tuple | None]:
    """What a study command (coordcheck, diagnose) starts from: the dtype set, the plot path checked, the
    ``--option`` config, the architecture and its example inputs."""
    if args.dtype == "float64":
        torch.set_default_dtype(torch.float64)
    _check_plot(args.plot)
    config = _parse_config(args.option)
    arch, inputs = _target(args)
    return config, arch, inputs


def coordcheck_command(args: argparse.Namespace) -> int:
    config, arch, inputs = _study_target(args)
    if args.data is not None:
        X, y = load_data(args.data, args.examples)
        X = X.to(torch.get_default_dtype()) if X.is_floating_point() else X
        config = _data_config(args, config, X, _targets(y, "mse")[1])
        inputs = (X,)
    report = coord_check(arch, params=args.param, optimizer=args.optimizer, widths=args.widths, steps=args.steps,
                         lr=args.lr, seeds=args.seeds, example_inputs=inputs, **config)
    print(report.format())
    if args.plot:
        print(f"plot: {report.plot(args.plot)}")
    return 0


def diagnose_command(args: argparse.Namespace) -> int:
    config, arch, inputs = _study_target(args)
    if args.data is not None:
        X, labels = load_data(args.data, args.examples)
        y, outputs = _targets(labels, args.loss)
        config = _data_config(args, config, X, outputs)
    else:
        X, y = _example_data(args, arch, inputs, config)
    X = X.to(torch.get_default_dtype()) if X.is_floating_point() else X
    y = y.to(torch.get_default_dtype()) if y.is_floating_point() else y
    print(f"diagnosing {args.target} under {', '.join(args.param)} with {args.optimizer} (lr {args.lr}, {args.loss}, "
          f"{args.steps} steps) on {len(X)} inputs; widths {args.widths} x {args.seeds} seeds", flush=True)
    report = diagnose(arch, X, y, param=args.param, optimizer=args.optimizer, widths=args.widths, seeds=args.seeds,
                      steps=args.steps, lr=args.lr, loss=args.loss, limit=args.limit, progress=not args.quiet,
                      **config)
    print(report.format())
    if args.plot:
        print(f"plot: {report.plot(args.plot)}")
    return 1 if any(r.contradictions for r in report.results.values()) else 0


def _example_data(args: argparse.Namespace, arch: Any, inputs: tuple | None,
                  config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Without ``--data``: the model's example inputs and fixed random targets of its output's shape."""
    if inputs is None:
        inputs = architecture(arch).example_inputs(**config)
    if len(inputs) != 1 or not torch.is_tensor(inputs[0]):
        raise TplimitsError("diagnose trains on one input tensor X; this model's example inputs are "
                            f"{len(inputs)} values: pass --data with X and y")
    if args.loss == "cross_entropy":
        raise TplimitsError("--loss cross_entropy needs class labels: pass --data")
    model, _ = instantiate(arch, width=min(args.widths), param=args.param[0], optimizer=args.optimizer,
                           example_inputs=inputs, **config)
    with torch.no_grad():
        shape = model(*inputs).shape
    return inputs[0], torch.randn(shape, generator=torch.Generator().manual_seed(1234))


def _check_plot(plot: str) -> None:
    if plot and not Path(plot).resolve().parent.is_dir():
        raise TplimitsError(f"--plot {plot!r}: its directory does not exist")


def check_command(args: argparse.Namespace) -> int:
    _check_plot(args.plot)
    X, labels = load_data(args.data, args.examples)
    targets, outputs = _targets(labels, args.loss)
    config = _parse_config(args.option)
    if args.target in list_architectures():
        defaults = architecture(args.target).defaults
        config = {**{k: v for k, v in (("depth", args.depth), ("activation", args.activation)) if k in defaults},
                  **config}
    config = _data_config(args, config, X, outputs)
    arch, inputs = _target(args)
    limit = derive(arch, optimizer=args.optimizer, param=args.param, example_inputs=inputs, **config)
    print(f"μ-limit of {args.target} ({args.param}, {args.optimizer}, lr {args.lr}, {args.loss}) on {len(X)} rows of "
          f"{args.data}, {args.steps} steps, {args.particles} particles; finite widths {args.widths} x {args.seeds} "
          "seeds", flush=True)
    report = limit.check(X, targets, widths=args.widths, seeds=args.seeds, steps=args.steps, lr=args.lr,
                         loss=args.loss, particles=args.particles, progress=not args.quiet)
    print(report.format())
    if args.plot:
        print(f"plot: {report.plot(args.plot)}")
    return 0 if report.passed else 1


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are user errors like any other: one line, status 2 (not argparse's usage
    block and ``SystemExit``)."""

    def error(self, message: str) -> NoReturn:
        raise TplimitsError(f"{message} (see `{self.prog} --help`)")


def _parser() -> _Parser:
    parser = _Parser(prog="tplimits", description="Infinite-width limits of PyTorch models.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command")  # checked after parsing, so that `tplimits --bogus` names --bogus
    inspect = sub.add_parser("inspect", help="lower a model and print its Tensor Program and parameter table")
    inspect.add_argument("target", nargs="?", default="transformer",
                         help="a registered architecture name, or `module:attr` / `file.py:attr` giving a "
                              "callable width -> nn.Module (default: transformer)")
    inspect.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                         help="architecture option (repeatable), e.g. -o n_layers=2")
    inspect.add_argument("--width", type=int, default=None, help="the width n to report the program at")
    inspect.add_argument("--inputs", default=None, help="`module:attr` of example inputs for a custom model")
    inspect.add_argument("--origins", action="store_true", help="show the source line of every instruction")
    inspect.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    check = sub.add_parser("coordcheck", help="train at growing widths and report how every value scales")
    _model_arguments(check, default="mlp")
    check.add_argument("--param", nargs="+", default=["SP", "NTP", "muP"],
                       help="registered parametrizations to compare (default: SP NTP muP)")
    _training_arguments(check, optimizer="sgd", lr=0.1, steps=3, widths=[128, 256, 512, 1024, 2048], seeds=2)
    _data_arguments(check, default=None, examples=None)
    check.add_argument("--plot", default="tplimits-coordcheck.png",
                       help="where to save the PNG: value size and change vs width, one panel per step ('' for none)")
    check.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    _check_parser(sub)
    _diagnose_parser(sub)
    return parser


def _model_arguments(sub: argparse.ArgumentParser, default: str) -> None:
    sub.add_argument("target", nargs="?", default=default,
                     help=f"a registered architecture ({', '.join(sorted(list_architectures()))}), or "
                          f"`module:attr` / `file.py:attr` giving a callable width -> nn.Module (default: {default})")
    sub.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                     help="architecture option (repeatable), e.g. -o depth=2")
    sub.add_argument("--inputs", default=None,
                     help="`module:attr` / `file.py:attr` of example inputs (a tuple, or a callable returning one) "
                          "for a model given as module:attr")


def _training_arguments(sub: argparse.ArgumentParser, *, optimizer: str, lr: float, steps: int, widths: list[int],
                        seeds: int) -> None:
    sub.add_argument("--optimizer", default=optimizer, help=f"a registered optimizer (default: {optimizer})")
    sub.add_argument("--lr", type=float, default=lr, help=f"learning rate (default: {lr})")
    sub.add_argument("--steps", type=int, default=steps, help=f"training steps (default: {steps})")
    sub.add_argument("--widths", type=int, nargs="+", default=widths, help=f"finite widths (default: {widths})")
    sub.add_argument("--seeds", type=int, default=seeds, help=f"runs per width (default: {seeds})")


def _data_arguments(sub: argparse.ArgumentParser, default: str | None, examples: int | None) -> None:
    sub.add_argument("--data", default=default,
                     help=f"{' | '.join(SKLEARN_SETS)} (scikit-learn's bundled sets) or a .pt / .npz file holding X "
                          f"and y (default: {default or 'the model example inputs, random targets'})")
    sub.add_argument("--examples", type=int, default=examples,
                     help=f"rows of the data to use, drawn at random (default: {examples or 'all'})")


def _check_parser(sub: Any) -> None:
    limit = sub.add_parser("check", help="the μ-limit of a model on a data set against finite widths "
                                         "(default: an MLP on scikit-learn's digits)")
    _model_arguments(limit, default="mlp")
    limit.add_argument("--param", default="muP", help="a registered parametrization (default: muP)")
    _training_arguments(limit, optimizer="sgd", lr=0.5, steps=10, widths=[128, 512, 2048], seeds=6)
    _data_arguments(limit, default="digits", examples=16)
    limit.add_argument("--loss", choices=["cross_entropy", "mse"], default="cross_entropy",
                       help="cross_entropy on the labels, or mse on their one-hot codes (default: cross_entropy)")
    limit.add_argument("--depth", type=int, default=2, help="hidden layers, for an architecture with a depth option")
    limit.add_argument("--activation", default="tanh", help="for an architecture with an activation option")
    limit.add_argument("--particles", type=int, default=2**16, help="Monte Carlo particles of the limit")
    limit.add_argument("--plot", default="tplimits-check.png", help="where to save the PNG ('' for none)")
    limit.add_argument("--quiet", action="store_true", help="no progress bar")


def _diagnose_parser(sub: Any) -> None:
    diag = sub.add_parser("diagnose", help="lazy or rich: linearization gap, kernel drift, weak correlation, "
                                           "feature movement and spectral ratios against width")
    _model_arguments(diag, default="mlp")
    diag.add_argument("--param", nargs="+", default=["NTP", "muP"],
                      help="registered parametrizations to compare (default: NTP muP)")
    _training_arguments(diag, optimizer="sgd", lr=0.5, steps=5, widths=[64, 256, 1024], seeds=2)
    _data_arguments(diag, default=None, examples=None)
    diag.add_argument("--loss", choices=["mse", "cross_entropy"], default="mse",
                      help="mse against the targets (labels one-hot), or cross_entropy on labels (default: mse)")
    diag.add_argument("--limit", action="store_true",
                      help="also measure the distance to the NT limit of each parametrization in the NT regime")
    diag.add_argument("--plot", default="tplimits-diagnose.png", help="where to save the PNG ('' for none)")
    diag.add_argument("--dtype", choices=["float32", "float64"], default="float64",
                      help="float64 (default) resolves gaps of 1e-4 and below; float32 is faster")
    diag.add_argument("--quiet", action="store_true", help="no progress bar")


def _parse(parser: _Parser, argv: list[str]) -> argparse.Namespace:
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.error("a command is required: inspect, coordcheck, check or diagnose")
    return args


def _run(args: argparse.Namespace) -> int:
    if args.command == "coordcheck":
        return coordcheck_command(args)
    if args.command == "check":
        return check_command(args)
    if args.command == "diagnose":
        return diagnose_command(args)
    return inspect_command(args)


def _user_frame(error: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of ``error``'s traceback in a file the user gave the CLI (None: not raised there)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename in _USER_FILES]
    return frames[-1] if frames else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        return _run(_parse(_parser(), argv))
    except TplimitsError as error:
        if debug:
            raise
        print(f"tplimits: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        # Only an error raised in the user's own file is the user's (a bug of tplimits keeps its traceback).
        frame = _user_frame(error)
        if debug or frame is None:
            raise
        print(f"tplimits: error: {type(error).__name__}: {error} (raised at {frame.filename}:{frame.lineno} in "
              f"{frame.name}; rerun with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
