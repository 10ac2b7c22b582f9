"""Bisecting Swin's μ-limit check (issue 12): the gap between the μ-limit and finite μP training, width by width,
for reduced Swin variants.

Each variant is ``SwinForImageClassification`` from the config of ``bench_architectures.py`` (image 8, patch 2,
embed_dim = width, depths [1], 2 heads, window 2, mlp_ratio 2; 2 images, 3 labels) with one component changed:
``norel`` adds no relative position bias to the logits, ``window4`` attends in one window over the whole 4 × 4
grid, ``noembnorm`` drops the layer norm after the patch embedding. ``vit`` is the matrix's ViT, for comparison,
and ``vit-patch2`` that ViT on Swin's 16 patches of 2 × 2. The limit is trained once per variant
(``--particles`` in ``--batches`` systems, ``--optimizer``, centered unless ``--uncentered``); the finite models
at ``--widths`` × ``--seeds`` are compared with it as ``Limit.check`` compares them. For every width the row
prints the per-seed gap and the seed-mean gap, relative to the trajectory's scale, and the seed-mean gap in its
standard errors; then the check's slope and verdict, and with ``--subsets K`` the check of each of K disjoint
groups of the seeds against the same limit.

Run: ``python benchmarks/bench_swin.py --variants base norel`` (``--help`` lists the variants).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn

import tplimits as tpl
from tplimits.limit.check import CheckReport, compare, finite_outputs
from tplimits.limit.runs import batch_schedule, default_dtype


class ZeroBias(nn.Module):
    """Stands in for ``SwinRelativePositionBias``: no bias added to the attention logits."""

    def __init__(self, heads: int, area: int) -> None:
        super().__init__()
        self.shape = (1, heads, area, area)

    def forward(self) -> torch.Tensor:
        return torch.zeros(self.shape)


class Swin(nn.Module):
    """``SwinForImageClassification`` at ``width`` with the changes of ``variant``."""

    def __init__(self, width: int, variant: str) -> None:
        super().__init__()
        import transformers as hf

        config = hf.SwinConfig(image_size=8, patch_size=2, num_channels=3, embed_dim=width, depths=[1], num_heads=[2],
                               window_size=4 if variant == "window4" else 2, mlp_ratio=2.0, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0, drop_path_rate=0.0, num_labels=3)
        self.model = hf.SwinForImageClassification(config)
        attention = self.model.swin.encoder.layers[0].blocks[0].attention
        if variant in ("norel", "norel-noembnorm"):
            table = attention.relative_position_bias.relative_position_bias_table
            attention.relative_position_bias = ZeroBias(table.shape[1], attention.relative_position_bias.window_area)
        if variant in ("noembnorm", "norel-noembnorm"):
            self.model.swin.embeddings.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


class ViT(nn.Module):
    """``bench_architectures.py``'s ViT (passes there), for comparison: patch 4, one layer, 2 heads."""

    def __init__(self, width: int, patch: int = 4) -> None:
        super().__init__()
        import transformers as hf

        self.model = hf.ViTForImageClassification(hf.ViTConfig(
            hidden_size=width, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * width, image_size=8,
            patch_size=patch, num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


VARIANTS = ("base", "norel", "window4", "noembnorm", "norel-noembnorm", "vit", "vit-patch2")


def _summary(report: CheckReport, widths: list[int]) -> list[str]:
    return [f"{w}: gap {float(g):.3f} ± {float(gs):.3f}, mean gap {float(m):.3f} ({float(ms):.1f} SE)"
            for w, g, gs, m, ms in zip(widths, report.gap / report.scale, report.gap_se / report.scale,
                                       report.mean_gap / report.scale, report.mean_gap / report.mean_gap_se,
                                       strict=True)]


def run(variant: str, widths: list[int], seeds: int, particles: int, batches: int, lr: float, steps: int,
        optimizer: str, center: bool = True, subsets: int = 1, dots: str = "auto") -> None:
    """The check of ``variant`` with all ``seeds``, then (``subsets`` > 1) with each of that many disjoint groups
    of them against the same limit: how far a check with fewer seeds scatters."""
    X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (2,), generator=torch.Generator().manual_seed(1))
    make: Callable[[int], nn.Module] = (ViT if variant == "vit" else (lambda w: ViT(w, 2)) if variant == "vit-patch2"
                                        else lambda w: Swin(w, variant))
    limit = tpl.derive(make, example_inputs=(X,), optimizer=optimizer)
    start = time.process_time()
    trajectory = limit.train(X, y, steps=steps, lr=lr, loss="cross_entropy", particles=particles, batches=batches,
                             progress=False, center=center, dots=dots)
    limit_cpu = time.process_time() - start
    start = time.process_time()
    schedule = batch_schedule(len(X), None, steps, 0)  # as Limit.check: full batches
    runs = torch.stack([torch.stack([finite_outputs(limit, X, y, len(X), w, seed, steps, lr, "cross_entropy", schedule,
                                                    torch.float64, center) for seed in range(seeds)])
                        for w in widths])  # [widths, seeds, steps + 1, outputs...]
    finite_cpu = time.process_time() - start
    report = compare(runs, trajectory, tuple(widths))
    centered = "centered" if center else "uncentered"
    print(f"{variant} ({optimizer} lr {lr}, {steps} steps, {centered}, {particles} particles in {batches} systems, "
          f"{dots} dots, "
          f"{seeds} seeds; scale {report.scale:.3g}, floor {report.floor / report.scale:.4f}; CPU s: limit "
          f"{limit_cpu:.0f}, finite {finite_cpu:.0f})\n  " + "\n  ".join(_summary(report, widths))
          + f"\n  slope {report.slope:.2f} ± {report.slope_se:.2f}: {report.status}", flush=True)
    size = seeds // subsets
    for k in range(subsets if subsets > 1 else 0):
        part = compare(runs[:, k * size:(k + 1) * size], trajectory, tuple(widths))
        print(f"  seeds {k * size}-{(k + 1) * size - 1}: slope {part.slope:.2f} ± {part.slope_se:.2f}, "
              f"{float(part.mean_gap[-1] / part.mean_gap_se[-1]):.1f} SE at width {widths[-1]}: {part.status}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=["base"], choices=VARIANTS)
    parser.add_argument("--widths", nargs="*", type=int, default=[32, 128, 512])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--particles", type=int, default=2**14)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--subsets", type=int, default=1, help="also check each of this many disjoint groups "
                        "of the seeds against the same limit")
    parser.add_argument("--dots", default="auto", choices=("auto", "stein", "autograd"),
                        help="the limit's dot terms: autograd has no Stein bias (Swin: 32 components)")
    parser.add_argument("--uncentered", action="store_true", help="train f itself, not f - f_0, on both sides")
    args = parser.parse_args()
    with default_dtype(torch.float64), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for variant in args.variants:
            run(variant, args.widths, args.seeds, args.particles, args.batches, args.lr, args.steps, args.optimizer,
                not args.uncentered, args.subsets, args.dots)


if __name__ == "__main__":
    main()
