"""Cost of the μ-limit engine: time and peak memory against particles and steps (SGD and Adam), the
reference case, and cost at accuracy against finite-width seed ensembles.

    python benchmarks/bench_limit.py                            # everything (about 6 minutes on 2 CPU cores)
    python benchmarks/bench_limit.py reference                  # only the reference case
    python benchmarks/bench_limit.py reference scaling --device cuda
    python benchmarks/bench_limit.py copies                     # Adam's grids against a copy population
    python benchmarks/bench_limit.py reference-adam             # the reference case under Adam, by copies
    python benchmarks/bench_limit.py copies-accuracy            # copy populations against the dense grid
    python benchmarks/bench_limit.py optimizer                  # the finite optimizer step against torch.optim
    python benchmarks/bench_limit.py processes                  # 1 and 2 gloo processes (torchrun)
    python benchmarks/bench_limit.py shard                      # one system sharded over 1 and 2 gloo processes
    python benchmarks/bench_limit.py accuracy --data digits --optimizer adam --steps 20 --cpu-time
    python benchmarks/bench_limit.py accuracy --data digits --steps 50 --target 0.003 --cpu-time --save R.json
    python benchmarks/bench_limit.py accuracy --cpu-time --retime R.json   # only the limit again, new ratios
    python benchmarks/bench_limit.py flops                      # achieved GFLOP/s against the float64 GEMM peak
    python benchmarks/bench_limit.py linear-speed --before DIR  # SGD: this engine against the one in source tree DIR
    python benchmarks/bench_limit.py adam-speed --before DIR    # Adam with copy populations, the same comparison
    python benchmarks/bench_limit.py copies optimizer --before DIR --cpu-time  # those parts on both engines
    python benchmarks/bench_limit.py thin                       # the thin products in both orientations
    python benchmarks/bench_limit.py mirror-threshold           # sums from rows against transposed, per K
    python benchmarks/bench_limit.py grid-orientation           # a copy grid's products in both orientations
    python benchmarks/bench_limit.py elementwise                # sqrt against rsqrt; fresh tiles against a buffer
    python benchmarks/bench_limit.py normals                    # the hat Gaussians' draws against torch.randn

The task is a depth-3 tanh MLP (μP) fit to 16 random Gaussian inputs in 16 dimensions with random
targets, mse, full batch. Learning rates (SGD 0.1, Adam 0.01) keep 50 steps of training stable: at
SGD lr ≥ 0.2 finite models of width 512-8192 show loss spikes whose timing changes from seed to seed
(edge of stability), the trajectory is chaotic and no finite particle count pins it down.

Every configuration runs in a fresh process, so its peak resident memory is its own. All ratios are
measured in one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from typing import Any

import torch

import tplimits as tpl
from tplimits.limit.check import finite_outputs
from tplimits.limit.mu import ParticleNetwork
from tplimits.limit.runs import batch_schedule

LR = {"sgd": 0.1, "adam": 0.01}
MEMORY = {"cpu": "RSS", "cuda": "GPU memory"}
SCALING = {  # optimizer: (particle counts, at steps; step counts, at particles)
    "cpu": {"sgd": ([2**12, 2**14, 2**16], 10, [10, 20, 40], 2**14),
            "adam": ([2**11, 2**12, 2**13, 2**14], 10, [10, 20, 40], 2**12)},
    "cuda": {"sgd": ([2**14, 2**16, 2**18, 2**20], 10, [10, 20, 40], 2**16),
             "adam": ([2**12, 2**13, 2**14, 2**15, 2**16], 10, [10, 20, 40], 2**14)},
}


def data(M: int = 16, d_in: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, d_in, generator=g, dtype=torch.float64), torch.randn(M, 1, generator=g, dtype=torch.float64)


def limit_for(optimizer: str) -> tpl.Limit:
    return tpl.derive("mlp", optimizer=optimizer, depth=3, d_in=16)


def train(optimizer: str, particles: int, steps: int, device: str = "cpu",
          copies: int | None = None) -> tuple[float, tpl.Trajectory]:
    """One timed run, after a small untimed one that lowers the model and warms the device up."""
    X, y = data()
    limit = limit_for(optimizer)
    limit.train(X, y, steps=1, lr=LR[optimizer], particles=1024, batches=4, device=device, progress=False)
    start = time.perf_counter()
    traj = limit.train(X, y, steps=steps, lr=LR[optimizer], particles=particles, batches=4, device=device,
                       progress=False, copies=copies)
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start, traj


DEVICE = "cpu"


def measure(optimizer: str, particles: int, steps: int, copies: int | None = None) -> dict:
    """Time, peak memory and largest output standard error of one run, in a fresh process."""
    done = subprocess.run([sys.executable, __file__, "--device", DEVICE, "one", optimizer, str(particles), str(steps),
                           str(copies or 0)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def one(optimizer: str, particles: str, steps: str, copies: str = "0") -> None:
    before = peak_mb()
    seconds, traj = train(optimizer, int(particles), int(steps), DEVICE, int(copies) or None)
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if DEVICE != "cpu" else 0.0
    print(json.dumps({"seconds": seconds, "peak_mb": gpu_mb if DEVICE != "cpu" else peak_mb(), "baseline_mb": before,
                      "max_se": float(traj.outputs_se.max()), "dots": traj.dots}))


def slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reference() -> None:
    r = measure("sgd", 2**16, 50)
    print(f"reference on {DEVICE}: depth-3 tanh MLP, 16 inputs, 50 steps, 2^16 particles (4 systems of 2^14), SGD "
          f"lr 0.1: {r['seconds']:.1f} s ({r['dots']} dots), max output se {r['max_se']:.4f}, peak {MEMORY[DEVICE]} "
          f"{r['peak_mb']:.0f} MB")


def reference_adam(copies: tuple[int, ...] = (1024, 4096, 2**14)) -> None:
    """The reference case under Adam (lr 0.01) with copy populations of each system's 2^14 particles (2^14:
    the dense same-population grid, the engine before copy populations)."""
    for c in copies:
        r = measure("adam", 2**16, 50, c)
        print(f"reference on {DEVICE}, Adam, copies {c}: {r['seconds']:.1f} s, max output se {r['max_se']:.4f}, "
              f"peak {MEMORY[DEVICE]} {r['peak_mb']:.0f} MB")


def scaling() -> None:
    for optimizer, (sizes, fixed_steps, step_counts, fixed_particles) in SCALING[DEVICE].items():
        for label, xs, runs in (
            (f"particles ({fixed_steps} steps)", sizes, [measure(optimizer, p, fixed_steps) for p in sizes]),
            (f"steps ({fixed_particles} particles)", step_counts,
             [measure(optimizer, fixed_particles, s) for s in step_counts]),
        ):
            seconds = [r["seconds"] for r in runs]
            print(f"{optimizer}: {label} {xs}: {', '.join(f'{t:.1f}' for t in seconds)} s, "
                  f"exponent {slope(xs, seconds):.2f}; peak {MEMORY[DEVICE]} "
                  f"{', '.join(str(round(r['peak_mb'])) for r in runs)} MB (RSS after imports "
                  f"{runs[0]['baseline_mb']:.0f} MB)")


CLOCK = time.perf_counter  # --cpu-time: time.process_time, this process's CPU seconds (robust to a shared machine)


class TimedGrids(ParticleNetwork):
    """A particle system that adds up the time its hidden matrices' gradient updates take."""

    grid_seconds = 0.0

    def _matrix_gradient(self, *args: Any, **kwargs: Any) -> None:
        start = CLOCK()
        super()._matrix_gradient(*args, **kwargs)
        self.grid_seconds += CLOCK() - start


