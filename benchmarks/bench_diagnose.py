"""Lazy or rich, measured: ``tpl.diagnose`` on the MLP (SGD and Adam), the Transformer and the ResNet under
NTP and μP, and the cost of its empirical NTK and weak-correlation statistic at width 4096.

The theory's exponents (Lee et al. 2019; seeds 000-002): under NTP the linearization gap, kernel drift and
weak correlation vanish at least like n^-1/2, feature movement and the spectral ratio like n^-1/2; under
μP every one is Θ(1) (slope 0). Each study prints the report, one line of slopes to copy into
docs/diagnose.md and, for the MLP under SGD, saves the plot (``--plot``).

Run: ``python benchmarks/bench_diagnose.py --studies mlp-sgd mlp-adam transformer resnet`` and
``python benchmarks/bench_diagnose.py --studies performance`` (the cost figure of docs/performance.md;
run it alone on an idle machine: peak memory is that process's maximum resident set).
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

import torch

import tplimits as tpl
from tplimits.diagnostics.diagnose import HEADLINE
from tplimits.diagnostics.kernels import empirical_ntk, weak_correlation

STUDIES = {
    # name: (architecture, optimizer, lr, widths, seeds, steps, config, inputs)
    "mlp-sgd": ("mlp", "sgd", 0.5, (128, 256, 512, 1024, 2048), 3, 5, {"depth": 3, "d_in": 8, "d_out": 1}, None),
    # below these widths μP's kernel drift and linearization gap are not yet flat (docs/diagnose.md)
    "mlp-adam": ("mlp", "adam", 0.01, (256, 512, 1024, 2048, 4096), 3, 5, {"depth": 3, "d_in": 8, "d_out": 1}, None),
    "transformer": ("transformer", "sgd", 0.5, (128, 256, 512, 1024), 2, 5,
                    {"n_layers": 1, "n_heads": 2, "vocab": 8, "seq_len": 4, "batch": 4}, None),
    "resnet": ("resnet", "sgd", 0.1, (32, 64, 128, 256), 2, 5,
               {"stages": 1, "blocks": 1, "image_size": 4, "num_classes": 2, "batch": 8}, None),
}


def _data(arch: str, config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if arch == "mlp":
        X = torch.randn(16, config["d_in"], generator=g)
    else:
        (X,) = tpl.architecture(arch).example_inputs(**config)
    model, _ = tpl.instantiate(arch, width=32, param="muP", optimizer="sgd", example_inputs=(X,), **config)
    with torch.no_grad():
        shape = model(X).shape
    return X, torch.randn(shape, generator=g)


def study(name: str, plot: str | None, widths: list[int] | None = None, seeds: int | None = None,
          params: list[str] | None = None, lr: float | None = None) -> None:
    arch, optimizer, default_lr, default_widths, default_seeds, steps, config, _ = STUDIES[name]
    widths, seeds, lr = widths or list(default_widths), seeds or default_seeds, lr or default_lr
    X, y = _data(arch, config)
    start = time.perf_counter()
    report = tpl.diagnose(arch, X, y, param=params or ["NTP", "muP"], optimizer=optimizer, widths=list(widths),
                          seeds=seeds, steps=steps, lr=lr, progress=True, **config)
    elapsed = time.perf_counter() - start
    print(f"== {name}: {arch}, {optimizer} lr {lr}, widths {list(widths)}, {seeds} seeds, {steps} steps "
          f"({elapsed:.0f} s)")
    print(report.format())
    for param, diag in report.results.items():
        cells = " | ".join(f"{diag[m].slope:+.2f} ± {diag[m].slope_se:.2f}" for m in HEADLINE)
        print(f"| {name} | {param} | {cells} | {diag.regime} |", flush=True)
    if plot:
        print("plot:", report.plot(plot))


def performance(width: int = 4096, depth: int = 3, rows: int = 64) -> None:
    """The empirical NTK (64 x 64, 8 columns at a time) and one weak-correlation statistic of a width-4096
    depth-3 MLP on 64 inputs, float32: seconds and the process's peak resident memory."""
    torch.set_default_dtype(torch.float32)
    model, _ = tpl.instantiate("mlp", width=width, param="NTP", optimizer="sgd", depth=depth, d_in=16, d_out=1)
    lin = tpl.linearize(model)
    X = torch.randn(rows, 16, generator=torch.Generator().manual_seed(0))
    fn, point = lin.function(X), lin.point()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    parameters = sum(p.numel() for p in point.values())
    start, cpu = time.perf_counter(), time.process_time()
    kernel = empirical_ntk(fn, point, columns=8)
    ntk_s, ntk_cpu = time.perf_counter() - start, time.process_time() - cpu
    direction = {k: torch.randn_like(v) * 1e-3 for k, v in point.items()}
    start, cpu = time.perf_counter(), time.process_time()
    rho = weak_correlation(fn, point, direction)
    weak_s, weak_cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # CPU seconds are what the process used whatever else runs: on a loaded machine they, not the wall
    # clock, estimate the time on idle cores (divided by the threads it could use)
    print(f"width {width}, depth {depth}, {parameters / 1e6:.1f}M parameters, {rows} inputs, "
          f"{torch.get_num_threads()} threads: NTK {tuple(kernel.shape)} in {ntk_s:.1f} s wall / {ntk_cpu:.1f} s CPU, "
          f"weak correlation ({rho:.3g}) in {weak_s:.1f} s wall / {weak_cpu:.1f} s CPU; peak resident memory "
          f"{peak:.2f} GiB (before: {base:.2f} GiB)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", nargs="*", default=[*STUDIES, "performance"])
    parser.add_argument("--plot", default="docs/diagnose-mlp.png", help="where the mlp-sgd study's plot goes")
    parser.add_argument("--widths", type=int, nargs="*", help="widths instead of each study's own")
    parser.add_argument("--seeds", type=int, help="seeds per width instead of each study's own")
    parser.add_argument("--params", nargs="*", help="parametrizations (default NTP and muP)")
    parser.add_argument("--lr", type=float, help="learning rate instead of each study's own")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in args.studies:
        if name == "performance":
            performance()
            continue
        torch.set_default_dtype(torch.float64)
        study(name, args.plot if name == "mlp-sgd" else None, args.widths, args.seeds, args.params, args.lr)


if __name__ == "__main__":
    main()
