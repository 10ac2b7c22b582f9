"""Cost of the μ-limit engine: time and peak memory against particles and steps (SGD and Adam), the
reference case, and cost at accuracy against finite-width seed ensembles.

    python benchmarks/bench_limit.py            # everything (a few minutes on 2 CPU cores)
    python benchmarks/bench_limit.py reference  # only the reference case

All ratios are measured in one run on one machine.
"""

from __future__ import annotations

import math
import resource
import sys
import time

import torch

import tplimits as tpl
from tplimits.limit.api import batch_schedule
from tplimits.limit.check import finite_outputs


def data(M: int, d_in: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, d_in, generator=g, dtype=torch.float64), torch.randn(M, 1, generator=g, dtype=torch.float64)


def timed(optimizer: str, particles: int, steps: int, M: int = 16, lr: float | None = None) -> tuple[float, object]:
    X, y = data(M)
    limit = tpl.derive("mlp", optimizer=optimizer, depth=3, d_in=16)
    lr = lr if lr is not None else (0.5 if optimizer == "sgd" else 0.02)
    start = time.perf_counter()
    traj = limit.train(X, y, steps=steps, lr=lr, particles=particles, batches=4, progress=False)
    return time.perf_counter() - start, traj


def slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reference() -> None:
    seconds, traj = timed("sgd", 2**16, 50)
    print(f"reference: depth-3 tanh MLP, 16 inputs, 50 steps, 2^16 particles, SGD: {seconds:.1f} s "
          f"({traj.dots} dots), max output se {traj.outputs_se.max():.4f}, peak RSS {peak_mb():.0f} MB")


def scaling() -> None:
    for optimizer, sizes in (("sgd", [2**12, 2**14, 2**16]), ("adam", [2**10, 2**11, 2**12])):
        times = [timed(optimizer, p, 10)[0] for p in sizes]
        print(f"{optimizer}: particles {sizes} (10 steps): {[f'{t:.2f}' for t in times]} s, "
              f"exponent {slope(sizes, times):.2f}")
        steps = [10, 20, 40]
        p = sizes[1]
        times = [timed(optimizer, p, s)[0] for s in steps]
        print(f"{optimizer}: steps {steps} ({p} particles): {[f'{t:.2f}' for t in times]} s, "
              f"exponent {slope(steps, times):.2f}; peak RSS so far {peak_mb():.0f} MB")


def cost_at_accuracy(target: float = 0.01, steps: int = 20) -> None:
    """Time for the limit to reach MC standard error ``target`` vs time for finite-width seed ensembles to
    get within ``target`` (RMS over steps and outputs) of it."""
    X, y = data(16)
    limit = tpl.derive("mlp", optimizer="sgd", depth=3, d_in=16)
    particles, (seconds, traj) = 2**12, (0.0, None)
    while True:
        start = time.perf_counter()
        traj = limit.train(X, y, steps=steps, lr=0.5, particles=particles, batches=4, progress=False)
        seconds = time.perf_counter() - start
        if traj.outputs_se.square().mean().sqrt() <= target:
            break
        particles *= 2
    print(f"limit: {particles} particles, RMS se {traj.outputs_se.square().mean().sqrt():.4f}, {seconds:.1f} s")
    reference_limit = traj.outputs
    schedule = batch_schedule(16, None, steps, 0)
    for width in (256, 1024, 4096):
        start = time.perf_counter()
        runs = []
        while True:
            runs.append(finite_outputs(limit, X, y, 16, width, len(runs), steps, 0.5, "mse", schedule,
                                       torch.float64))
            mean = torch.stack(runs).mean(0)
            gap = (mean - reference_limit).square().mean().sqrt()
            if gap <= target or len(runs) >= 64:
                break
        t = time.perf_counter() - start
        print(f"finite width {width}: {len(runs)} seeds, RMS gap of the seed mean {gap:.4f}, {t:.1f} s, "
              f"ratio finite/limit {t / seconds:.2f}")


if __name__ == "__main__":
    which = sys.argv[1:] or ["reference", "scaling", "accuracy"]
    if "reference" in which:
        reference()
    if "scaling" in which:
        scaling()
    if "accuracy" in which:
        cost_at_accuracy()
