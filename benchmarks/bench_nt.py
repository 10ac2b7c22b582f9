"""The NT limit of Adam under the paper's Ch. 5 protocol, and what one NT step costs.

    python benchmarks/bench_nt.py protocol          # limit vs finite NTP widths, PNG nt-adam-protocol.png
    python benchmarks/bench_nt.py cost              # seconds per step against the step and against copies
    python benchmarks/bench_nt.py protocol --samples 100 --widths 64 512 4096 --seeds 10 --steps 20

Protocol (Tensor Programs IVb, Ch. 5; MATH.md §10): relu MLP with 4 hidden layers under NTP, inputs
in R^10, one output, mse on random targets, Adam (lr 0.2, eps 1e-4), full batch, the initial function
subtracted (center=True), seeds per width. The defaults are smaller than the paper's (samples,
widths, steps) so that a run fits a few minutes on 2 CPU cores; the flags give the paper's sizes.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import tplimits as tpl


def protocol(args: argparse.Namespace) -> None:
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(args.samples, 10, generator=g), torch.randn(args.samples, 1, generator=g)
    limit = tpl.derive("mlp", optimizer="adam", param="NTP", depth=4, d_in=10, activation="relu",
                       optimizer_options={"eps": 1e-4})
    start = time.perf_counter()
    traj = limit.train(X, y, steps=args.steps, lr=0.2, particles=args.particles, batches=4, center=True,
                       copies=args.copies, progress=False)
    print(f"limit: {args.particles} particles (4 systems), copies {args.copies or 'default'}, "
          f"{time.perf_counter() - start:.1f} s; largest output SE {float(traj.outputs_se.max()):.4f}")
    report = limit.check(X, y, widths=args.widths, seeds=args.seeds, steps=args.steps, lr=0.2, center=True,
                         trajectory=traj, progress=False)
    print(report.format())
    path = report.plot(args.plot)
    print(f"plot: {path}")


def cost(args: argparse.Namespace) -> None:
    """Seconds per step (after the tangents) at several step counts and copy populations."""
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(16, 10, generator=g), torch.randn(16, 1, generator=g)
    limit = tpl.derive("mlp", optimizer="adam", param="NTP", depth=3, d_in=10, activation="relu")
    particles = args.particles
    limit.train(X, y, steps=1, lr=0.05, particles=256, batches=1, progress=False)  # lowering, not timed
    for copies in (particles // 16, particles // 4, particles):
        timings = []
        for steps in (5, 10, 20):
            start = time.perf_counter()
            limit.train(X, y, steps=steps, lr=0.05, particles=particles, batches=1, center=True, copies=copies,
                        progress=False)
            timings.append((steps, time.perf_counter() - start))
        (s0, t0), (s1, t1) = timings[0], timings[-1]
        per_step = (t1 - t0) / (s1 - s0)
        print(f"copies {copies:>6}: " + ", ".join(f"{s} steps {t:.2f} s" for s, t in timings)
              + f"; {per_step * 1e3:.1f} ms per step (from the difference)")
    for p in (particles // 4, particles // 2, particles):
        start = time.perf_counter()
        limit.train(X, y, steps=10, lr=0.05, particles=p, batches=1, center=True, copies=256, progress=False)
        print(f"particles {p:>6}, copies 256: 10 steps {time.perf_counter() - start:.2f} s")
    print(f"(cost exponent in particles at fixed copies: fit log time against log particles; "
          f"expected about 1; {math.log2(particles)} = log2 of the largest count)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["protocol", "cost"], nargs="+")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 512, 4096])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--particles", type=int, default=2**13)
    parser.add_argument("--copies", type=int, default=None)
    parser.add_argument("--plot", default="nt-adam-protocol.png")
    args = parser.parse_args()
    for what in args.what:
        {"protocol": protocol, "cost": cost}[what](args)


if __name__ == "__main__":
    main()
