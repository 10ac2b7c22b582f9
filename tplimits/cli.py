"""Command line: ``tplimits check`` (the μ-limit against training), ``tplimits inspect``, ``tplimits coordcheck``."""

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

from tplimits.api import coord_check, derive, lower
from tplimits.core.program import Program
from tplimits.errors import NoWidthWarning, TplimitsError
from tplimits.registry.manager import list_architectures

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
    if args.target in list_architectures():
        return lower(args.target, **config)
    build = load_object(args.target)
    if args.inputs is None:
        raise TplimitsError("a `module:attr` model needs --inputs `module:attr` (a tuple of example inputs, "
                            "or a callable returning one)")
    inputs = load_object(args.inputs)
    inputs = inputs() if callable(inputs) else inputs
    return lower(build, example_inputs=inputs, **config)


def coordcheck_command(args: argparse.Namespace) -> int:
    if args.dtype == "float64":
        torch.set_default_dtype(torch.float64)
    report = coord_check(args.target, params=args.param, optimizer=args.optimizer, widths=args.widths,
                         steps=args.steps, lr=args.lr, seeds=args.seeds, **_parse_config(args.option))
    print(report.format())
    return 0


def digits(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of scikit-learn's bundled 8x8 digits (standardized pixels) and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    if not 1 <= n <= len(data.target):
        raise TplimitsError(f"--examples must be in [1, {len(data.target)}] (scikit-learn's digits has "
                            f"{len(data.target)} images), got {n}")
    order = torch.randperm(len(data.target), generator=torch.Generator().manual_seed(seed))[:n]
    X = torch.as_tensor(data.data, dtype=torch.float64)[order]
    X = (X - X.mean(0)) / X.std(0).clamp_min(1e-8)
    return X, torch.as_tensor(data.target)[order]


def check_command(args: argparse.Namespace) -> int:
    if args.plot and not Path(args.plot).resolve().parent.is_dir():
        raise TplimitsError(f"--plot {args.plot!r}: its directory does not exist")
    X, labels = digits(args.examples)
    config = {"depth": args.depth, "d_in": X.shape[1], "d_out": 10, "activation": args.activation,
              **_parse_config(args.option)}
    limit = derive("mlp", optimizer=args.optimizer, param="muP", **config)
    targets = labels if args.loss == "cross_entropy" else torch.nn.functional.one_hot(labels, 10).double()
    print(f"μ-limit of a depth-{args.depth} {args.activation} MLP (μP, {args.optimizer}, lr {args.lr}, {args.loss}) on "
          f"{args.examples} digits, {args.steps} steps, {args.particles} particles; finite widths {args.widths} x "
          f"{args.seeds} seeds", flush=True)
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
    check.add_argument("target", nargs="?", default="mlp", help="a registered architecture (default: mlp)")
    check.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--param", nargs="+", default=["SP", "NTP", "muP"], help="parametrizations to compare")
    check.add_argument("--optimizer", default="sgd")
    check.add_argument("--lr", type=float, default=0.1)
    check.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    check.add_argument("--steps", type=int, default=3)
    check.add_argument("--seeds", type=int, default=2)
    check.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    _check_parser(sub)
    return parser


def _check_parser(sub: Any) -> None:
    limit = sub.add_parser("check", help="the μ-limit of an MLP on scikit-learn's digits against finite widths")
    limit.add_argument("--optimizer", default="sgd")
    limit.add_argument("--lr", type=float, default=0.5)
    limit.add_argument("--loss", choices=["cross_entropy", "mse"], default="cross_entropy")
    limit.add_argument("--depth", type=int, default=2)
    limit.add_argument("--activation", default="tanh")
    limit.add_argument("--examples", type=int, default=16)
    limit.add_argument("--steps", type=int, default=10)
    limit.add_argument("--widths", type=int, nargs="+", default=[128, 512, 2048])
    limit.add_argument("--seeds", type=int, default=6)
    limit.add_argument("--particles", type=int, default=2**16)
    limit.add_argument("--plot", default="tplimits-check.png", help="where to save the PNG ('' for none)")
    limit.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE")
    limit.add_argument("--quiet", action="store_true")


def _parse(parser: _Parser, argv: list[str]) -> argparse.Namespace:
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.error("a command is required: inspect, coordcheck or check")
    return args


def _run(args: argparse.Namespace) -> int:
    if args.command == "coordcheck":
        return coordcheck_command(args)
    if args.command == "check":
        return check_command(args)
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