def grid_run(particles: int, copies: int | None, steps: int = 10) -> tuple[float, float]:
    """Seconds of ``steps`` Adam steps of one system, and of its grid updates alone."""
    X, y = data()
    limit = limit_for("adam")
    setup = limit.setup(X.float())  # lowered in the default dtype, as train lowers it
    loss = tpl.loss("mse")
    net = TimedGrids(setup, particles, 0, torch.float64, DEVICE, "stein", LR["adam"], steps, copies=copies)
    start = CLOCK()
    for _ in range(steps):
        interp = net.forward((X.to(DEVICE),))
        out = net.outputs(interp)
        net.backward_and_update(interp, loss.error_signal(out, y.to(out.device), torch.arange(len(X))))
    if DEVICE != "cpu":
        torch.cuda.synchronize()
    return CLOCK() - start, net.grid_seconds


def copies_scaling() -> None:
    """Adam (depth-3 MLP, 10 steps, one system) against particles per system: the grids against a fixed copy
    population (cost ∝ P·P′: exponent 1 expected), at a fixed ratio P′ = P/16 (∝ P²: exponent 2) and
    the dense same-population grid (P²)."""
    grid_run(1024, 64, 1)  # lowering and warm-up, untimed
    sizes = [2**10, 2**11, 2**12, 2**13]
    for label, copies_of in (("copies 256", lambda p: 256), ("copies P/16", lambda p: p // 16),
                             ("dense grid", lambda p: None)):
        runs = [grid_run(p, copies_of(p)) for p in sizes[: 3 if copies_of(1) is None else 4]]
        xs = sizes[: len(runs)]
        total, grids = [r[0] for r in runs], [r[1] for r in runs]
        print(f"adam, {label}: particles per system {xs}: total {', '.join(f'{t:.2f}' for t in total)} s "
              f"(exponent {slope(xs, total):.2f}); grid updates {', '.join(f'{t:.2f}' for t in grids)} s "
              f"(exponent {slope(xs, grids):.2f})")


def copies_accuracy(per_system: int = 2**12, batches: int = 8, steps: int = 10) -> None:
    """Adam (depth-3 MLP, 16 inputs) with copy populations against the dense same-population grid of the
    same seed: the RMS standard error of the outputs, and their RMS difference in combined standard errors."""
    X, y = data()
    limit = limit_for("adam")
    options = dict(steps=steps, lr=LR["adam"], particles=per_system * batches, batches=batches, progress=False)
    dense = limit.train(X, y, copies=per_system, **options)
    print(f"adam, {batches} systems of {per_system} particles, {steps} steps: dense grid RMS se "
          f"{float(dense.outputs_se.square().mean().sqrt()):.4f}, {dense.seconds:.1f} s")
    for copies in (per_system // 64, per_system // 16, per_system // 4):
        cut = limit.train(X, y, copies=copies, **options)
        z = (cut.outputs - dense.outputs) / (cut.outputs_se.square() + dense.outputs_se.square()).sqrt()
        print(f"  copies {copies} (P/{per_system // copies}): RMS se {float(cut.outputs_se.square().mean().sqrt()):.4f}"
              f", RMS difference to the dense grid {float(z.square().mean().sqrt()):.2f} se (max "
              f"{float(z.abs().max()):.2f}), {cut.seconds:.1f} s")


def spread_one(steps: int = 20, particles: int = 2**16) -> None:
    """One SGD run of the reference task (4 systems) on the ranks torchrun started, one thread each."""
    import os

    import torch.distributed as dist
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    X, y = data()
    limit = limit_for("sgd")
    limit.train(X, y, steps=1, lr=LR["sgd"], particles=1024, batches=4, progress=False)  # lowering, untimed
    start = time.perf_counter()
    traj = limit.train(X, y, steps=steps, lr=LR["sgd"], particles=particles, batches=4, progress=False)
    seconds = time.perf_counter() - start
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps({"seconds": seconds, "loss": traj.loss[-1].item()}))


def spread_scaling() -> None:
    """Strong scaling of the independent systems over 1 and 2 gloo processes (torchrun), one thread each."""
    for n in (1, 2):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), __file__,
                               "spread-one"], capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"sgd, 2^16 particles in 4 systems, 20 steps, {n} process(es): {r['seconds']:.1f} s, final loss "
              f"{r['loss']!r}")


SHARD_CASES = {  # case: (architecture, optimizer, parametrization, particles of the one system, copies, steps)
    "sgd": ("mlp", "sgd", "muP", 2**15, None, 10),
    "adam": ("mlp", "adam", "muP", 2**13, 1024, 5),
    "sgd-normalized": ("mlp", "sgd", "muP-normalized", 2**13, 1024, 5),  # every update divided by its whole norm
    "nt-adam": ("mlp", "adam", "NTP", 2**14, 1024, 5),  # the NT limit: tangents, and grids against the copies
    "decorrelated-sgd": ("decorrelated-mlp", "sgd", "muP", 2**15, None, 10),  # a non-gradient rule's rescaling
}


def shard_one(case: str) -> None:
    """One system of the reference task sharded over the ranks torchrun started (``distributed="shard"``;
    one process: ``distributed=False``), one thread each: seconds, final loss, this rank's grid entries."""
    import os

    import torch.distributed as dist

    from tplimits.limit.mu import grid_entries
    from tplimits.limit.nt import grid_entries as nt_grid_entries
    ranks = 1
    if "RANK" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("gloo")
        ranks = dist.get_world_size()
    mode = "shard" if ranks > 1 else False
    torch.set_num_threads(1)
    arch, optimizer, param, particles, copies, steps = SHARD_CASES[case]
    X, y = data()
    limit = tpl.derive(arch, optimizer=optimizer, param=param, depth=3, d_in=16)
    limit.train(X, y, steps=1, lr=LR[optimizer], particles=256, batches=1, progress=False, distributed=mode,
                copies=copies and 64)  # lowering, untimed
    start = time.perf_counter()
    traj = limit.train(X, y, steps=steps, lr=LR[optimizer], particles=particles, batches=1, progress=False,
                       distributed=mode, copies=copies)
    seconds = time.perf_counter() - start
    state = 1 + sum(torch.is_tensor(v) for v in limit.rule.init_state(torch.zeros(1)).values())
    setup = limit.setup(X.to(torch.get_default_dtype()))  # programs are lowered in the default dtype
    entries = nt_grid_entries if setup.regime == "operator" else grid_entries
    low_rank = limit.rule.linear and limit.param.update == "plain"  # low-rank factors or a kernel: no grids
    grids = 0 if low_rank else entries(setup, particles, copies) * state // ranks
    if ranks == 1 or dist.get_rank() == 0:
        print(json.dumps({"seconds": seconds, "loss": traj.loss[-1].item(), "grid_mib": grids * 8 / 2**20,
                          "peak_rss_mb": peak_mb()}))


def rounding_sensitivity(particles: int = 4096, steps: int = 10) -> None:
    """How far one process's SGD run moves when only the order of its sums changes (1 or 2 BLAS threads):
    the scale of agreement to expect between a sharded run and one process."""
    X, y = data()
    limit = limit_for("sgd")
    outputs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outputs.append(limit.train(X, y, steps=steps, lr=LR["sgd"], particles=particles, batches=1, progress=False,
                                   distributed=False).outputs)
    gaps = [float((outputs[0][t] - outputs[1][t]).abs().max()) for t in range(steps + 1)]
    print(f"sgd, one system of {particles} particles, 1 against 2 BLAS threads, largest output difference by step: "
          + " ".join(f"{g:.1e}" for g in gaps))


def shard_scaling() -> None:
    """One particle system in one process and sharded over 2 gloo processes (torchrun), one thread each."""
    for case, (_, _, _, particles, copies, steps) in SHARD_CASES.items():
        for n in (1, 2):
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), __file__,
                                   "shard-one", case], capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{case}, one system of {particles} particles (copies {copies}), {steps} steps, {n} "
                  f"process(es): {r['seconds']:.1f} s, grids and their state {r['grid_mib']:.0f} MiB per rank, peak "
                  f"RSS {r['peak_rss_mb']:.0f} MB (rank 0), final loss {r['loss']!r}")


