"""Tracing + lowering cost against plain ``torch.export`` of the same model.

The reference case is a 12-layer GPT-style transformer with d_model = 1024 (16 heads, d_ff = 4096).
Reported: the best of ``--repeats`` wall times for

* ``torch.export.export(model, strict=False)`` alone (what every tracer pays);
* ``tpl.lower(model, base=...)``: the user's d_model=1024 model plus a base at d_model=256
  (export of the model, a fake-tensor trace of the base, comparison, lowering, the state check);
* ``tpl.lower("transformer", width=1024, ...)``: the registered family, traced at its small trace widths.

Run: ``python benchmarks/bench_lowering.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import tplimits as tpl


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--base-width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    config = dict(n_layers=args.layers, n_heads=args.heads, vocab=256, seq_len=32, batch=2)
    arch = tpl.architecture("transformer")
    torch.manual_seed(0)
    model = arch.build(args.width, **config)
    base = arch.build(args.base_width, **config)
    inputs = arch.example_inputs(**config)
    torch.export.export(arch.build(64, **config), inputs, strict=False)  # warm up torch's own caches

    t_export, _ = best_of(lambda: torch.export.export(model, inputs, strict=False), args.repeats)
    t_base, prog = best_of(lambda: tpl.lower(model, base=base, example_inputs=inputs), args.repeats)
    t_name, _ = best_of(lambda: tpl.lower("transformer", width=args.width, **config), args.repeats)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.layers}-layer GPT-style transformer, d_model={args.width}, {params / 1e6:.0f}M parameters, "
          f"{len(prog)} program instructions {prog.counts()}")
    print(f"torch.export alone                         : {t_export:6.3f} s")
    print(f"tpl.lower(model, base=d_model {args.base_width:<4})        : {t_base:6.3f} s   "
          f"({t_base / t_export:.2f} x torch.export)")
    print(f"tpl.lower('transformer', width={args.width})      : {t_name:6.3f} s   "
          f"({t_name / t_export:.2f} x torch.export)")


if __name__ == "__main__":
    main()
