"""The Stein dots' bias against autograd dots on the network of ``tests/test_conv_dots.py``, at step 0.

The ratio ``⟨d b0|d b0⟩ / ⟨d b2|d b2⟩`` of the squared gradients of the first and last batch-norm biases of a
three-layer conv / batch-norm / ReLU network: by ``torch.autograd`` on μP finite models (``--widths``, seeds
each), and in the limit with ``--dots`` at each ``--particles`` per system (``--systems`` independent systems
each). With independent hats for ``W`` and ``Wᵀ`` (``--independent-hats``: the earlier rounds' hats,
``HatFamily.CONSISTENT = False`` and ``STEIN_SHARE = 4``) Stein's noise biases the limit's ratio upwards by about
(directions / particles); the default hats of one matrix and autograd dots (relu's point mass smoothed,
``tplimits.limit.kets.smoothed_jumps``) do not carry it. ``--bandwidth`` overrides
``JUMP_BANDWIDTH`` (a huge value drops the smoothed point mass: what per-particle autograd alone gives).

Run: ``python benchmarks/bench_conv_dots.py --particles 256 1024 --systems 8 4 --dots stein autograd``.
Prints one line per (dots, particles): mean ± standard error over systems and the CPU seconds per system.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from test_conv_dots import _BatchNormCNN, _data, _finite_ratio, _limit_ratio  # noqa: E402

import tplimits as tpl  # noqa: E402
import tplimits.limit.kets as kets  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--systems", type=int, nargs="+", default=[8, 4], help="one per --particles")
    parser.add_argument("--dots", nargs="+", default=["stein", "autograd"])
    parser.add_argument("--widths", type=int, nargs="*", default=[], help="finite reference widths (6 seeds)")
    parser.add_argument("--bandwidth", type=float, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--independent-hats", action="store_true", help="the earlier rounds' hats, for comparison")
    args = parser.parse_args()
    if args.independent_hats:
        kets.HatFamily.CONSISTENT, kets.HatFamily.STEIN_SHARE = False, 4.0
    if args.bandwidth is not None:
        kets.JUMP_BANDWIDTH = args.bandwidth
    torch.set_default_dtype(torch.float64)
    X, y = _data()
    for width in args.widths:
        mean, se = _finite_ratio(X, y, width, seeds=6)
        print(f"finite width {width}: {mean:.5f} ± {se:.5f}", flush=True)
    setup = tpl.derive(_BatchNormCNN, example_inputs=(X,), optimizer="sgd").setup(X)
    for dots in args.dots:
        for particles, systems in zip(args.particles, args.systems, strict=True):
            start = time.process_time()
            mean, se = _limit_ratio(setup, X, y, particles, systems, dots, args.device)
            cpu = (time.process_time() - start) / systems
            print(f"limit {dots:8s} {particles:5d} particles × {systems} systems: {mean:.5f} ± {se:.5f} "
                  f"({cpu:.1f} s CPU per system)", flush=True)


if __name__ == "__main__":
    main()
