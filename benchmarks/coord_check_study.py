"""Coordinate-check slopes for every built-in family under SGD and Adam, over widths 128-2048.

For μP the change of every vector value should stay Θ(1) (slope 0 ± 0.1); for NTP it should fall
like n^-1/2; SP (constant learning rate) should show growth. Prints one table per family and
optimizer. Run: ``python benchmarks/coord_check_study.py [--families mlp transformer] [--seeds 1]``.
The ResNet runs with one stage (conv/BN/ReLU blocks with residuals, pooling, head) so that 2048
channels stay affordable on a CPU (a second stage would run at 4096 channels).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from tplimits import coord_check

WIDTHS = {"mlp": (128, 256, 512, 1024, 2048), "decorrelated-mlp": (128, 256, 512, 1024, 2048),
          "transformer": (128, 256, 512, 1024, 2048), "resnet": (128, 256, 512, 1024, 2048)}
LR = {"sgd": 0.1, "adam": 0.01}
CONFIG = {"transformer": {"n_layers": 1, "n_heads": 4}, "resnet": {"stages": 1, "blocks": 1}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", nargs="*", default=list(WIDTHS))
    parser.add_argument("--optimizers", nargs="*", default=["sgd", "adam"])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--params", nargs="*", default=["SP", "NTP", "muP"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_default_dtype(torch.float32)
    for name in args.families:
        for optimizer in args.optimizers:
            start = time.perf_counter()
            report = coord_check(name, params=tuple(args.params), optimizer=optimizer, widths=WIDTHS[name],
                                 steps=args.steps, lr=LR[optimizer], seeds=args.seeds, **CONFIG.get(name, {}))
            elapsed = time.perf_counter() - start
            print(f"== {name} / {optimizer} (lr {LR[optimizer]}, widths {WIDTHS[name]}, {elapsed:.0f} s)")
            for param, rep in report.reports.items():
                slopes = rep.hidden_change_slopes
                spectral = [slope for _, slope in rep.spectral.values()]
                spec = f"; spectral slopes [{min(spectral):.3f}, {max(spectral):.3f}]" if spectral else ""
                print(f"  {param:>4}: change slopes [{min(slopes):.3f}, {max(slopes):.3f}] over {len(slopes)} "
                      f"vectors{spec} -> {rep.verdict}", flush=True)


if __name__ == "__main__":
    main()
