"""Command line: ``tplimits inspect <architecture | module:attr | file.py:attr>``."""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch

from tplimits.core.frontend import lower
from tplimits.errors import TplimitsError
from tplimits.plugins.manager import architectures


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
        raise TplimitsError(f"{path!r} is neither a registered architecture ({sorted(architectures())}) nor a "
                            "`module:attr` / `file.py:attr` path")
    module_path, attr = path.rsplit(":", 1)
    if module_path.endswith(".py"):
        file = Path(module_path)
        if not file.exists():
            raise TplimitsError(f"no file {module_path!r}")
        spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[file.stem] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_path)
    if not hasattr(module, attr):
        raise TplimitsError(f"{module_path!r} has no attribute {attr!r}")
    return getattr(module, attr)


def inspect_command(args: argparse.Namespace) -> int:
    config = _parse_config(args.option)
    if args.width is not None:
        config["width"] = args.width
    if args.dtype == "float64":
        torch.set_default_dtype(torch.float64)
    if args.target in architectures():
        program = lower(args.target, **config)
    else:
        build = load_object(args.target)
        if args.inputs is None:
            raise TplimitsError("a `module:attr` model needs --inputs `module:attr` (a tuple of example inputs, "
                                "or a callable returning one)")
        inputs = load_object(args.inputs)
        inputs = inputs() if callable(inputs) else inputs
        program = lower(build, example_inputs=inputs, **config)
    print(program.format(origins=args.origins))
    print()
    print(program.parameter_table())
    counts = ", ".join(f"{k}: {v}" for k, v in program.counts().items())
    print(f"\n{len(program)} instructions ({counts})")
    for note in program.notes:
        print("note:", note)
    return 0


def coordcheck_command(args: argparse.Namespace) -> int:
    from tplimits.core.coordcheck import coord_check

    if args.dtype == "float64":
        torch.set_default_dtype(torch.float64)
    report = coord_check(args.target, params=args.param, optimizer=args.optimizer, widths=args.widths,
                         steps=args.steps, lr=args.lr, seeds=args.seeds, **_parse_config(args.option))
    print(report.format())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tplimits", description="Infinite-width limits of PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
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
    args = parser.parse_args(argv)
    try:
        if args.command == "coordcheck":
            return coordcheck_command(args)
        return inspect_command(args)
    except TplimitsError as error:
        print(f"tplimits: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
