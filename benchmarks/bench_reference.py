"""The scale issue's reference cases: the depth-3 MLP (μP) of ``bench_limit.py`` on 16 inputs, 50 steps,
2^16 particles in 4 independent systems, SGD (lr 0.1) or Adam (lr 0.01, 1024 copies per system).

    python benchmarks/bench_reference.py run --optimizer sgd --dtype float32 --save sgd32.pt
    torchrun --nproc-per-node 2 benchmarks/bench_reference.py run --optimizer sgd --dtype float32
    python benchmarks/bench_reference.py scaling --dtype float32     # 1 and 2 processes, strong and weak
    python benchmarks/bench_reference.py compare sgd32.pt sgd64.pt   # same limit within standard error?
    python benchmarks/bench_reference.py flops                       # achieved GFLOP/s against the GEMM peak
    python benchmarks/bench_reference.py bases --particles 16384     # the hat bases' orthonormality, one system
    python benchmarks/bench_reference.py check50                     # the SGD case against finite training
    python benchmarks/bench_reference.py gpu --save gpu.pt           # every case on one GPU, 2^16 and 2^20 particles

``run`` times one training (after an untimed one-step run that lowers the model), one BLAS thread per
process; under ``torchrun`` the systems are spread over the ranks (``limit.train`` under an initialized
process group). It prints wall and CPU seconds, the final loss and the largest output standard error, and
saves the outputs and their standard errors. ``compare`` gives the z-scores of two saved runs' outputs
against their combined standard error, step by step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

import tplimits as tpl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_limit import GEMM_OPS, LR, data, gemm_peak, limit_for, profiled_matmul_flops  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def train(limit: tpl.Limit, optimizer: str, X: torch.Tensor, y: torch.Tensor, steps: int, particles: int,
          batches: int, copies: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> tpl.Trajectory:
    """One training of the reference case under ``optimizer`` (its learning rate; ``copies`` for a nonlinear rule)."""
    options = {"copies": copies} if optimizer != "sgd" else {}
    return limit.train(X, y, steps=steps, lr=LR[optimizer], particles=particles, batches=batches, progress=False,
                       dtype=dtype, seed=seed, device=device, **options)


def run(optimizer: str, dtype: str, particles: int, steps: int, batches: int, copies: int, save: str | None,
        seed: int) -> dict:
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    X, y = data()
    limit = limit_for(optimizer)
    train(limit, optimizer, X, y, 1, 1024 * batches, batches, 64, DTYPES[dtype])  # lowering, untimed
    wall, cpu = time.perf_counter(), time.process_time()
    traj = train(limit, optimizer, X, y, steps, particles, batches, copies, DTYPES[dtype], seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result = {"optimizer": optimizer, "dtype": dtype, "particles": particles, "batches": batches, "steps": steps,
              "ranks": dist.get_world_size() if dist.is_initialized() else 1, "wall": wall, "cpu_rank0": cpu,
              "loss": float(traj.loss[-1]), "max_se": float(traj.outputs_se.max())}
    if not dist.is_initialized() or dist.get_rank() == 0:
        if save:
            torch.save({"outputs": traj.outputs, "se": traj.outputs_se, **result}, save)
        print(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


GPU_CASES = [("sgd", "float64", 2**16), ("sgd", "float64", 2**20), ("sgd", "float32", 2**20),
             ("adam", "float64", 2**16), ("adam", "float64", 2**20), ("adam", "float32", 2**20)]
"""``gpu``: (optimizer, dtype, particles) in the order they run; 2^16 is the CPU's size, 2^20 the issue's GPU size."""


def gpu(device: str, steps: int, batches: int, copies: int, save: str | None, seed: int, shrink: int) -> None:
    """The reference cases on one device, one process (``shrink``: particles divided by it, for a rehearsal):
    per case the wall seconds (synchronized), the peak device memory, the final loss and the largest output
    standard error, printed as it ends; every case's outputs saved together to ``save`` after each one."""
    X, y = data()
    saved: dict[str, dict] = {}
    cuda = torch.device(device).type == "cuda"
    for optimizer in ("sgd", "adam"):
        limit = limit_for(optimizer)
        # lowering and the device's start, untimed
        train(limit, optimizer, X, y, 1, 1024 * batches, batches, 64, torch.float64, device=device)
        for case, dtype, particles in GPU_CASES:
            if case != optimizer:
                continue
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            wall = time.perf_counter()
            try:
                traj = train(limit, optimizer, X, y, steps, particles // shrink, batches, copies, DTYPES[dtype],
                             seed, device)
            except (tpl.TplimitsError, RuntimeError) as error:  # a case that fails is reported, the rest still run
                print(json.dumps({"optimizer": optimizer, "dtype": dtype, "particles": particles // shrink,
                                  "error": f"{type(error).__name__}: {error}"}), flush=True)
                continue
            if cuda:
                torch.cuda.synchronize()
            result = {"optimizer": optimizer, "dtype": dtype, "particles": particles // shrink, "batches": batches,
                      "steps": steps, "device": device, "wall": time.perf_counter() - wall,
                      "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                      "loss": float(traj.loss[-1]), "max_se": float(traj.outputs_se.max())}
            print(json.dumps(result), flush=True)
            saved[f"{optimizer}-{dtype}-{particles // shrink}"] = {"outputs": traj.outputs.cpu(),
                                                                    "se": traj.outputs_se.cpu(), **result}
            if save:
                torch.save(saved, save)


def launch(processes: int, *args: str) -> dict:
    """``run`` in fresh processes: ``processes`` gloo ranks under torchrun (1: a plain process)."""
    command = [sys.executable, __file__, "run", *args]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), __file__,
                   "run", *args]
    done = subprocess.run(command, capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def scaling(optimizer: str, dtype: str, steps: int) -> None:
    """Strong scaling (4 systems of 2^14 on 1 and 2 processes) and weak scaling (2 systems per process)."""
    cases = [("strong", 1, 4), ("strong", 2, 4), ("weak", 1, 2), ("weak", 2, 4)]
    for kind, processes, batches in cases:
        r = launch(processes, "--optimizer", optimizer, "--dtype", dtype, "--steps", str(steps),
                   "--particles", str(batches * 2**14), "--batches", str(batches))
        print(f"{kind}: {optimizer} {dtype}, {batches} systems of 2^14 particles, {steps} steps, {processes} "
              f"process(es): {r['wall']:.1f} s wall, final loss {r['loss']!r}")


def compare(first: str, second: str) -> None:
    a, b = torch.load(first), torch.load(second)
    z = (a["outputs"] - b["outputs"]) / (a["se"].square() + b["se"].square()).sqrt()
    per_step = z.flatten(1).square().mean(dim=1).sqrt()
    print(f"{first} ({a['dtype']}) against {second} ({b['dtype']}): RMS z {float(z.square().mean().sqrt()):.2f}, "
          f"largest |z| {float(z.abs().max()):.2f}; RMS z at the last step {float(per_step[-1]):.2f}; "
          f"largest RMS z of a step {float(per_step.max()):.2f} (step {int(per_step.argmax())})")
    print("RMS z every 10th step:", [round(float(v), 2) for v in per_step[::10]])


def flops(steps: int) -> None:
    """The SGD reference case's achieved matmul GFLOP/s, one of its 4 systems (2^14 particles; the profiler keeps
    every op's record, and a profiled 4-system run of 50 steps outgrew 16 GB): the profiler's matmul FLOPs over
    the unprofiled run's CPU seconds, one thread, float64, against the float64 GEMM peak measured in the same
    process before and after."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    before = gemm_peak()
    X, y = data()
    limit = limit_for("sgd")
    options = dict(steps=steps, lr=LR["sgd"], particles=2**14, batches=1, progress=False)
    limit.train(X, y, **{**options, "steps": 1, "particles": 1024})  # lowering, untimed
    start = time.process_time()
    limit.train(X, y, **options)
    seconds = time.process_time() - start
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        limit.train(X, y, **options)
    events = prof.key_averages()
    gemm = profiled_matmul_flops(prof)
    gemm_self = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / 1e6
    everything = sum(e.self_cpu_time_total for e in events) / 1e6
    peak = max(before, gemm_peak())
    # the engine's own thin shapes, from a matrix too big for the caches (105 MB): reading it bounds them
    reduce_rate, expand_rate = gemm_peak(800, 2**14, 16), gemm_peak(2**14, 800, 16)
    rate = gemm / seconds / 1e9
    print(f"float64 GEMM peak (1024^3, one thread, CPU time, best before/after the run): {peak:.1f} GFLOP/s")
    print(f"the engine's thin products alone, best of 7: [800, 2^14] @ [2^14, 16] {reduce_rate:.1f} GFLOP/s, "
          f"[2^14, 800] @ [800, 16] {expand_rate:.1f} GFLOP/s (achieved / the faster: "
          f"{rate / max(reduce_rate, expand_rate):.2f})")
    print(f"sgd, one system of 2^14 particles, {steps} steps: {seconds:.2f} CPU s, matmul {gemm / 1e9:.1f} GFLOP, "
          f"{rate:.2f} GFLOP/s over the whole run = {rate / peak:.3f} of the peak (peak / achieved {peak / rate:.2f}); "
          f"under the profiler matmuls are {gemm_self / everything:.0%} of the ops' self time, and run at "
          f"{gemm / gemm_self / 1e9:.1f} GFLOP/s of their own time (profiled)")
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    print("  top ops: " + "; ".join(f"{e.key} {e.self_cpu_time_total / 1e6:.2f} s ({e.count} calls)" for e in top))


def bases(dtype: str, particles: int, steps: int) -> None:
    """The SGD reference case's hat bases after ``steps`` steps, one system: per basis its columns, its largest
    deviation from orthonormality ``|EᵀE − I|`` (a closed form: the identity) and the applications that took a
    second Gram–Schmidt pass (``HatFamily.second_passes``; absent in engines before it), with the CPU seconds."""
    from tplimits.limit.mu import ParticleNetwork

    torch.set_num_threads(1)
    X, y = data()
    setup = limit_for("sgd").setup(X.float())  # lowered in the model's dtype, as limit.train does
    X, y = X.to(DTYPES[dtype]), y.to(DTYPES[dtype])
    net = ParticleNetwork(setup, particles, 0, DTYPES[dtype], "cpu", "stein", LR["sgd"], steps)
    loss = tpl.loss("mse")
    start = time.process_time()
    for _ in range(steps):
        interp = net.forward((X,))
        net.backward_and_update(interp, loss.error_signal(net.outputs(interp), y, torch.arange(len(X))))
    print(f"{dtype}, one system of {particles} particles, {steps} steps: {time.process_time() - start:.1f} CPU s")
    for name, operator in net.operators.items():
        for direction, family in operator.families.items():
            E = family.basis.cat()
            if E is None:
                continue
            gram = E.mT @ E
            deviation = float((gram - torch.eye(gram.shape[-1], dtype=gram.dtype)).abs().max())
            print(f"  {name} ({direction}): {E.shape[-1]} columns, max |EᵀE − I| {deviation:.1e}, second passes "
                  f"{getattr(family, 'second_passes', 'n/a')}")


def check50(steps: int) -> None:
    """The SGD reference case against finite training over all its steps: widths 256/1024/4096 × 8 seeds."""
    torch.set_num_threads(1)
    X, y = data()
    start = time.process_time()
    report = limit_for("sgd").check(X, y, widths=[256, 1024, 4096], seeds=8, steps=steps, lr=LR["sgd"],
                                    particles=2**16, progress=False)
    print(f"{time.process_time() - start:.0f} CPU s")
    print(report.format())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["run", "scaling", "compare", "flops", "bases", "check50", "gpu"])
    parser.add_argument("files", nargs="*", help="compare: two saved runs")
    parser.add_argument("--optimizer", default="sgd", choices=sorted(LR))
    parser.add_argument("--dtype", default="float64", choices=sorted(DTYPES))
    parser.add_argument("--particles", type=int, default=2**16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--copies", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None)
    parser.add_argument("--device", default="cuda", help="gpu: the device")
    parser.add_argument("--shrink", type=int, default=1, help="gpu: particles divided by this (a rehearsal)")
    args = parser.parse_args()
    if args.part == "run":
        run(args.optimizer, args.dtype, args.particles, args.steps, args.batches, args.copies, args.save, args.seed)
    elif args.part == "scaling":
        scaling(args.optimizer, args.dtype, args.steps)
    elif args.part == "flops":
        flops(args.steps)
    elif args.part == "bases":
        bases(args.dtype, args.particles, args.steps)
    elif args.part == "check50":
        check50(args.steps)
    elif args.part == "gpu":
        gpu(args.device, args.steps, args.batches, args.copies, args.save, args.seed, args.shrink)
    else:
        compare(*args.files)


if __name__ == "__main__":
    main()
