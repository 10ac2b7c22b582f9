"""The μ-limit's cost on real models: a pytorchcv CIFAR ResNet and a ``transformers`` ViT at small width,
8 inputs, SGD, and where that cost goes.

The models (under SGD, or with `--optimizer momentum` heavy-ball momentum 0.9 at the same learning rate), their loss
and learning rate are those of ``benchmarks/bench_architectures.py`` (``cases()``:
``pytorchcv-resnet`` = ``_pytorchcv("resnet", 8)``, ``vit`` = ``_hf("vit", 16)`` behind its logits wrapper),
trained on 8 random ``[3, 8, 8]`` images with 3-class labels (that file's ``_randn`` / ``_labels``).
Every timing is the process's CPU seconds (``time.process_time``) after an untimed 1-step warm-up at 64
particles in the same process (it lowers the model), with one thread unless ``OMP_NUM_THREADS`` says otherwise.

Subcommands:

* ``time``: ``limit.train`` per ``--cases particles:steps`` (``--dtype``, ``--batches``, ``--dots``, and
  ``--with`` one of the ``variants``), CPU s, wall s, s/step, peak RSS, loss first → last.
* ``profile``: one run under cProfile, its time grouped by what the engine does (hat sampling, dots,
  low-rank terms, expansions, column stores, random draws, eigendecompositions, the program walk), and
  per MatMul instruction: the kernel offsets ``F``, the components ``K`` it is applied to, its direction
  and CPU seconds (timed around ``KetInterpreter.execute``, in a second, unprofiled run).
* ``ops``: one run under ``torch.profiler`` (``with_flops``): self time by op group and the matmul FLOPs.
* ``processes``: the same run under ``torchrun --nproc-per-node N``: the systems spread over the ranks.
* ``eigh``: the eigendecompositions of a hat's Gram matrices and the product forming them, alone.
* ``folded``: one system per ``--cases`` trained as the engine runs it and with its low-rank factors as explicit
  columns (nothing folded), the largest output difference after each step.
* ``replay``: the finite-width total program (forward and backpropagation) on the model at ``--widths``, as is
  and on the eager path (below): CPU seconds and the gradients' difference from torch autograd.
* ``variants``: the same run as it is and under variants (``--variants eager full-basis``): ``eager``, the path
  the engine took before it averaged per-coordinate pullbacks as one vector-Jacobian product (``eager_pullbacks``,
  kept for comparison); ``full-basis``, an engine change emulated by a measurement hook of this file. CPU seconds
  and output differences.

Figures and the proposed changes: docs/performance.md, "Real models" (measured loaded, CPU seconds).

Run, e.g.::

    OMP_NUM_THREADS=1 python benchmarks/bench_real_limit.py time --models resnet vit --cases 1024:3
    OMP_NUM_THREADS=1 python benchmarks/bench_real_limit.py profile --models resnet --cases 1024:3
    OMP_NUM_THREADS=1 python benchmarks/bench_real_limit.py variants --models vit --cases 4096:10 --variants eager
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/bench_real_limit.py processes --models vit --cases 4096:10
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import resource
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_architectures import Case, _labels, _randn, cases  # noqa: E402
from bench_limit import profiled_matmul_flops  # noqa: E402

import tplimits as tpl  # noqa: E402
from tplimits.core.backprop import eager_pullbacks, total_program  # noqa: E402
from tplimits.core.ir import Avg, MatMul  # noqa: E402
from tplimits.core.pullback import PerCoordinateValue  # noqa: E402
from tplimits.limit.kets import HatFamily, KetInterpreter, MatrixOperator, _reduce  # noqa: E402
from tplimits.limit.mu import ParticleNetwork  # noqa: E402

MODELS = {"resnet": "pytorchcv-resnet", "vit": "vit"}
INPUTS = 8
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def task(model: str, optimizer: str = "sgd") -> tuple[Case, tpl.Limit, torch.Tensor, torch.Tensor]:
    """The model's case, its limit under ``optimizer`` (SGD, or heavy-ball momentum 0.9 at the same learning
    rate; lowered at the case's width on the case's example inputs) and the 8 inputs with their labels."""
    case = cases()[MODELS[model]]
    limit = tpl.derive(case.make, example_inputs=case.inputs(), optimizer=optimizer, width=case.width)
    return case, limit, _randn(INPUTS, 3, 8, 8), _labels(INPUTS)()


def train(case: Case, limit: tpl.Limit, X: torch.Tensor, y: torch.Tensor, particles: int, steps: int,
          dtype: torch.dtype = torch.float64, batches: int = 4, dots: str = "auto",
          distributed: bool | None = None, device: str = "cpu") -> tpl.Trajectory:
    return limit.train(X, y, steps=steps, lr=case.lr, loss=case.loss, particles=particles, batches=batches,
                       dtype=dtype, dots=dots, progress=False, distributed=distributed, device=device)


def warm_up(case: Case, limit: tpl.Limit, X: torch.Tensor, y: torch.Tensor, dtype: torch.dtype,
            device: str = "cpu") -> float:
    """One untimed step at 64 particles: lowering, setup, first-call costs (in this process alone, also under a
    process group). Returns its CPU seconds."""
    start = time.process_time()
    train(case, limit, X, y, 64, 1, dtype, batches=1, distributed=False, device=device)
    return time.process_time() - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(case: Case, limit: tpl.Limit, X: torch.Tensor, y: torch.Tensor, particles: int, steps: int,
          dtype: torch.dtype, batches: int, dots: str, device: str = "cpu") -> dict:
    cpu, wall = time.process_time(), time.perf_counter()
    traj = train(case, limit, X, y, particles, steps, dtype, batches, dots, device=device)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu": cpu, "wall": wall, "per_step": cpu / steps, "rss": peak_rss_mb(),
            "loss": float(traj.loss[-1]), "loss0": float(traj.loss[0]),
            "se": float(traj.outputs_se.max()), "dots": traj.dots}


def parse_cases(text: list[str]) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in c.split(":")) for c in text]


def load() -> str:
    return "load average " + " / ".join(f"{v:.2f}" for v in os.getloadavg())


# --------------------------------------------------------------------------------------------
# time
# --------------------------------------------------------------------------------------------


def time_report(args: argparse.Namespace) -> None:
    dtype = DTYPES[args.dtype]
    for model in args.models:
        case, limit, X, y = task(model, args.optimizer)
        print(f"# {model}: warm-up {warm_up(case, limit, X, y, dtype, args.device):.1f} CPU s; {load()}", flush=True)
        for particles, steps in parse_cases(args.cases):
            with contextlib.ExitStack() as stack:
                for name in args.with_variants:
                    stack.enter_context(VARIANTS[name](limit))
                r = timed(case, limit, X, y, particles, steps, dtype, args.batches, args.dots, args.device)
            variants = "+".join(args.with_variants) or "as is"
            print(f"| {model} | {case.width} | {particles} in {args.batches} | {steps} | {args.dtype} | {r['dots']} | "
                  f"{variants} | "
                  f"{r['cpu']:.1f} | {r['wall']:.1f} | {r['per_step']:.2f} | {r['rss']:.0f} | "
                  f"{r['loss0']:.4f} → {r['loss']:.4f} | {r['se']:.4f} | {load()} |", flush=True)


# --------------------------------------------------------------------------------------------
# profile: cProfile groups and per-instruction times
# --------------------------------------------------------------------------------------------

# (label, file suffix, function name, which time): cumulative time of an engine function, or the internal
# time of a builtin (the random draws and eigendecompositions are C calls; their callers are the hats)
GROUPS = [
    ("program walk (Interpreter.run, both halves)", "core/interpret.py", "run", "cum"),
    ("  matrix applications (KetInterpreter.matmul)", "limit/kets.py", "matmul", "cum"),
    ("    hat sampling (HatFamily.sample)", "limit/kets.py", "sample", "cum"),
    ("      eigendecompositions (torch.linalg.eigh)", "~", "linalg_eigh", "tot"),
    ("      random draws (torch.randn)", "~", "randn", "tot"),
    ("      second Gram-Schmidt test (_needs_second_pass)", "limit/kets.py", "_needs_second_pass", "cum"),
    ("    dots (HatFamily.dot)", "limit/kets.py", "dot", "cum"),
    ("    low-rank terms (MatrixOperator._low_rank)", "limit/kets.py", "_low_rank", "cum"),
    ("    expansions (_expand)", "limit/kets.py", "_expand", "cum"),
    ("    to / from canonical form (MatMulPlan.canonical + restore)", "limit/kets.py", "canonical", "cum"),
    ("", "limit/kets.py", "restore", "cum"),
    ("  column stores (_Columns.append)", "limit/kets.py", "append", "cum"),
    ("  nonlinear functions and pullbacks (KetInterpreter.evaluate)", "limit/kets.py", "evaluate", "cum"),
    ("  averages (KetInterpreter.avg; of per-coordinate pullbacks: one vjp each)", "limit/kets.py", "avg", "cum"),
    ("  vjp, in both above (torch.func.vjp)", "torch/_functorch/eager_transforms.py", "vjp", "cum"),
    ("  regroups (KetInterpreter.regroup)", "limit/kets.py", "regroup", "cum"),
    ("update (ParticleNetwork._update)", "limit/mu.py", "_update", "cum"),
    ("column stores sized for the run (MatrixOperator.reserve)", "limit/kets.py", "reserve", "cum"),
]


def cprofile_groups(stats: pstats.Stats, total: float) -> list[tuple[str, float, float]]:
    """``(label, seconds, share of total)`` for :data:`GROUPS`; entries with an empty label add to the one above."""
    rows: list[list] = []
    for label, suffix, func, which in GROUPS:
        seconds = 0.0
        for (filename, _, name), (_, _, tt, ct, _) in stats.stats.items():
            builtin = suffix == "~" and filename == "~" and f".{func}" in name
            if builtin or name == func and filename.endswith(suffix):
                seconds += tt if which == "tot" else ct
        if label:
            rows.append([label, seconds])
        else:
            rows[-1][1] += seconds
    return [(label, s, s / total) for label, s in rows]


@contextlib.contextmanager
def instruction_timer(records: list[dict]) -> Iterator[None]:
    """Time every instruction the particle systems execute (CPU seconds), restoring the interpreter after.

    A measurement hook of this benchmark only: ``KetInterpreter.execute`` is wrapped for the duration."""
    original = KetInterpreter.execute

    def execute(self: KetInterpreter, ins: object) -> object:
        op = self.values.get(ins.matrix) if isinstance(ins, MatMul) else None
        op = op if isinstance(op, MatrixOperator) else None
        # an Avg over a per-coordinate pullback's deferred values: one vector-Jacobian product
        deferred = isinstance(ins, Avg) and isinstance(self.values.get(ins.vector), PerCoordinateValue)
        before = None if op is None else ({k: f.basis._size for k, f in op.families.items()}, op.out_factors._size)
        start = time.process_time()
        out = original(self, ins)
        row = {"name": ins.name, "type": type(ins).__name__, "cpu": time.process_time() - start,
               "half": "backward" if self.cotangents else "forward", "step": self.step}
        if type(ins).__name__ == "Nonlin":
            row["fn"] = getattr(ins.fn, "__name__", type(ins.fn).__name__)
            row["per_coordinate"] = bool(getattr(ins.fn, "per_coordinate", False))
        row["averages_pullback"] = deferred
        if op is not None:
            plan = self.plan(ins)
            row.update(matrix=ins.matrix, F=plan.n_fixed, K=plan.n_components, direction=plan.direction,
                       basis=before[0], factors=before[1], P=self.n,
                       basis_after={k: f.basis._size for k, f in op.families.items()})
        records.append(row)
        return out

    KetInterpreter.execute = execute
    try:
        yield
    finally:
        KetInterpreter.execute = original


def matmul_flops(row: dict) -> float:
    """FLOPs of the products of one matrix application, from its shapes (the eigendecomposition of its ``[K, K]``
    Gram matrix is not counted; ``eigh`` times it alone). With ``r`` the own family's basis before the
    application, ``n`` its new directions, ``r'`` the other family's basis, ``s`` the low-rank factors, per
    kernel offset (``F``): ``2PrK`` (sum) + ``2PrK`` (residual) + ``2PK²`` (Gram) + ``2PKn`` (new basis) +
    ``2PK(r + n)`` (expansion of the hat) + ``4P·r'·K`` (Stein dot: sum and expansion) + ``4PsK`` (low rank).
    An estimate of the arithmetic, not a count of what the BLAS ran (a second Gram-Schmidt pass adds more)."""
    P, K, F = row["P"], row["K"], row["F"]
    own, other = ("forward", "transposed") if row["direction"] == "forward" else ("transposed", "forward")
    r, r_other, s = row["basis"][own], row["basis"][other], row["factors"]
    new = row["basis_after"][own] - r
    per_offset = (4 * P * r * K + 2 * P * K * K + 2 * P * K * new + 2 * P * K * (r + new) + 4 * P * r_other * K
                  + 4 * P * s * K)
    return F * per_offset


def instruction_report(records: list[dict], total: float, top: int) -> None:
    by_type: dict[str, float] = defaultdict(float)
    for r in records:
        by_type[f"{r['type']} ({r['half']})"] += r["cpu"]
    print("\nInstructions by type (CPU s, share of the timed run):")
    for key, s in sorted(by_type.items(), key=lambda kv: -kv[1]):
        print(f"| {key} | {s:.2f} | {s / total:.1%} |")
    by_step: dict[tuple, float] = defaultdict(float)
    for r in records:
        by_step[(r["step"], r["half"])] += r["cpu"]
    print("\nBy step (CPU s of all systems; step t's forward half and its backward half):")
    print("| step | forward | backward |\n|---|---|---|")
    for t in sorted({k[0] for k in by_step}):
        print(f"| {t} | {by_step[(t, 'forward')]:.2f} | {by_step[(t, 'backward')]:.2f} |")
    nl: dict[tuple, list] = {}
    for r in records:
        if "fn" in r:
            agg = nl.setdefault((r["name"], r["fn"], r["half"], r["per_coordinate"]), [0.0, 0])
            agg[0] += r["cpu"]
            agg[1] += 1
    print(f"\nNonlin instructions, top {top} by CPU s (per coordinate: a pullback into a scalar argument; its values "
          "are formed only when read, and the Avg after it takes one vector-Jacobian product; under the eager "
          "variant, one forward-mode pass per entry of that argument):")
    print("| instruction | function | half | per coordinate | calls | CPU s | share |\n|---|---|---|---|---|---|---|")
    for (name, fn, half, per), (cpu, calls) in sorted(nl.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {name} | {fn} | {half} | {per} | {calls} | {cpu:.2f} | {cpu / total:.1%} |")
    per = sum(v[0] for k, v in nl.items() if k[3])
    averaged = sum(r["cpu"] for r in records if r["averages_pullback"])
    print(f"All per-coordinate pullbacks: {per:.2f} CPU s ({per / total:.1%}); the Avgs taking them as one "
          f"vector-Jacobian product: {averaged:.2f} CPU s ({averaged / total:.1%})")
    mm: dict[tuple, dict] = {}
    for r in records:
        if "F" not in r:
            continue
        key = (r["name"], r["matrix"], r["direction"], r["half"], r["F"], r["K"])
        agg = mm.setdefault(key, {"cpu": 0.0, "calls": 0, "flops": 0.0, "rmax": 0})
        agg["cpu"] += r["cpu"]
        agg["calls"] += 1
        agg["flops"] += matmul_flops(r)
        agg["rmax"] = max(agg["rmax"], max(r["basis_after"].values()))
    print(f"\nMatMul instructions, top {top} by CPU s (F kernel offsets, K components per application, P particles "
          "per system; basis: the largest hat basis reached; GFLOP: shape estimate, matmul_flops):")
    print("| instruction | matrix | direction | half | F | K | calls | CPU s | share | largest basis | GFLOP "
          "| GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = sorted(mm.items(), key=lambda kv: -kv[1]["cpu"])
    for (name, matrix, direction, half, F, K), a in rows[:top]:
        print(f"| {name} | {matrix} | {direction} | {half} | {F} | {K} | {a['calls']} | {a['cpu']:.2f} | "
              f"{a['cpu'] / total:.1%} | {a['rmax']} | {a['flops'] / 1e9:.2f} | "
              f"{a['flops'] / 1e9 / max(a['cpu'], 1e-9):.1f} |")
    mm_cpu = sum(a["cpu"] for a in mm.values())
    mm_flops = sum(a["flops"] for a in mm.values())
    print(f"All MatMuls on operators: {mm_cpu:.2f} CPU s ({mm_cpu / total:.1%}), {mm_flops / 1e9:.1f} GFLOP "
          f"estimated, {mm_flops / 1e9 / max(mm_cpu, 1e-9):.1f} GFLOP/s")


def profile_report(args: argparse.Namespace) -> None:
    dtype = DTYPES[args.dtype]
    for model in args.models:
        case, limit, X, y = task(model, args.optimizer)
        warm_up(case, limit, X, y, dtype)
        for particles, steps in parse_cases(args.cases):
            profiler = cProfile.Profile(time.process_time)  # CPU seconds, as everything else here
            start = time.process_time()
            profiler.enable()
            train(case, limit, X, y, particles, steps, dtype, args.batches, args.dots)
            profiler.disable()
            total = time.process_time() - start
            stats = pstats.Stats(profiler)
            print(f"\n## {model}, {particles} particles in {args.batches} systems, {steps} steps, {args.dtype}: "
                  f"{total:.1f} CPU s under cProfile; {load()}")
            print("| what | CPU s (cumulative unless builtin) | share |\n|---|---|---|")
            for label, s, share in cprofile_groups(stats, total):
                print(f"| {label} | {s:.2f} | {share:.1%} |")
            if args.top_functions:
                stats.sort_stats("tottime").print_stats(args.top_functions)
            records: list[dict] = []
            start = time.process_time()
            with instruction_timer(records):
                train(case, limit, X, y, particles, steps, dtype, args.batches, args.dots)
            total = time.process_time() - start
            print(f"\nSame run without cProfile, instructions timed: {total:.1f} CPU s; {load()}")
            instruction_report(records, total, args.top)


@contextlib.contextmanager
def eager_path(limit: tpl.Limit) -> Iterator[None]:
    """The engine's path before it took a per-coordinate pullback and its Avg as one vector-Jacobian product:
    every setup ``limit`` has made (the warm-up makes it) with the values formed as their instruction runs
    (``eager_pullbacks``), for the duration."""
    saved = dict(limit._setups)
    for key, setup in saved.items():
        limit._setups[key] = attrs.evolve(setup, total=eager_pullbacks(setup.total))
    try:
        yield
    finally:
        limit._setups.clear()
        limit._setups.update(saved)


@contextlib.contextmanager
def full_basis_shortcut() -> Iterator[None]:
    """A hat family whose basis already spans its particles (``r = P_in`` columns) skips the residual, its Gram
    matrix and eigendecomposition: no direction can be new, and the threshold ``evals > 1e-10·‖x‖²`` would drop
    every eigenvalue of the rounding-level residual. The coefficients are taken as the engine takes them (with its
    second Gram-Schmidt pass where it takes one), so only the Gram matrix, its eigendecomposition and the sign
    convention are skipped. A measurement hook of this benchmark
    (``HatFamily.sample`` wrapped for the duration) for the proposed engine change; one process, Stein dots."""
    original = HatFamily.sample

    def sample(self: HatFamily, x: torch.Tensor, scale: float = 1.0) -> list:
        E = self.basis.cat()
        if E is None or E.shape[-1] < self.p_in or self.track_grad or self.shard is not None:
            return original(self, x, scale)
        self.basis.demand += x.shape[2]
        self.gaussians.demand += x.shape[2]
        xd = x.detach()
        coef = _reduce(E, xd)
        residual_t = torch.baddbmm(xd.mT, coef.mT, E.mT, alpha=-1)
        if self._needs_second_pass(residual_t, xd):  # as the engine does: a basis built in steps is orthonormal
            coef = coef + _reduce(E, residual_t.mT)  # only to about eps/(its smallest kept direction's size)
        return [(self.gaussians.cat(), coef * scale)]

    HatFamily.sample = sample
    try:
        yield
    finally:
        HatFamily.sample = original


VARIANTS = {"eager": eager_path, "full-basis": lambda limit: full_basis_shortcut()}


def variants_report(args: argparse.Namespace) -> None:
    """The same run as it is and under each of ``--variants`` (names joined by ``+`` combine): CPU seconds,
    the speed-up, and the largest difference of the outputs from the run as it is."""
    dtype = DTYPES[args.dtype]
    for model in args.models:
        case, limit, X, y = task(model, args.optimizer)
        warm_up(case, limit, X, y, dtype)
        for particles, steps in parse_cases(args.cases):
            start = time.process_time()
            base = train(case, limit, X, y, particles, steps, dtype, args.batches, args.dots)
            base_cpu = time.process_time() - start
            scale = float(base.outputs.abs().max())
            print(f"| {model} | {particles} in {args.batches} | {steps} | {args.dtype} | as is | {base_cpu:.1f} | — "
                  f"| — (output scale {scale:.2f}, largest output SE {float(base.outputs_se.max()):.4f}) | {load()} |",
                  flush=True)
            for variant in args.variants:
                with contextlib.ExitStack() as stack:
                    for name in variant.split("+"):
                        stack.enter_context(VARIANTS[name](limit))
                    start = time.process_time()
                    traj = train(case, limit, X, y, particles, steps, dtype, args.batches, args.dots)
                    cpu = time.process_time() - start
                diff = float((traj.outputs - base.outputs).abs().max())
                print(f"| {model} | {particles} in {args.batches} | {steps} | {args.dtype} | {variant} | {cpu:.1f} | "
                      f"{base_cpu / cpu:.2f} | {diff:.1e} | {load()} |", flush=True)


# --------------------------------------------------------------------------------------------
# replay: the finite-width total program
# --------------------------------------------------------------------------------------------


def replay_report(args: argparse.Namespace) -> None:
    """The total program (forward and backpropagation) replayed on the model at each of ``--widths``, float64, on
    the 8 inputs with a random error signal: CPU seconds per replay (best of ``--repeats``), as is and on the eager
    path, and each one's largest gradient difference from torch autograd (relative to the largest gradient)."""
    for model in args.models:
        case = cases()[MODELS[model]]
        X = _randn(INPUTS, 3, 8, 8).double()
        total = total_program(tpl.lower(case.make, example_inputs=(X.float(),), width=case.width))
        paths = {"as is": total, "eager": eager_pullbacks(total)}
        print(f"| model | width | path | CPU s per replay | gradient difference from autograd | {load()} |", flush=True)
        for width in args.widths:
            torch.manual_seed(0)
            net = case.make(width).double()
            out = net(X)
            cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
            params = dict(net.named_parameters())
            expected = torch.autograd.grad((out * cotangent).sum(), list(params.values()))
            scale = max(float(g.abs().max()) for g in expected)
            for path, program in paths.items():
                best = float("inf")
                for _ in range(args.repeats):
                    start = time.process_time()
                    grads = program.gradients_at(net, (X,), (cotangent,))
                    best = min(best, time.process_time() - start)
                diff = max(float((grads[name] - g).abs().max()) for name, g in zip(params, expected, strict=True))
                print(f"| {model} | {width} | {path} | {best:.3f} | {diff / scale:.1e} |", flush=True)