def optimizer_step(width: int = 4096, steps: int = 10) -> None:
    """One optimizer step of a depth-3 MLP at ``width`` (μP groups): TplimitsOptimizer against
    ``torch.optim.Adam(foreach=True)`` / ``SGD(foreach=True)`` on the same parameters and gradients."""
    from tplimits.optimizers import TplimitsOptimizer
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                                torch.nn.Tanh(), torch.nn.Linear(width, width), torch.nn.Tanh(),
                                torch.nn.Linear(width, 1)).to(DEVICE)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    rules = {"adam": (tpl.optimizer("adam"), torch.optim.Adam), "sgd": (tpl.optimizer("sgd"), torch.optim.SGD)}
    for name, (rule, reference) in rules.items():
        timings = {}
        for label, opt in (("tplimits", TplimitsOptimizer(model.parameters(), rule, lr=1e-6)),
                           ("torch foreach", reference(model.parameters(), lr=1e-6, foreach=True))):
            opt.step()  # state allocated, untimed
            start = CLOCK()
            for _ in range(steps):
                opt.step()
            if DEVICE != "cpu":
                torch.cuda.synchronize()
            timings[label] = (CLOCK() - start) / steps
        ours, theirs = timings["tplimits"], timings["torch foreach"]
        print(f"{name} step at width {width} on {DEVICE}: tplimits {ours * 1e3:.1f} ms, torch foreach "
              f"{theirs * 1e3:.1f} ms, ratio {ours / theirs:.2f}")


