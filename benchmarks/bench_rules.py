"""The rules' in-place fast paths: the NT limit's grid step and the finite optimizer step, before and after.

    python benchmarks/bench_rules.py nt                       # NT Adam step: pure whole grids vs in place, tiles
    python benchmarks/bench_rules.py nt --particles 4096 --steps 5
    python benchmarks/bench_rules.py nt --copies 8192 --sides in-place --repeats 1   # one path alone: peak RSS
    python benchmarks/bench_rules.py optimizer                # every rule: tiled pure vs fast path vs torch foreach
    python benchmarks/bench_rules.py optimizer --rules adam lion --repeats 3

Timed by this process's CPU seconds (``time.process_time``) with one thread (``torch.set_num_threads(1)``),
which a shared machine disturbs much less than the wall clock; both sides of every comparison run in the same
process, alternating, so they see the same machine.

``nt``: bench_nt.py's ``cost`` case (Adam, depth-3 relu MLP under NTP, 16 inputs in R^10, one system of
``--particles`` particles, float64) at copies P/16, P/4 and P: one :class:`TangentSystem` and its tangents (not
timed), then :class:`GridDynamics` with ``in_place=False`` (the pure rule on whole grids, the path before) and
``in_place=True`` (tiles in place, the rule's fast path) from the same start, ``--steps`` steps each on the mse
error signal fed back, ``--repeats`` times alternating; CPU ms per step (the minimum over repeats) and the largest
difference of the outputs between the two.

``optimizer``: as ``bench_limit.py optimizer`` (a depth-3 MLP of width ``--width``, two ``width × width`` hidden
matrices, float32, random gradients): :class:`TplimitsOptimizer` with the rule's fast path removed
(``descend_in_place=None``: its pure ``update`` on the same tiles, the path before), with it, and the
``torch.optim`` class with ``foreach=True`` where there is one; CPU ms per step, the minimum over repeats.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable

import attrs
import torch

import tplimits as tpl
from tplimits.limit.nt import GridDynamics, TangentSystem
from tplimits.optimizers import TplimitsOptimizer

TORCH_FOREACH: dict[str, tuple[type[torch.optim.Optimizer], dict]] = {
    "sgd": (torch.optim.SGD, {}),
    "momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "adam": (torch.optim.Adam, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adagrad": (torch.optim.Adagrad, {}),
    "adamax": (torch.optim.Adamax, {}),
}
"""Each rule's torch.optim counterpart at the rule's defaults (signsgd and lion have none in torch)."""


def nt_steps(system: TangentSystem, tangents, copies: int, in_place: bool, steps: int,
             y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """CPU seconds per step of ``steps`` grid steps from the start, and the last outputs."""
    dynamics = GridDynamics(system, tangents, copies, in_place=in_place)
    loss, rows = tpl.loss("mse"), torch.arange(y.shape[0])
    f = tangents.outputs
    start = time.process_time()
    for _ in range(steps):
        f = tangents.outputs + dynamics.step(loss.error_signal(f, y, rows)).reshape(y.shape)
    return (time.process_time() - start) / steps, f


def nt(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(16, 10, generator=g), torch.randn(16, 1, generator=g, dtype=torch.float64)
    limit = tpl.derive("mlp", optimizer="adam", param="NTP", depth=3, d_in=10, activation="relu")
    P = args.particles
    system = TangentSystem(limit.setup(X), P, 0, torch.float64, torch.device("cpu"), "stein", 0.05, args.steps)
    tangents = system.tangents(X)
    print(f"NT Adam, depth-3 relu MLP, 16 inputs, {P} particles, {args.steps} steps, CPU ms per step (one thread; "
          f"min over {args.repeats} alternating repeats)")
    for copies in args.copies or (P // 16, P // 4, P):
        sides = {"both": (False, True), "pure": (False,), "in-place": (True,)}[args.sides]
        times: dict[bool, list[float]] = {in_place: [] for in_place in sides}
        outputs: dict[bool, torch.Tensor] = {}
        for _ in range(args.repeats):
            for in_place in sides:
                seconds, outputs[in_place] = nt_steps(system, tangents, copies, in_place, args.steps, y)
                times[in_place].append(seconds)
        if len(sides) == 1:  # one side alone: for its peak memory (the process's peak RSS)
            print(f"copies {copies:>6}: {args.sides} {min(times[sides[0]]) * 1e3:8.1f} ms; all runs "
                  f"{_ms(times[sides[0]])}; peak RSS {_peak_mb():.0f} MB")
            continue
        before, after = min(times[False]), min(times[True])
        difference = float((outputs[True] - outputs[False]).abs().max())
        scale = float(outputs[False].abs().max())
        print(f"copies {copies:>6}: pure whole grids {before * 1e3:8.1f} ms, in place {after * 1e3:8.1f} ms, "
              f"ratio {before / after:.2f}; all runs {_ms(times[False])} / {_ms(times[True])}; largest output "
              f"difference {difference:.1e} (output scale {scale:.2f})")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ms(values: list[float]) -> str:
    return "/".join(f"{v * 1e3:.1f}" for v in values)


def _mlp(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                                torch.nn.Tanh(), torch.nn.Linear(width, width), torch.nn.Tanh(),
                                torch.nn.Linear(width, 1))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def _per_step(make: Callable[[], torch.optim.Optimizer], steps: int) -> float:
    opt = make()
    opt.step()  # state allocated, untimed
    start = time.process_time()
    for _ in range(steps):
        opt.step()
    return (time.process_time() - start) / steps


def optimizer(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    model = _mlp(args.width)
    params = list(model.parameters())
    print(f"finite optimizer step, depth-3 MLP of width {args.width}, float32, CPU ms per step (one thread; "
          f"{args.steps} steps, min over {args.repeats} repeats)")
    for name in args.rules:
        rule = tpl.optimizer(name)
        sides: dict[str, Callable[[], torch.optim.Optimizer]] = {
            "tiled pure": lambda rule=rule: TplimitsOptimizer(params, attrs.evolve(rule, descend_in_place=None),
                                                              lr=1e-6),
            "fast path": lambda rule=rule: TplimitsOptimizer(params, rule, lr=1e-6),
        }
        if name in TORCH_FOREACH:
            cls, options = TORCH_FOREACH[name]
            sides["torch foreach"] = lambda cls=cls, options=options: cls(params, lr=1e-6, foreach=True, **options)
        times: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(args.repeats):
            for side, make in sides.items():
                times[side].append(_per_step(make, args.steps))
        best = {side: min(v) for side, v in times.items()}
        line = f"{name:>9}: " + ", ".join(f"{side} {t * 1e3:.1f} ms" for side, t in best.items())
        line += f"; pure / fast {best['tiled pure'] / best['fast path']:.2f}"
        if "torch foreach" in best:
            line += f", fast / torch {best['fast path'] / best['torch foreach']:.2f}"
        print(line + "; all runs " + ", ".join(f"{side} {_ms(v)}" for side, v in times.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["nt", "optimizer"], nargs="+")
    parser.add_argument("--particles", type=int, default=2**13, help="nt: particles of the system")
    parser.add_argument("--copies", type=int, nargs="+", default=None, help="nt: copy populations (default P/16 P/4 P)")
    parser.add_argument("--sides", choices=["both", "pure", "in-place"], default="both",
                        help="nt: both paths alternating, or one alone (its peak RSS)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each side (the minimum counts)")
    parser.add_argument("--width", type=int, default=4096, help="optimizer: the MLP's width")
    parser.add_argument("--rules", nargs="+", default=["sgd", "momentum", "signsgd", "lion", "adam", "rmsprop",
                                                       "adagrad", "adamax"], help="optimizer: the rules timed")
    args = parser.parse_args()
    for what in args.what:
        {"nt": nt, "optimizer": optimizer}[what](args)


if __name__ == "__main__":
    main()