# --------------------------------------------------------------------------------------------
# ops: torch.profiler
# --------------------------------------------------------------------------------------------

OP_GROUPS = {
    "matmul": ("mm", "bmm", "baddbmm", "addmm", "matmul", "einsum", "baddbmm_", "addbmm"),
    "linalg": ("linalg_eigh", "_linalg_eigh", "linalg_qr", "linalg_solve", "cholesky"),
    "random": ("normal_", "randn"),
    "memory": ("copy_", "cat", "empty", "empty_strided", "clone", "contiguous", "zeros", "zero_", "fill_",
               "to", "_to_copy", "index_put_", "stack", "expand", "as_strided", "view", "reshape", "transpose",
               "permute", "select", "slice", "unsqueeze", "squeeze", "t", "narrow", "detach", "alias", "resize_"),
}


def op_group(name: str) -> str:
    short = name.removeprefix("aten::")
    for group, names in OP_GROUPS.items():
        if short in names:
            return group
    return "elementwise / other"


def ops_report(args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity, profile

    dtype = DTYPES[args.dtype]
    for model in args.models:
        case, limit, X, y = task(model, args.optimizer)
        warm_up(case, limit, X, y, dtype)
        for particles, steps in parse_cases(args.cases):
            with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
                train(case, limit, X, y, particles, steps, dtype, args.batches, args.dots)
            events = prof.key_averages()
            # self time of top-level ops only would double count nothing: self_cpu_time_total excludes children
            total = sum(e.self_cpu_time_total for e in events)
            groups: dict[str, float] = defaultdict(float)
            flops = profiled_matmul_flops(prof)
            for e in events:
                groups[op_group(e.key)] += e.self_cpu_time_total
            print(f"\n## {model}, {particles} particles in {args.batches} systems, {steps} steps, {args.dtype}: "
                  f"op self time {total / 1e6:.1f} s under the profiler; matmul FLOPs counted {flops / 1e9:.1f} "
                  f"GFLOP; {load()}")
            print("| op group | share of op self time |\n|---|---|")
            for g, s in sorted(groups.items(), key=lambda kv: -kv[1]):
                print(f"| {g} | {s / total:.1%} |")
            print("\n| op | calls | self s | share |\n|---|---|---|---|")
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
                print(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e6:.2f} | "
                      f"{e.self_cpu_time_total / total:.1%} |")


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------


