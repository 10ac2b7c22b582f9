"""``nn.MultiheadAttention`` self-attention under μP against finite training: one ``Limit.check``.

The model of ``tests/test_mha_self.py`` (input Linear, self-attention with a packed ``in_proj_weight``, Linear
readout) on inputs ``[2, 4, 5]`` with 3 classes, SGD, cross-entropy, 3 steps. Prints the check's report and
its wall time; the table in docs/lowering.md ("MultiheadAttention and recurrent layers: notes") comes from it.

    python benchmarks/bench_mha_self.py --widths 64 256 1024 --seeds 8 --particles 32768 --lr 0.3
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tplimits as tpl  # noqa: E402
from tests.test_mha_self import _inputs, _SelfAttention  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--particles", type=int, default=2**15)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--uncentered", action="store_true", help="train f, not f - f_0, on both sides")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    x = _inputs()
    y = torch.randint(0, 3, (2, 4), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        limit = tpl.derive(_SelfAttention, example_inputs=(x,), optimizer="sgd")
        report = limit.check(x, y, widths=args.widths, seeds=args.seeds, steps=args.steps, lr=args.lr,
                             loss="cross_entropy", particles=args.particles, center=not args.uncentered,
                             progress=False)
    print(report.format())
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