def accuracy_task(source: str, examples: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The cost-at-accuracy task's data: the random task, or ``examples`` rows of scikit-learn's bundled digits
    (64 standardized features) with a regression target, the digit's label standardized over those rows."""
    if source == "random":
        return data()
    from tplimits.cli import load_data
    X, labels = load_data(source, examples)
    target = labels.to(torch.float64)
    return X, ((target - target.mean()) / target.std()).unsqueeze(1)


def cost_at_accuracy(target: float = 0.01, steps: int = 20, source: str = "random", optimizer: str = "sgd",
                     widths: tuple[int, ...] = (256, 1024, 4096), max_seeds: tuple[int, ...] = (64,),
                     systems: int = 16, start: int = 2**12, max_particles: int = 2**18, reference_runs: int = 1,
                     max_finite_seconds: float = math.inf, save: str | None = None, resume: bool = False,
                     copy_divisor: int = 16) -> None:
    """Time for the limit to reach Monte Carlo standard error ``target`` (RMS over steps and outputs) vs time
    for finite-width seed ensembles to get within ``target`` (RMS) of it; every result goes to ``save`` (JSON,
    with the reference outputs and each width's seed outputs beside it in ``.pt`` files) as it is measured, and
    ``resume`` picks a killed run up from there. Adam's limit runs with copy populations of P/``copy_divisor`` per
    system.

    The finite side is measured against a reference: the limit's timed run pooled with ``reference_runs`` more
    runs of other seeds. An ensemble's error is ``sqrt(gap² − se_ref²)``, the RMS gap of its seed mean to the
    reference less the reference's own Monte Carlo variance (RMS over steps and outputs): without that, a
    reference at standard error ``target`` puts every gap at about ``target`` or above, whatever the width."""
    if len(max_seeds) not in (1, len(widths)):
        raise ValueError(f"--max-seeds: one cap or one per width ({len(widths)}), got {list(max_seeds)}")
    caps = dict(zip(widths, max_seeds * len(widths) if len(max_seeds) == 1 else max_seeds, strict=True))
    config = {"target": target, "steps": steps, "data": source, "optimizer": optimizer, "systems": systems,
              "start_particles": start, "max_particles": max_particles, "reference_runs": reference_runs,
              "clock": CLOCK.__name__, "copy_divisor": copy_divisor}
    state = _load_state(save, config) if resume else {"config": config, "finite": {}}
    X, y = accuracy_task(source)
    limit = tpl.derive("mlp", optimizer=optimizer, depth=3, d_in=X.shape[1])
    if "reference" not in state:
        state["limit_search"] = []  # every run of the search, saved as it ends (a failed search keeps them)
        state["limit"], traj = limit_at_target(limit, X, y, config, record=lambda run: (
            state["limit_search"].append(run), _save(save, state)))
        _save(save, state)
        state["reference"] = _reference(limit, X, y, config, state["limit"]["particles"], traj, save)
        _save(save, state)
    reference = _reference_tensors(state, save)
    print(_limit_line(config, state["limit"], state["reference"]), flush=True)
    schedule = batch_schedule(len(X), None, steps, 0)
    for width in widths:
        entry = state["finite"].setdefault(str(width), {"seeds": [], "done": False})
        if not entry["done"]:
            finite_ensemble(limit, X, y, config, width, schedule, reference, caps[width], max_finite_seconds, entry,
                            lambda: _save(save, state), _seed_file(save, width))
        print(_finite_line(width, entry, state["limit"]["seconds"], target), flush=True)
    print(accuracy_table(state))


def _copies(config: dict, particles: int) -> int | None:
    """Adam's copy population per system: ``1/copy_divisor`` (default 1/16) of the system's particles (SGD keeps
    none)."""
    divisor = config.get("copy_divisor", 16)  # runs saved before the option: 16
    return particles // config["systems"] // divisor if config["optimizer"] == "adam" else None


def _rms(t: torch.Tensor) -> float:
    return float(t.square().mean().sqrt())


def limit_at_target(limit: tpl.Limit, X: torch.Tensor, y: torch.Tensor, config: dict, seed: int = 0,
                    record: Any = None) -> tuple[dict, tpl.Trajectory]:
    """Train the limit at ``config['start_particles']``, then at the power of 2 its standard error predicts
    (se ∝ P^-1/2, at least double), until the RMS standard error reaches the target or the next run would
    exceed ``config['max_particles']`` (then ``reached`` is False): the time at the target is the last run's;
    every run's particles, copies, RMS se (overall and by step), losses and seconds are returned too."""
    lr, systems = LR[config["optimizer"]], config["systems"]
    limit.train(X, y, steps=1, lr=lr, particles=64 * systems, batches=systems, progress=False,
                copies=_copies(config, 64 * systems))  # lowers, untimed
    runs, particles = [], config["start_particles"]
    while True:
        start = CLOCK()
        traj = limit.train(X, y, steps=config["steps"], lr=lr, particles=particles, batches=systems, seed=seed,
                           progress=False, copies=_copies(config, particles))
        runs.append({"particles": particles, "copies": _copies(config, particles),
                     "rms_se": _rms(traj.outputs_se), "seconds": CLOCK() - start,
                     "rms_se_by_step": traj.outputs_se.square().mean(dim=(1, 2)).sqrt().tolist(),
                     "loss_by_step": traj.loss.tolist()})
        if record:
            record(runs[-1])
        print(f"  limit, {particles} particles in {systems} systems: RMS se {runs[-1]['rms_se']:.4f}, "
              f"{runs[-1]['seconds']:.1f} s", flush=True)
        if runs[-1]["rms_se"] <= config["target"]:
            break
        predicted = particles * (runs[-1]["rms_se"] / config["target"]) ** 2
        if max(2 * particles, 2 ** math.ceil(math.log2(predicted))) > config["max_particles"]:
            break  # the target is out of reach: the largest run stands, marked not reached
        particles = max(2 * particles, 2 ** math.ceil(math.log2(predicted)))
    return {**runs[-1], "reached": runs[-1]["rms_se"] <= config["target"],
            "search_seconds": sum(r["seconds"] for r in runs), "runs": runs, "engine": tpl.__file__}, traj


def _reference(limit: tpl.Limit, X: torch.Tensor, y: torch.Tensor, config: dict, particles: int,
               traj: tpl.Trajectory, save: str | None) -> dict:
    """The timed run pooled with ``reference_runs`` runs of seeds 1, 2, ... at the same particles (independent
    systems): the mean of their means, standard error √(Σ se²) / runs; saved beside ``save``."""
    means, variances = [traj.outputs], [traj.outputs_se.square()]
    for seed in range(1, config["reference_runs"] + 1):
        extra = limit.train(X, y, steps=config["steps"], lr=LR[config["optimizer"]], particles=particles,
                            batches=config["systems"], seed=seed, progress=False, copies=_copies(config, particles))
        means.append(extra.outputs)
        variances.append(extra.outputs_se.square())
    outputs, se = torch.stack(means).mean(0), torch.stack(variances).sum(0).sqrt() / len(means)
    if save:
        torch.save({"outputs": outputs, "outputs_se": se, "timed_outputs": traj.outputs,
                    "timed_outputs_se": traj.outputs_se}, _stem(save) + "_reference.pt")
    return {"runs": len(means), "particles": particles * len(means), "rms_se": _rms(se),
            "outputs": outputs.tolist() if not save else None, "outputs_se": se.tolist() if not save else None}


def _reference_tensors(state: dict, save: str | None) -> dict[str, torch.Tensor]:
    if save:
        return torch.load(_stem(save) + "_reference.pt")
    return {k: torch.tensor(state["reference"][k], dtype=torch.float64) for k in ("outputs", "outputs_se")}


def finite_ensemble(limit: tpl.Limit, X: torch.Tensor, y: torch.Tensor, config: dict, width: int, schedule: Any,
                    reference: dict[str, torch.Tensor], max_seeds: int, max_seconds: float, entry: dict,
                    flush: Any, seed_file: str | None) -> None:
    """Add seeds of width ``width`` (plain torch loop) until the ensemble's error against the reference is
    within the target, or ``max_seeds`` seeds, or ``max_seconds`` of its clock; after every seed its
    cumulative seconds, raw gap, error, seed standard error and the bias that remains go into ``entry``."""
    runs = list(torch.load(seed_file)) if seed_file and entry["seeds"] else []
    entry["seeds"] = entry["seeds"][: len(runs)]  # a seed saved to JSON but not to its file is redone
    elapsed = entry["seeds"][-1]["seconds"] if entry["seeds"] else 0.0
    ref, ref_var = reference["outputs"], float(reference["outputs_se"].square().mean())
    while not entry["seeds"] or not _finite_stops(entry, config["target"], max_seeds, max_seconds):
        start = CLOCK()
        runs.append(finite_outputs(limit, X, y, len(X), width, len(runs), config["steps"], LR[config["optimizer"]],
                                   "mse", schedule, torch.float64))
        elapsed += CLOCK() - start
        stacked = torch.stack(runs)
        entry["seeds"].append(_ensemble_stats(stacked, ref, ref_var, elapsed))
        if seed_file:
            torch.save(stacked, seed_file)
        flush()
    entry["done"] = True
    flush()


def _ensemble_stats(stacked: torch.Tensor, ref: torch.Tensor, ref_var: float, seconds: float) -> dict:
    """The seed mean of ``stacked`` [seeds, ...] against the reference: raw RMS gap, error √(gap² − se_ref²),
    the seed standard error of the mean and the bias that remains after both noises."""
    gap_sq = float((stacked.mean(0) - ref).square().mean())
    seed_var = float(stacked.var(0).mean()) / len(stacked) if len(stacked) > 1 else math.nan
    return {"seeds": len(stacked), "seconds": seconds, "gap": math.sqrt(gap_sq),
            "error": math.sqrt(max(gap_sq - ref_var, 0.0)), "seed_se": math.sqrt(seed_var),
            "bias": math.sqrt(max(gap_sq - ref_var - seed_var, 0.0))}


def _rescore(state: dict, save: str, outputs: torch.Tensor, se: torch.Tensor) -> dict:
    """The saved seeds of every width scored against another limit run (``outputs``, ``se``): the same stopping
    rule replayed seed by seed on the saved cumulative seconds (a width stops at the first seed within the
    target, else where it stopped before)."""
    finite, ref_var = {}, float(se.square().mean())
    for width, entry in state["finite"].items():
        runs = torch.load(_seed_file(save, int(width)))
        seeds = []
        for n, saved in enumerate(entry["seeds"][: len(runs)], start=1):
            seeds.append(_ensemble_stats(runs[:n], outputs, ref_var, saved["seconds"]))
            if seeds[-1]["error"] <= state["config"]["target"]:
                break
        reached = bool(seeds) and seeds[-1]["error"] <= state["config"]["target"]
        finite[width] = {"seeds": seeds, "stop": "reached" if reached else entry.get("stop")}
    return finite


def _finite_stops(entry: dict, target: float, max_seeds: int, max_seconds: float) -> bool:
    last = entry["seeds"][-1]
    entry["reached"] = last["error"] <= target
    entry["stop"] = ("reached" if entry["reached"] else "seed cap" if last["seeds"] >= max_seeds
                     else "time cap" if last["seconds"] >= max_seconds else None)
    return entry["stop"] is not None


def _stem(save: str) -> str:
    return save[:-5] if save.endswith(".json") else save


def _seed_file(save: str | None, width: int) -> str | None:
    return f"{_stem(save)}_width{width}.pt" if save else None


def _save(save: str | None, state: dict) -> None:
    """Write the state atomically (a killed run leaves the last complete file)."""
    if save:
        import os
        with open(save + ".tmp", "w") as f:
            json.dump(state, f, indent=1)
        os.replace(save + ".tmp", save)


def _load_state(save: str | None, config: dict) -> dict:
    import os
    if not save:
        raise ValueError("--resume needs --save FILE")
    if not os.path.exists(save):
        return {"config": config, "finite": {}}
    with open(save) as f:
        state = json.load(f)
    if {"copy_divisor": 16, **state["config"]} != config:  # runs saved before the option had 16
        raise ValueError(f"--resume: {save} was measured with {state['config']}, not {config}")
    return state


def _limit_line(config: dict, lim: dict, ref: dict) -> str:
    return (f"{config['data']}, {config['optimizer']} lr {LR[config['optimizer']]}, {config['steps']} steps, target "
            f"{config['target']}: limit {lim['particles']} particles in {config['systems']} systems (copies "
            f"{lim['copies']}), RMS se {lim['rms_se']:.4f} ({'reached' if lim['reached'] else 'NOT reached'}), "
            f"{lim['seconds']:.1f} s (search {lim['search_seconds']:.1f} s); reference {ref['runs']} runs, "
            f"{ref['particles']} particles, RMS se {ref['rms_se']:.4f}")


def _finite_line(width: int, entry: dict, limit_seconds: float, target: float) -> str:
    last = entry["seeds"][-1]
    return (f"finite width {width}: {last['seeds']} seeds, {entry['stop']}, error {last['error']:.4f} (raw gap "
            f"{last['gap']:.4f}, seed se {last['seed_se']:.4f}, bias {last['bias']:.4f}), {last['seconds']:.1f} s, "
            f"ratio finite/limit {last['seconds'] / limit_seconds:.2f}")


def accuracy_table(state: dict, limit: dict | None = None) -> str:
    """One markdown row per width (ratio against ``limit``, by default the measured limit)."""
    limit = limit or state["limit"]
    rows = ["| width | seeds | stop | CPU s | ratio finite/limit | error | raw gap | seed se | bias |",
            "|---|---|---|---|---|---|---|---|---|"]
    for width, entry in state["finite"].items():
        if entry["seeds"]:
            s = entry["seeds"][-1]
            rows.append(f"| {width} | {s['seeds']} | {entry.get('stop')} | {s['seconds']:.1f} | "
                        f"{s['seconds'] / limit['seconds']:.2f} | {s['error']:.4f} | {s['gap']:.4f} | "
                        f"{s['seed_se']:.4f} | {s['bias']:.4f} |")
    return "\n".join(rows)


def retime_limit(save: str) -> None:
    """Re-time only the limit side of a saved cost-at-accuracy run (same task, systems, start and target, this
    engine); the saved finite seeds are re-scored against the new run (:func:`_rescore`) and every ratio is
    recomputed on their saved seconds; the new run's outputs are compared with the saved reference (RMS and
    largest difference in combined standard errors). Appended to the file."""
    with open(save) as f:
        state = json.load(f)
    config = state["config"]
    X, y = accuracy_task(config["data"])
    limit = tpl.derive("mlp", optimizer=config["optimizer"], depth=3, d_in=X.shape[1])
    state.setdefault("retimed_search", [])
    new, traj = limit_at_target(limit, X, y, config, record=lambda run: (state["retimed_search"].append(run),
                                                                          _save(save, state)))
    ref = _reference_tensors(state, save)
    z = (traj.outputs - ref["outputs"]) / (traj.outputs_se.square() + ref["outputs_se"].square()).sqrt()
    new.update(z_rms=_rms(z[1:]), z_max=float(z[1:].abs().max()), when=time.strftime("%Y-%m-%d %H:%M:%S"),
               max_diff_timed=float((traj.outputs - ref["timed_outputs"]).abs().max()) if "timed_outputs" in ref
               else None)
    new["finite"] = _rescore(state, save, traj.outputs, traj.outputs_se)  # errors against the new run itself
    state.setdefault("retimed", []).append(new)
    _save(save, state)
    print(f"saved limit: {state['limit']['particles']} particles, {state['limit']['seconds']:.1f} s; re-timed: "
          f"{new['particles']} particles, RMS se {new['rms_se']:.4f}, {new['seconds']:.1f} s (search "
          f"{new['search_seconds']:.1f} s); against the saved reference: RMS z {new['z_rms']:.2f}, largest "
          f"{new['z_max']:.2f} (steps 1..); largest difference to the saved timed run (same seed) "
          f"{new['max_diff_timed']}")
    print("saved finite seconds, errors against the re-timed run:")
    print(accuracy_table({"finite": new["finite"]}, new))


def width_trend(save: str) -> None:
    """Whether the finite side of a saved cost-at-accuracy run has converged in width, and how far the limit is
    from where it converges: the loss (mse of the seed mean against the targets) of every width at steps 10 /
    30 / 50, then per step and output the fit ``m(n) = m_∞ + b/n`` over the widths (weighted by the seed
    means' variances), and the limit's RMS distance to ``m_∞`` with both noises taken out (the limit's and the
    fit's), as "bias" above. A limit whose bias against ``m_∞`` is the same as against every width is off on
    its own side; one whose bias falls with width toward ``m_∞``'s is the finite side's."""
    with open(save) as f:
        state = json.load(f)
    _, y = accuracy_task(state["config"]["data"])
    ref = _reference_tensors(state, save)
    limit, limit_var = ref["outputs"], ref["outputs_se"].square()
    means, variances, widths = [], [], sorted(map(int, state["finite"]))
    print("| width | seeds | loss at steps 10 / 30 / 50 | limit's bias against its seed mean |\n|---|---|---|---|")
    for width in widths:
        runs = torch.load(_seed_file(save, width))
        means.append(runs.mean(0))
        variances.append(runs.var(0) / len(runs))
        stats = _ensemble_stats(runs, limit, float(limit_var.mean()), 0.0)
        print(f"| {width} | {len(runs)} | {' / '.join(f'{_loss_at(means[-1], y, s):.4f}' for s in (10, 30, 50))} "
              f"| {stats['bias']:.4f} |")
    inverse = torch.tensor([1 / w for w in widths], dtype=limit.dtype).reshape(-1, *[1] * limit.dim())
    weight = 1 / torch.stack(variances).clamp_min(torch.finfo(limit.dtype).tiny)
    mean_m, mean_x = (weight * torch.stack(means)).sum(0) / weight.sum(0), (weight * inverse).sum(0) / weight.sum(0)
    sxx = (weight * (inverse - mean_x).square()).sum(0)
    slope = (weight * (inverse - mean_x) * (torch.stack(means) - mean_m)).sum(0) / sxx
    extrapolated = mean_m - slope * mean_x
    extrapolated_var = 1 / weight.sum(0) + mean_x.square() / sxx
    gap_sq = (limit - extrapolated).square()
    bias = float((gap_sq - limit_var - extrapolated_var).mean().clamp_min(0).sqrt())
    z = (gap_sq / (limit_var + extrapolated_var))[1:].mean().sqrt()
    print(f"| ∞ (fit in 1/n) | — | {' / '.join(f'{_loss_at(extrapolated, y, s):.4f}' for s in (10, 30, 50))} | "
          f"{bias:.4f} (RMS z {float(z):.2f}, fit se {float(extrapolated_var.mean().sqrt()):.4f}) |")
    print(f"limit: loss at steps 10 / 30 / 50 {' / '.join(f'{_loss_at(limit, y, s):.4f}' for s in (10, 30, 50))}, "
          f"RMS se {float(limit_var.mean().sqrt()):.4f}")


def _loss_at(outputs: torch.Tensor, y: torch.Tensor, step: int) -> float:
    return float((outputs[step] - y).square().mean())


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::baddbmm_")
FLOPS_CASES = (  # optimizer, particles (4 systems), copies per system, steps
    ("sgd", 2**14, None, 10), ("sgd", 2**16, None, 10), ("adam", 2**14, 256, 5), ("adam", 2**16, 1024, 3))


def gemm_peak(n: int = 1024, inner: int = 1024, m: int = 1024, repeats: int = 7) -> float:
    """The machine's float64 GEMM rate in this process: GFLOP/s of the best of ``repeats`` [n, inner] @
    [inner, m] products, by this process's CPU seconds (one thread under ``--cpu-time``); products too small
    to time alone are repeated."""
    a, b = torch.randn(n, inner, dtype=torch.float64), torch.randn(inner, m, dtype=torch.float64)
    a @ b  # BLAS warm-up, untimed
    per_timing = max(1, 2**30 // (2 * n * inner * m))
    best = math.inf
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(per_timing):
            a @ b
        best = min(best, (time.process_time() - start) / per_timing)
    return 2 * n * inner * m / best / 1e9


def profiled_matmul_flops(prof: Any) -> float:
    """The matmul FLOPs of a ``torch.profiler`` run recorded ``with_flops`` and ``record_shapes``: the profiler's
    count, plus the in-place ``baddbmm_`` (every term after the first of an expansion), which it counts as zero,
    from its shapes (``[B, M, K] @ [B, K, N]``: ``2·B·M·K·N``)."""
    total = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key == "aten::baddbmm_" and len(e.input_shapes) >= 3 and len(e.input_shapes[1]) == 3:
            (b, m, k), n = e.input_shapes[1], e.input_shapes[2][-1]
            total += 2.0 * b * m * k * n * e.count
        elif e.key in GEMM_OPS:
            total += e.flops or 0
    return total


def op_kind(name: str) -> str:
    if name in GEMM_OPS or name in ("aten::matmul", "aten::einsum", "aten::linear", "aten::dot", "aten::mv"):
        return "matmul"
    if name.startswith("aten::linalg_") or name in ("aten::_linalg_eigh", "aten::linalg_qr", "aten::geqrf",
                                                     "aten::cholesky", "aten::_linalg_solve_ex"):
        return "linalg"
    if name in ("aten::randn", "aten::normal_", "aten::empty", "aten::zeros", "aten::ones", "aten::copy_",
                "aten::cat", "aten::clone", "aten::contiguous", "aten::index", "aten::index_select"):
        return "memory/random"
    return "elementwise/other"


def flops_one(optimizer: str, particles: int, copies: int | None, steps: int) -> dict:
    """One run of the reference task untimed-profiled for its FLOPs and op times, then the same run timed by
    CPU seconds without the profiler."""
    from torch.profiler import ProfilerActivity, profile
    X, y = data()
    limit = limit_for(optimizer)
    options = dict(steps=steps, lr=LR[optimizer], particles=particles, batches=4, progress=False, copies=copies)
    limit.train(X, y, steps=1, lr=LR[optimizer], particles=1024, batches=4, progress=False,
                copies=copies and 64)  # lowering, untimed
    start = time.process_time()
    limit.train(X, y, **options)
    seconds = time.process_time() - start
    start = time.process_time()  # 256 particles per system: about the per-op cost alone (Python, dispatch)
    limit.train(X, y, **{**options, "particles": 1024, "copies": copies and 64})
    small_seconds = time.process_time() - start
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        limit.train(X, y, **options)
    events = prof.key_averages()
    gemm_flops = profiled_matmul_flops(prof)
    other_flops = sum(e.flops or 0 for e in events if e.key not in GEMM_OPS)
    by_kind: dict[str, float] = {}
    for e in events:
        kind = op_kind(e.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + e.self_cpu_time_total / 1e6
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    shaped = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in GEMM_OPS]
    gemm_shapes = [(e.key, str(e.input_shapes[:2]), e.self_cpu_time_total / 1e6, e.count,
                    (e.flops or 0) / max(e.self_cpu_time_total, 1) / 1e3)
                   for e in sorted(shaped, key=lambda e: e.self_cpu_time_total, reverse=True)[:4]]
    return {"seconds": seconds, "small_seconds": small_seconds, "calls": sum(e.count for e in events),
            "gemm_flops": gemm_flops, "other_flops": other_flops, "by_kind": by_kind,
            "profiled_op_seconds": sum(by_kind.values()),
            "top": [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in top], "gemm_shapes": gemm_shapes}


def flops_report() -> None:
    """Achieved GFLOP/s of the engine (the profiler's matmul FLOPs over the run's CPU seconds) against the
    float64 GEMM peak measured in the same process, and where the time goes."""
    torch.set_num_threads(1)
    peak = gemm_peak()
    print(f"float64 GEMM peak (1024^3, one thread, best of 7, CPU time): {peak:.1f} GFLOP/s")
    thin = {k: gemm_peak(2**14, k, 16) for k in (16, 64, 144)}
    print("the engine's thin shapes, [2^14, K] @ [K, 16]: " + ", ".join(f"K {k} {g:.1f} GFLOP/s" for k, g in
                                                                      thin.items()))
    for optimizer, particles, copies, steps in FLOPS_CASES:
        r = flops_one(optimizer, particles, copies, steps)
        rate = r["gemm_flops"] / r["seconds"] / 1e9
        ops = r["profiled_op_seconds"]
        shares = ", ".join(f"{k} {v / ops:.0%}" for k, v in sorted(r["by_kind"].items(), key=lambda kv: -kv[1]))
        print(f"{optimizer}, {particles} particles in 4 systems, copies {copies}, {steps} steps: "
              f"{r['seconds']:.2f} CPU s, matmul {r['gemm_flops'] / 1e9:.2f} GFLOP (+ {r['other_flops'] / 1e9:.2f} "
              f"counted elementwise), {rate:.2f} GFLOP/s = {rate / peak:.3f} of the GEMM peak "
              f"(peak / achieved {peak / rate:.1f}); same run at 1024 particles {r['small_seconds']:.2f} CPU s; "
              f"{r['calls']} op calls; op self time (profiled, wall) {ops:.2f} s: {shares}")
        print("  top ops by self time: " + "; ".join(f"{k} {t:.2f} s ({n} calls)" for k, t, n in r["top"]))
        print("  top matmul shapes: " + "; ".join(f"{k} {shape} {t:.2f} s ({n} calls, {g:.1f} GFLOP/s)"
                                                  for k, shape, t, n, g in r["gemm_shapes"]))


def best_gflops(product: Any, *operands: torch.Tensor, flops: float, repeats: int = 7) -> float:
    """GFLOP/s of ``product(*operands)`` doing ``flops``, best of ``repeats`` by CPU seconds, after a warm-up."""
    product(*operands)
    best = math.inf
    for _ in range(repeats):
        start = time.process_time()
        product(*operands)
        best = min(best, time.process_time() - start)
    return flops / best / 1e9


def mirror_threshold(components: tuple[int, ...] = (16, 32, 64, 128, 256, 512),
                     shapes: tuple[tuple[int, int, int], ...] = ((1, 2**14, 800), (9, 1024, 1024))) -> None:
    """Where a column store's mirror stops paying (``_Columns.THIN``): GFLOP/s of a sum over particles ``Cᵀx``
    (float64, one thread) from the columns kept as rows (``[F, r, P] @ [F, P, K]``) against the transposed form
    the store uses without a mirror (``(xᵀ C)ᵀ``), per ``K`` components, for stores ``[F, P, r]``: the reference
    MLP's hat basis at 2^14 particles and 50 steps, and a ResNet convolution's at 1024 particles."""
    torch.set_num_threads(1)
    for F, P, r in shapes:
        C = torch.randn(F, P, r, dtype=torch.float64)
        rows = C.mT.contiguous()
        for K in components:
            x = torch.randn(F, P, K, dtype=torch.float64)
            flops = 2 * F * P * r * K
            mirrored = best_gflops(lambda a, b: a @ b, rows, x, flops=flops)
            transposed = best_gflops(lambda a, b: (b.mT @ a).mT, C, x, flops=flops)
            print(f"[{F}, {P}, {r}], K {K}: from rows {mirrored:.1f}, transposed {transposed:.1f} GFLOP/s "
                  f"(ratio {mirrored / transposed:.2f})")


def normals(shapes: tuple[tuple[int, ...], ...] = ((1, 2**14, 16), (9, 1024, 512), (1, 1024, 16)),
            repeats: int = 7) -> None:
    """The hat Gaussians' draws, float64, one thread, CPU time (best of ``repeats``): ``torch.randn`` against
    ``tplimits.limit.gaussians.standard_normal`` (the same numbers, to a unit or two in the last place), for a
    reference-case draw (2^14 particles × 16 directions), a ResNet convolution's at 1024 particles and a small
    one."""
    from tplimits.limit.gaussians import standard_normal

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)

    def best(draw: Any) -> float:
        draw()
        times = []
        for _ in range(repeats):
            start = time.process_time()
            draw()
            times.append(time.process_time() - start)
        return min(times)

    for shape in shapes:
        theirs = best(lambda shape=shape: torch.randn(shape, generator=generator, dtype=torch.float64))
        ours = best(lambda shape=shape: standard_normal(shape, generator, torch.float64, torch.device("cpu")))
        count = math.prod(shape)
        print(f"{list(shape)}: torch.randn {theirs * 1e3:.2f} ms ({theirs / count * 1e9:.1f} ns a number), "
              f"standard_normal {ours * 1e3:.2f} ms ({ours / count * 1e9:.1f} ns), ratio {theirs / ours:.2f}")


def thin_orientations(particles: int = 2**14, components: int = 16, columns: tuple[int, ...] = (16, 80, 400, 800),
                      repeats: int = 7) -> None:
    """GFLOP/s of the engine's two thin float64 products, one thread, CPU time (best of ``repeats``), in each
    orientation the engine has used: a sum over particles ``Eᵀx`` (``[P, r]ᵀ @ [P, K]``, then ``(xᵀ E)ᵀ``, now
    ``E_rows @ x`` from the columns kept as rows, ``_Columns.reduce``) and an expansion ``E c`` (``[P, r] @ [r,
    K]``, now; ``(cᵀ Eᵀ)ᵀ`` before), with ``E`` the first ``r`` columns (or rows) of a wider buffer, as the
    engine keeps it."""
    torch.set_num_threads(1)

    def rate(product: Any, a: torch.Tensor, b: torch.Tensor) -> float:
        return best_gflops(product, a, b, flops=2 * particles * r * components, repeats=repeats)

    x = torch.randn(1, particles, components, dtype=torch.float64)
    for r in columns:
        E = torch.randn(1, particles, r + r // 2, dtype=torch.float64)[..., :r]
        rows = torch.randn(1, r + r // 2, particles, dtype=torch.float64)[:, :r]
        c = torch.randn(1, r, components, dtype=torch.float64)
        sums = [rate(lambda a, b: a.mT @ b, E, x), rate(lambda a, b: (b.mT @ a).mT, E, x),
                rate(lambda a, b: a @ b, rows, x)]
        expansions = [rate(lambda a, b: a @ b, E, c), rate(lambda a, b: (b.mT @ a.mT).mT, E, c)]
        print(f"[{particles}, {r}], K {components}: sum over particles Eᵀx {sums[0]:.1f}, (xᵀE)ᵀ {sums[1]:.1f}, "
              f"from rows {sums[2]:.1f} GFLOP/s; expansion E c {expansions[0]:.1f}, (cᵀEᵀ)ᵀ {expansions[1]:.1f} "
              "GFLOP/s")
    print(f"square GEMM peak (1024^3): {gemm_peak():.1f} GFLOP/s")


def grid_orientations(cases: tuple[tuple[int, int], ...] = ((4096, 256), (8192, 512), (16384, 1024)),
                      components: int = 16, repeats: int = 7) -> None:
    """GFLOP/s of a copy grid's application (float64, one thread, CPU time, best of ``repeats``): ``P`` particles,
    ``c`` copies, ``K`` components, the forward grid ``[P, c]`` and the transposed one ``[c, P]`` on the copies'
    rows ``[c, K]``, formed as ``grid @ x`` (the engine before) and as ``(xᵀ gridᵀ)ᵀ`` (now, through
    ``_expand``), and a tile of 2^18 gradient entries, ``[2^18 / c, K] @ [K, c]``."""
    torch.set_num_threads(1)

    def best(product: Any, *operands: torch.Tensor) -> float:
        product(*operands)  # BLAS warm-up, untimed
        times = []
        for _ in range(repeats):
            start = time.process_time()
            product(*operands)
            times.append(time.process_time() - start)
        return min(times)

    for particles, copies in cases:
        forward = torch.randn(1, particles, copies, dtype=torch.float64)
        transposed = torch.randn(1, copies, particles, dtype=torch.float64)
        x = torch.randn(1, copies, components, dtype=torch.float64)
        gflop = 2 * particles * copies * components / 1e9
        rates = [gflop / best(lambda g, v: g @ v, forward, x), gflop / best(lambda g, v: (v.mT @ g.mT).mT, forward, x),
                 gflop / best(lambda g, v: g.mT @ v, transposed, x),
                 gflop / best(lambda g, v: (v.mT @ g).mT, transposed, x)]
        rows = 2**18 // copies
        left, buffer = torch.randn(1, rows, components, dtype=torch.float64), torch.empty(1, rows, copies,
                                                                                          dtype=torch.float64)
        tile_gflop = 2 * rows * copies * components / 1e9
        tile = [tile_gflop / best(lambda a, b: a @ b, left, x.mT),
                tile_gflop / best(lambda a, b, out: torch.bmm(a, b, out=out), left, x.mT, buffer)]
        print(f"P {particles}, c {copies}, K {components}: forward grid {rates[0]:.1f} -> {rates[1]:.1f} GFLOP/s "
              f"({rates[1] / rates[0]:.1f}x), transposed grid {rates[2]:.1f} -> {rates[3]:.1f} GFLOP/s "
              f"({rates[3] / rates[2]:.1f}x); gradient tile fresh {tile[0]:.1f}, into a buffer {tile[1]:.1f} GFLOP/s")
    print(f"square GEMM peak (1024^3): {gemm_peak():.1f} GFLOP/s")


def _three_alive(a: torch.Tensor) -> torch.Tensor:
    """Three ops into fresh tensors that are alive together, as the pure rule's moments and quotient are."""
    doubled = a * 2.0
    root = torch.rsqrt(doubled)
    scaled = root * 3.0
    return scaled


def elementwise_costs(entries: int = 2**16, repeats: int = 50) -> None:
    """Two costs behind the Adam fast path, float64, one thread, CPU time per call: ``sqrt`` against ``rsqrt``
    and a reciprocal (ns per entry), and three ops on a 2^18-entry tile into fresh tensors against into one
    buffer (microseconds and minor page faults per call; the fresh ones alive together)."""
    torch.set_num_threads(1)

    def per_call(op: Any, *operands: torch.Tensor) -> tuple[float, float]:
        op(*operands)  # warm-up, untimed
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
        for _ in range(repeats):
            op(*operands)
        seconds = (time.process_time() - start) / repeats
        return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeats

    v, out = torch.rand(entries, dtype=torch.float64) + 0.1, torch.empty(entries, dtype=torch.float64)
    sqrt, _ = per_call(lambda a, b: torch.sqrt(a, out=b), v, out)
    rsqrt, _ = per_call(lambda a, b: torch.rsqrt(a, out=b).reciprocal_(), v, out)
    print(f"{entries} entries: sqrt {sqrt / entries * 1e9:.2f} ns per entry, rsqrt + reciprocal "
          f"{rsqrt / entries * 1e9:.2f} ns ({torch.backends.cpu.get_cpu_capability()})")
    tile, buffer = torch.rand(1, 32, 8192, dtype=torch.float64) + 0.1, torch.empty(1, 32, 8192, dtype=torch.float64)
    fresh = per_call(_three_alive, tile)
    reused = per_call(lambda a, b: torch.rsqrt(torch.mul(a, 2.0, out=b), out=b).mul_(3.0), tile, buffer)
    print(f"three ops on 2^18 entries: fresh tensors {fresh[0] * 1e6:.0f} us, {fresh[1]:.0f} page faults per call; "
          f"into one buffer {reused[0] * 1e6:.0f} us, {reused[1]:.0f} page faults")


LINEAR_CASES = ((2**14, 10), (2**16, 10), (2**16, 50))  # SGD: particles (4 systems), steps
ADAM_CASES = ((2**14, 10, 256), (2**16, 10, 1024))  # Adam: particles (4 systems), steps, copies per system


def timed_outputs(particles: str, steps: str, threads: str, path: str, optimizer: str = "sgd",
                  copies: str = "0") -> None:
    """One run of the reference task with ``threads`` BLAS threads: CPU and wall seconds as JSON, the outputs
    saved to ``path`` (whichever ``tplimits`` the interpreter imports: PYTHONPATH picks the tree)."""
    torch.set_num_threads(int(threads))
    X, y = data()
    limit = limit_for(optimizer)
    limit.train(X, y, steps=1, lr=LR[optimizer], particles=1024, batches=4, progress=False,
                copies=64 if int(copies) else None)  # lowering, untimed
    wall, cpu = time.perf_counter(), time.process_time()
    traj = limit.train(X, y, steps=int(steps), lr=LR[optimizer], particles=int(particles), batches=4, progress=False,
                       copies=int(copies) or None)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    torch.save(traj.outputs, path)
    print(json.dumps({"cpu": cpu, "wall": wall, "engine": tpl.__file__, "peak_rss_mb": peak_mb()}))


def tree_env(tree: str, threads: int) -> dict[str, str]:
    import os
    return {**os.environ, "PYTHONPATH": os.path.abspath(tree), "OMP_NUM_THREADS": str(threads)}


def tree_run(tree: str, particles: int, steps: int, threads: int, path: str, optimizer: str = "sgd",
             copies: int = 0) -> dict:
    """:func:`timed_outputs` in a fresh process importing ``tplimits`` from source tree ``tree``."""
    done = subprocess.run([sys.executable, __file__, "timed-outputs", str(particles), str(steps), str(threads), path,
                           optimizer, str(copies)], capture_output=True, text=True, check=True,
                          env=tree_env(tree, threads))
    return json.loads(done.stdout.strip().splitlines()[-1])


def here() -> str:
    import pathlib
    return str(pathlib.Path(__file__).resolve().parents[1])


def engine_speed(before: str, optimizer: str, cases: tuple[tuple[int, ...], ...], threads: bool = True) -> None:
    """This engine against the one in source tree ``before`` (e.g. a ``git worktree`` of an earlier commit),
    one BLAS thread each, the two runs of a case back to back in this one run: CPU seconds, their ratio, and
    the largest difference of the outputs over all steps. For scale, the earlier engine against itself with 2
    BLAS threads: the difference a change of summation order alone makes (also every 10th step's). A case is
    ``(particles, steps)`` or, for Adam, ``(particles, steps, copies per system)``; ``threads=False`` leaves out
    the 2-thread run."""
    import tempfile
    with tempfile.TemporaryDirectory() as scratch:
        for particles, steps, *copies in cases:
            extra = (optimizer, copies[0] if copies else 0)
            paths = {k: f"{scratch}/{k}.pt" for k in ("before", "after", "threads")}
            old = tree_run(before, particles, steps, 1, paths["before"], *extra)
            new = tree_run(here(), particles, steps, 1, paths["after"], *extra)
            if threads:
                tree_run(before, particles, steps, 2, paths["threads"], *extra)
            else:
                paths["threads"] = paths["before"]
            outputs = {k: torch.load(v) for k, v in paths.items()}
            scale = float(outputs["before"].abs().max())
            (gap, after_steps), (rounding, thread_steps) = (_gaps(outputs[k], outputs["before"]) for k in
                                                            ("after", "threads"))
            label = f"{optimizer}, {particles} particles in 4 systems" + (f", {copies[0]} copies" if copies else "")
            rounding_note = f"{rounding:.1e}" if threads else "not run"
            print(f"{label}, {steps} steps: before {old['cpu']:.1f} CPU s ({old['wall']:.1f} s wall, peak RSS "
                  f"{old['peak_rss_mb']:.0f} MB), after {new['cpu']:.1f} CPU s ({new['wall']:.1f} s wall, peak RSS "
                  f"{new['peak_rss_mb']:.0f} MB), before/after {old['cpu'] / new['cpu']:.2f} (wall "
                  f"{old['wall'] / new['wall']:.2f}); largest output difference {gap:.1e} = {gap / scale:.1e} of the "
                  f"output scale {scale:.2f} (before, 2 BLAS threads against 1: {rounding_note}); at steps 0, 10, ...: "
                  f"after {after_steps}" + (f", 2 threads {thread_steps}" if threads else ""), flush=True)


def _gaps(outputs: torch.Tensor, reference: torch.Tensor) -> tuple[float, str]:
    """The largest difference of two runs' outputs ``[steps + 1, ...]``, and every 10th step's."""
    diff = (outputs - reference).abs()
    return float(diff.max()), " ".join(f"{float(diff[t].max()):.0e}" for t in range(0, len(diff), 10))


def in_trees(part: str, before: str) -> None:
    """Part ``part`` of this script (``--cpu-time``) run on the engine in source tree ``before`` and on this one,
    back to back, each in a fresh process."""
    for label, tree in (("before", before), ("after", here())):
        done = subprocess.run([sys.executable, __file__, "--cpu-time", part], capture_output=True, text=True,
                              check=True, env=tree_env(tree, 1))
        for line in done.stdout.strip().splitlines():
            print(f"{label}: {line}", flush=True)


def accuracy_part(args: argparse.Namespace) -> None:
    """The accuracy part: a cost-at-accuracy run, or (``--retime``, ``--trend``) a reading of a saved one."""
    if args.retime:
        retime_limit(args.retime)
    elif args.trend:
        width_trend(args.trend)
    else:
        cost_at_accuracy(args.target, args.steps, args.data, args.optimizer, tuple(args.widths),
                         tuple(args.max_seeds), args.systems, args.start_particles, args.max_particles,
                         args.reference_runs, args.max_finite_seconds, args.save, args.resume, args.copy_divisor)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*",
                        help="reference, reference-adam, scaling, accuracy, copies, copies-accuracy, optimizer, "
                             "processes, shard, flops, linear-speed, adam-speed, thin, mirror-threshold, "
                             "grid-orientation, elementwise, normals "
                             "(default: all but the last seven)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpu-time", action="store_true",
                        help="copies / optimizer / accuracy: time by this process's CPU seconds, one thread "
                             "(a shared machine)")
    parser.add_argument("--target", type=float, default=0.01, help="accuracy of the cost-at-accuracy comparison")
    parser.add_argument("--data", choices=("random", "digits"), default="random",
                        help="accuracy: the random task (16 inputs) or 64 of scikit-learn's digits (regression target)")
    parser.add_argument("--optimizer", choices=tuple(LR), default="sgd", help="accuracy: the optimizer")
    parser.add_argument("--steps", type=int, default=20, help="accuracy: training steps")
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 4096], help="accuracy: finite widths")
    parser.add_argument("--max-seeds", type=int, nargs="+", default=[64],
                        help="accuracy: most seeds per finite width (one cap, or one per width)")
    parser.add_argument("--systems", type=int, default=16, help="accuracy: independent systems of the limit")
    parser.add_argument("--start-particles", type=int, default=2**12, help="accuracy: the limit's first run")
    parser.add_argument("--max-particles", type=int, default=2**18, help="accuracy: the limit's largest run")
    parser.add_argument("--reference-runs", type=int, default=1,
                        help="accuracy: more limit runs (other seeds) pooled with the timed one as the finite side's "
                             "reference")
    parser.add_argument("--max-finite-seconds", type=float, default=math.inf,
                        help="accuracy: most seconds (of the clock) per finite width")
    parser.add_argument("--copy-divisor", type=int, default=16,
                        help="accuracy: Adam's copies per system are its particles over this")
    parser.add_argument("--save", help="accuracy: JSON file every result is written to as it is measured")
    parser.add_argument("--resume", action="store_true", help="accuracy: continue the run saved in --save")
    parser.add_argument("--retime", metavar="FILE",
                        help="accuracy: re-time only the limit of the run saved in FILE, recompute the ratios")
    parser.add_argument("--trend", metavar="FILE",
                        help="accuracy: the finite widths of the run saved in FILE, their fit in 1/n and the "
                             "limit's distance to it (no training)")
    parser.add_argument("--before", help="linear-speed, adam-speed (required), copies, optimizer: a source tree of "
                                         "the engine to compare with, in the same run")
    parser.add_argument("--no-threads", action="store_true",
                        help="linear-speed, adam-speed: leave out the earlier engine's 2-thread run")
    parser.add_argument("--cases", nargs="+",
                        help="linear-speed: particles:steps of each SGD case (default "
                             + " ".join(f"{p}:{s}" for p, s in LINEAR_CASES) + "); adam-speed: particles:steps:copies "
                             "(default " + " ".join(":".join(map(str, c)) for c in ADAM_CASES) + ")")
    args = parser.parse_args()
    DEVICE = args.device
    if args.cpu_time:
        CLOCK = time.process_time
        torch.set_num_threads(1)
    if args.parts[:1] == ["spread-one"]:
        spread_one()
        sys.exit()
    if args.parts[:1] == ["shard-one"]:
        shard_one(args.parts[1])
        sys.exit()
    if args.parts[:1] == ["timed-outputs"]:
        timed_outputs(*args.parts[1:7])
        sys.exit()
    if args.parts[:1] == ["one"]:
        one(*args.parts[1:5])
        sys.exit()
    for part in ("linear-speed", "adam-speed"):
        if part in args.parts and not args.before:
            parser.error(f"{part} needs --before DIR, a source tree of the engine to compare with")
    cases = {optimizer: tuple(tuple(map(int, c.split(":"))) for c in args.cases) if args.cases else default
             for optimizer, default in (("sgd", LINEAR_CASES), ("adam", ADAM_CASES))}
    which = args.parts or ["reference", "reference-adam", "scaling", "accuracy", "copies", "copies-accuracy",
                           "optimizer", "processes", "shard"]
    parts = {
        "reference": reference,
        "reference-adam": reference_adam,
        "scaling": scaling,
        "accuracy": lambda: accuracy_part(args),
        "copies": (lambda: in_trees("copies", args.before)) if args.before else copies_scaling,
        "copies-accuracy": copies_accuracy,
        "optimizer": (lambda: in_trees("optimizer", args.before)) if args.before else optimizer_step,
        "processes": spread_scaling,
        "flops": flops_report,
        "thin": thin_orientations,
        "normals": normals,
        "mirror-threshold": mirror_threshold,
        "grid-orientation": grid_orientations,
        "elementwise": elementwise_costs,
        "linear-speed": lambda: engine_speed(args.before, "sgd", cases["sgd"], not args.no_threads),
        "adam-speed": lambda: engine_speed(args.before, "adam", cases["adam"], not args.no_threads),
        "shard": lambda: (shard_scaling(), rounding_sensitivity()),
    }
    for name, run in parts.items():  # in this order, whatever the order asked
        if name in which:
            run()