def processes_report(args: argparse.Namespace) -> None:
    """Under torchrun: the systems spread over the ranks (limit.train under the initialized group)."""
    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun --nproc-per-node N (see the module docstring)")
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[args.dtype]
    for model in args.models:
        case, limit, X, y = task(model, args.optimizer)
        warm_up(case, limit, X, y, dtype)  # every rank lowers the model once, untimed
        for particles, steps in parse_cases(args.cases):
            dist.barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            traj = train(case, limit, X, y, particles, steps, dtype, args.batches, args.dots)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            cpus = [None] * size
            dist.all_gather_object(cpus, cpu)
            if rank == 0:
                print(f"| {model} | {particles} in {args.batches} | {steps} | {args.dtype} | {size} processes | "
                      f"wall {wall:.1f} s | CPU per rank {' / '.join(f'{c:.1f}' for c in cpus)} s | "
                      f"loss {float(traj.loss[-1])!r} | {load()} |", flush=True)
    dist.destroy_process_group()


def eigh_report(args: argparse.Namespace) -> None:
    """``torch.linalg.eigh`` of ``[F, K, K]`` Gram matrices alone (what one hat sample decomposes), and the
    ``[F, K, P] @ [F, P, K]`` product that forms them, CPU seconds per call (best of 3)."""
    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(0)
    print("| F | K | P | eigh, CPU s per call | Gram product, CPU s per call | Gram GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for F, K, P in ((1, 40, 1024), (9, 128, 1024), (9, 512, 256), (9, 512, 1024)):
        r = torch.randn(F, K, P, generator=g, dtype=dtype)
        gram = r @ r.mT
        best_e = best_g = float("inf")
        for _ in range(3):
            start = time.process_time()
            torch.linalg.eigh(gram)
            best_e = min(best_e, time.process_time() - start)
            start = time.process_time()
            _ = r @ r.mT
            best_g = min(best_g, time.process_time() - start)
        print(f"| {F} | {K} | {P} | {best_e:.4f} | {best_g:.4f} | {2 * F * K * K * P / best_g / 1e9:.1f} |")


# --------------------------------------------------------------------------------------------
# folded
# --------------------------------------------------------------------------------------------


def folded_report(args: argparse.Namespace) -> None:
    """One system of each case's particles, trained as the engine runs it (the low-rank coordinates folded into
    the cores) and with the factors kept as explicit columns (no coordinates, nothing to fold), same seed: the
    largest output difference after each step, relative to the outputs' scale."""
    for model in args.models:
        case, limit, X, y = task(model, args.optimizer)
        setup = limit.setup(X)
        loss = tpl.loss(case.loss)
        for particles, steps in parse_cases(args.cases):
            runs = []
            for explicit in (False, True):
                net = ParticleNetwork(setup, particles, 7, DTYPES[args.dtype], "cpu", "stein", case.lr, steps)
                for family in (f for op in net.operators.values() for f in op.families.values()):
                    family.remembers = family.remembers and not explicit
                runs.append(particle_outputs(net, X, y, loss, steps))
            scale = max(float(o.abs().max()) for o in runs[1])
            gaps = [float((a - b).abs().max()) / scale for a, b in zip(*runs, strict=True)]
            print(f"| {model} | {args.optimizer} | {particles} | " + ", ".join(f"{g:.1e}" for g in gaps[1:]) + " |",
                  flush=True)


def particle_outputs(net: ParticleNetwork, X: torch.Tensor, y: torch.Tensor, loss: Any, steps: int) -> list:
    """The outputs of ``steps`` full-batch steps of one particle system, before each and after the last."""
    outputs = []
    for _ in range(steps):
        interp = net.forward((X,))
        outputs.append(net.outputs(interp))
        net.backward_and_update(interp, loss.error_signal(outputs[-1], y, torch.arange(len(X))))
    outputs.append(net.outputs(net.forward((X,))))
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["time", "profile", "ops", "processes", "variants", "eigh", "replay",
                                         "folded"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--cases", nargs="+", default=["1024:3"], help="particles:steps")
    parser.add_argument("--dtype", default="float64", choices=list(DTYPES))
    parser.add_argument("--device", default="cpu", help="for 'time': where the particles live (cuda: wall s count)")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "momentum"])
    parser.add_argument("--batches", type=int, default=4, help="independent particle systems")
    parser.add_argument("--dots", default="auto", choices=["auto", "stein", "autograd"])
    parser.add_argument("--variants", nargs="+", default=["eager", "full-basis"],
                        help=f"for 'variants': engine paths or changes measured by hooks, of {list(VARIANTS)}; '+' "
                             "combines")
    parser.add_argument("--with", dest="with_variants", nargs="*", default=[], choices=list(VARIANTS),
                        help="for 'time': run under these variants (see 'variants')")
    parser.add_argument("--widths", nargs="+", type=int, default=[16, 32, 128, 512], help="for 'replay'")
    parser.add_argument("--repeats", type=int, default=3, help="for 'replay': best of this many")
    parser.add_argument("--top", type=int, default=15, help="rows of the per-instruction and per-op tables")
    parser.add_argument("--top-functions", type=int, default=0, help="also print cProfile's top functions")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the SteinBiasWarning of the convolutions is known (docs/architectures.md)
    reports = {"time": time_report, "profile": profile_report, "ops": ops_report, "processes": processes_report,
               "variants": variants_report, "eigh": eigh_report, "replay": replay_report, "folded": folded_report}
    reports[args.what](args)


if __name__ == "__main__":
    main()
