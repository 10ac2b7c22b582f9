"""The NT limit of Adam under the paper's Ch. 5 protocol, and what one NT step costs.

    python benchmarks/bench_nt.py protocol          # limit vs finite NTP widths, PNG nt-adam-protocol.png
    python benchmarks/bench_nt.py cost              # seconds per step against the step and against copies
    python benchmarks/bench_nt.py protocol --samples 100 --widths 64 512 4096 --seeds 10 --steps 20
    python benchmarks/bench_nt.py kernels           # exact vs Monte Carlo vs empirical NTK (torch.func)
    python benchmarks/bench_nt.py kernels --nt-python /tmp/ntvenv/bin/python   # and neural-tangents (MLP, CNN)
    python benchmarks/bench_nt.py ops --repeats 30  # the cost of the exact path's passes over 512 × 512, one thread

Kernels: depth-3 relu MLP under NTP, d_in 10, one output, float64. The exact path (Gaussian integrals)
against the Monte Carlo path and against the empirical NTK of instantiated NTP networks
(``tplimits.diagnostics.kernels.empirical_ntk``: torch.func, a vjp and a jvp per column, with each
parameter's lr_scale·grad_scale), time and relative Frobenius gap. Then the exact NNGP and NTK of
``--big-rows`` inputs of the MLP and of each ``--cnn-rows`` count of images of :class:`SmallCNN`, each
timed ``--repeats`` times (the minimum; the first call, which reads each contribution's width power, apart; the
minor page faults per run: memory the allocator took back from the system), and with
``--nt-python`` (a separate virtual environment with neural-tangents 0.6.5, jax/jaxlib 0.4.23, numpy<2:
never a dependency of tplimits) its jitted analytic ``stax`` kernels of the same inputs, compiled on them
before timing and timed as many times in the same run, both sides pinned to the same ``--threads`` cores:
the ratio of the minima (of the wall-clock time, and of the processor time, which a loaded machine disturbs
less) and the largest differences. The conversion: the first ``Dense`` in
``parameterization="standard"`` (NTP trains the first layer's N(0, 1/d) entries directly, so its weight term
is ``x·x'`` without ``1/d``), hidden ``Dense(W_std=1, b_std=1)``, the readout ``Dense(W_std=1, b_std=0)`` (the
output bias enters times n^-1/2 and leaves no limit term); both convolutions ``Conv(1, (3, 3), "SAME",
W_std=1, b_std=1, parameterization="standard")`` (NTP keeps the offsets' fan-in constant 1/√9 in the initial
standard deviation, n^-1/2 in the multiplier), then ``Relu``, ``GlobalAvgPool``, the same readout.

Protocol (Tensor Programs IVb, Ch. 5; MATH.md §10): relu MLP with 4 hidden layers under NTP, inputs
in R^10, one output, mse on random targets, Adam (lr 0.2, eps 1e-4), full batch, the initial function
subtracted (center=True), seeds per width. The defaults are smaller than the paper's (samples,
widths, steps) so that a run fits a few minutes on 2 CPU cores; the flags give the paper's sizes.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import tempfile
import time
from collections.abc import Callable

import torch

import tplimits as tpl
from tplimits.diagnostics.kernels import empirical_ntk as weighted_ntk


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


NT_REFERENCE = """
import sys, time, numpy as np
from jax import config
config.update("jax_enable_x64", True)
import jax
from neural_tangents import stax
X, model, depth, repeats = np.load(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if model == "mlp":
    layers = [stax.Dense(1, W_std=1.0, b_std=1.0, parameterization="standard"), stax.Relu()]
    for _ in range(depth - 1):
        layers += [stax.Dense(1, W_std=1.0, b_std=1.0), stax.Relu()]
    layers += [stax.Dense(1, W_std=1.0, b_std=0.0)]
else:  # inputs NHWC
    layers = [stax.Conv(1, (3, 3), padding="SAME", W_std=1.0, b_std=1.0, parameterization="standard"), stax.Relu(),
              stax.Conv(1, (3, 3), padding="SAME", W_std=1.0, b_std=1.0, parameterization="standard"), stax.Relu(),
              stax.GlobalAvgPool(), stax.Dense(1, W_std=1.0, b_std=0.0)]
kernel_fn = jax.jit(stax.serial(*layers)[2], static_argnames="get")
kernel_fn(X, None, ("nngp", "ntk")).ntk.block_until_ready()  # compile for these inputs, not timed
times, cpu = [], []
for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    k = kernel_fn(X, None, ("nngp", "ntk"))
    k.ntk.block_until_ready()
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
np.save(sys.argv[5], np.stack([np.asarray(k.nngp), np.asarray(k.ntk)]))
print(" ".join(map(str, times)))
print(" ".join(map(str, cpu)))
"""


class SmallCNN(torch.nn.Module):
    """3x3 convolution (c_in → width, padding 1), relu, 3x3 convolution (width → width), relu, global average
    pooling, linear readout: neural-tangents' Conv(SAME) → Relu → Conv(SAME) → Relu → GlobalAvgPool → Dense."""

    def __init__(self, width: int, c_in: int = 2) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c_in, width, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.mean(dim=(2, 3)))


def _pin(threads: int) -> None:
    """Both sides on the same ``threads`` cores: this process (and the neural-tangents subprocess, which
    inherits the affinity) and torch's intra-op threads."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads)


def race(name: str, limit: tpl.Limit, X: torch.Tensor, args: argparse.Namespace, nt_inputs: torch.Tensor,
         depth: int = 0) -> None:
    """The exact NNGP and NTK of ``X`` against neural-tangents' jitted ``stax`` kernels, each side ``repeats``
    times in this run (the minimum is the time; the machine is shared): the ratio, and the agreement."""
    limit.setup(X)  # lowering, not timed (as neural-tangents' compilation is not)
    start = time.perf_counter()
    limit.kernel(X * (1 + 1e-9), kind="ntk", path="exact")
    first = time.perf_counter() - start
    ours, ours_cpu = [], []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for r in range(args.repeats):  # inputs that differ, so that no kernel of the last inputs is reused
        Xr = X * (1 + 1e-12 * (r + 1))
        start, start_cpu = time.perf_counter(), time.process_time()
        limit.kernel(Xr, kind="ntk", path="exact"), limit.kernel(Xr, kind="nngp", path="exact")
        ours.append(time.perf_counter() - start)
        ours_cpu.append(time.process_time() - start_cpu)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.repeats
    ntk, nngp = limit.kernel(X, kind="ntk", path="exact").value, limit.kernel(X, kind="nngp", path="exact").value
    print(f"{name}, {len(X)} inputs: exact NNGP and NTK {min(ours):.4f} s (min of {args.repeats}; median "
          f"{sorted(ours)[len(ours) // 2]:.4f}; processor time {min(ours_cpu):.4f}; {faults:.0f} minor page faults "
          f"a run); the first call, which reads each contribution's width power at two widths, {first:.3f} s")
    if not args.nt_python:
        return
    import numpy as np  # only to hand the inputs to the other environment

    with tempfile.TemporaryDirectory() as tmp:
        inputs, out = os.path.join(tmp, "X.npy"), os.path.join(tmp, "K.npy")
        np.save(inputs, nt_inputs.numpy())
        env = dict(os.environ, XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1") \
            if args.threads == 1 else None
        done = subprocess.run([args.nt_python, "-c", NT_REFERENCE, inputs, name, str(depth), str(args.repeats), out],
                              capture_output=True, text=True, check=True, env=env)
        lines = done.stdout.strip().splitlines()
        theirs, theirs_cpu = ([float(t) for t in line.split()] for line in lines[-2:])
        reference = torch.from_numpy(np.load(out))
    off = ~torch.eye(len(X), dtype=torch.bool)
    gaps = [(k - r).abs() for k, r in ((nngp, reference[0]), (ntk, reference[1]))]
    print(f"  neural-tangents stax (jitted): {min(theirs):.4f} s (min of {args.repeats}; median "
          f"{sorted(theirs)[len(theirs) // 2]:.4f}; processor time {min(theirs_cpu):.4f}); ours / theirs "
          f"{min(ours) / min(theirs):.2f} (processor time {min(ours_cpu) / min(theirs_cpu):.2f})")
    print(f"  largest difference off the diagonal NNGP {float(gaps[0][off].max()):.1e}, NTK "
          f"{float(gaps[1][off].max()):.1e}; on the diagonal NNGP {float(gaps[0].diagonal().max()):.1e}, NTK "
          f"{float(gaps[1].diagonal().max()):.1e}")
    if name == "mlp":  # on the diagonal the relu kernels are known in closed form: E[relu'(u)²] = 1/2 exactly
        diagonal = _relu_ntk_diagonal(X, depth)
        print(f"  NTK diagonal against its closed form: ours {float((ntk.diagonal() - diagonal).abs().max()):.1e}, "
              f"neural-tangents {float((reference[1].diagonal() - diagonal).abs().max()):.1e}")


def empirical_ntk(model: torch.nn.Module, opt: torch.optim.Optimizer, X: torch.Tensor) -> torch.Tensor:
    """``Σ_θ lr_scale·grad_scale·∂f/∂θ ∂f/∂θ`` of one finite network (``tplimits.diagnostics.kernels``: one
    vjp and one jvp per column, by torch.func; one column at a time to hold one copy of the parameters)."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    ids = {id(p): name for name, p in model.named_parameters()}
    rate = {ids[id(p)]: g["lr_scale"] * g["grad_scale"] for g in opt.param_groups for p in g["params"]}
    return weighted_ntk(lambda ps: torch.func.functional_call(model, ps, (X,)).reshape(-1), params,
                        rate, columns=1)


def _relu_ntk_diagonal(X: torch.Tensor, depth: int) -> torch.Tensor:
    """K(x, x) of the NTP relu MLP with unit biases: E[relu(u)²] = σ²/2 and E[relu'(u)²] = 1/2 exactly."""
    norms = (X * X).sum(1)
    var, ntk = norms / X.shape[1] + 1, norms + 1  # the first layer's pre-activation and its tangent
    for _ in range(depth - 1):
        var, ntk = var / 2 + 1, var / 2 + 1 + ntk / 2
    return var / 2 + ntk / 2  # the readout


def _gap(value: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.norm(value - exact) / torch.linalg.norm(exact))


def kernels(args: argparse.Namespace) -> None:
    torch.set_default_dtype(torch.float64)
    _pin(args.threads)
    config = {"depth": 3, "d_in": 10, "activation": "relu"}
    g = torch.Generator().manual_seed(0)
    X = torch.randn(args.rows, 10, generator=g)
    limit = tpl.derive("mlp", optimizer="sgd", param="NTP", **config)
    X_big = torch.randn(args.big_rows, 10, generator=g)
    limit.setup(X)  # lowering, not timed
    start = time.perf_counter()
    exact = limit.kernel(X, path="exact")
    print(f"exact NTK, {args.rows} inputs: {time.perf_counter() - start:.3f} s (path {exact.path})")
    start = time.perf_counter()
    mc = limit.kernel(X, path="monte carlo", particles=args.particles, batches=4)
    z = ((mc.value - exact.value) / mc.se).abs()
    print(f"Monte Carlo NTK, {args.particles} particles in 4 systems: {time.perf_counter() - start:.2f} s; relative "
          f"gap {_gap(mc.value, exact.value):.4f}, |z| mean {float(z.mean()):.2f} max {float(z.max()):.2f}")
    for width in args.width:
        kernels_of_seeds = []
        for seed in range(args.seeds):
            model, opt = tpl.instantiate("mlp", width=width, param="NTP", optimizer="sgd", lr=0.1, seed=seed,
                                         example_inputs=None, **config)
            start = time.perf_counter()
            kernels_of_seeds.append(empirical_ntk(model, opt, X))
            print(f"empirical NTK, width {width}, seed {seed}: {time.perf_counter() - start:.1f} s; relative gap "
                  f"{_gap(kernels_of_seeds[-1], exact.value):.4f}")
        if len(kernels_of_seeds) > 1:
            print(f"  width {width}: gap of the seed-averaged kernel "
                  f"{_gap(torch.stack(kernels_of_seeds).mean(0), exact.value):.4f}")
    if args.big_rows:  # 0: the CNN alone
        race("mlp", limit, X_big, args, X_big, config["depth"])
    cnn = None
    for rows in args.cnn_rows:
        X_cnn = torch.randn(rows, 2, args.image, args.image, generator=g)
        cnn = cnn or tpl.derive(SmallCNN, optimizer="sgd", param="NTP", example_inputs=(X_cnn[:2],))
        race("cnn", cnn, X_cnn, args, X_cnn.permute(0, 2, 3, 1))


def _op_time(fn: Callable[[], object], repeats: int) -> float:
    """The minimum over ``repeats`` of the processor time of ten calls of ``fn``, per call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(10):
            fn()
        times.append((time.process_time() - start) / 10)
    return min(times)


def ops(args: argparse.Namespace) -> None:
    """What the exact path's passes over ``N × N`` float64 tensors cost on this CPU (``--big-rows``), one thread,
    into buffers: the angle's square root as torch's ``sqrt`` and as the path's ``x⁺·max(x, tiny)^-½``, the
    candidates for the angle itself, a transposing copy (what mirroring one triangle costs), and the interpreter's
    Python (the MLP's NTK and the NNGP after it at 8 inputs, where the tensors cost nothing)."""
    from tplimits.limit.exact import _sqrt_nonnegative

    _pin(1)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(args.big_rows, 20, generator=g, dtype=torch.float64)
    S = A @ A.T / 20
    var = S.diagonal()
    x = torch.outer(var, var) - S * S
    c = (S / torch.outer(var, var).sqrt()).clamp(-1, 1)
    a, b = torch.empty_like(S), torch.empty_like(S)
    timed = {
        "sqrt (torch.sqrt of the clamped x)": lambda: torch.sqrt(torch.clamp_min(x, 0, out=a), out=a),
        "x⁺·max(x, tiny)^-½ (_sqrt_nonnegative)": lambda: _sqrt_nonnegative(a.copy_(x), b),
        "  of which the copy into the buffer": lambda: a.copy_(x),
        "atan2": lambda: torch.atan2(x, S, out=a),
        "acos of the correlation": lambda: torch.acos(c, out=a),
        "asin of the correlation": lambda: torch.asin(c, out=a),
        "a cheap pass (mul)": lambda: torch.mul(S, S, out=a),
        "a transposing copy": lambda: a.copy_(S.T),
    }
    for name, fn in timed.items():
        print(f"{name}: {_op_time(fn, args.repeats) * 1e3:.3f} ms over {args.big_rows} × {args.big_rows}")
    limit = tpl.derive("mlp", optimizer="sgd", param="NTP", depth=3, d_in=10, activation="relu")
    X = torch.randn(8, 10, generator=g, dtype=torch.float64)
    limit.kernel(X, path="exact")
    ntk, nngp = [], []
    for r in range(10 * args.repeats):  # new inputs each time: the NNGP after the NTK of the same rows is kept
        Xr = X * (1 + 1e-12 * (r + 1))
        start = time.process_time()
        limit.kernel(Xr, kind="ntk", path="exact")
        middle = time.process_time()
        limit.kernel(Xr, kind="nngp", path="exact")
        ntk.append(middle - start)
        nngp.append(time.process_time() - middle)
    print(f"MLP, 8 inputs: NTK {min(ntk) * 1e3:.2f} ms, the NNGP after it {min(nngp) * 1e3:.2f} ms (processor time, "
          f"minimum of {len(ntk)})")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            Count.calls += 1
            return func(*args, **(kwargs or {}))
    X = torch.randn(args.big_rows, 10, generator=g, dtype=torch.float64)
    for warm in (2, 3):  # the structure of these shapes found, then kept under the contributions' known powers
        limit.kernel(X * warm, kind="ntk", path="exact")
    with Count():
        limit.kernel(X, kind="ntk", path="exact"), limit.kernel(X, kind="nngp", path="exact")
    print(f"MLP, {args.big_rows} inputs: {Count.calls} tensor operations for the NTK and the NNGP")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["protocol", "cost", "kernels", "ops"], nargs="+")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 512, 4096])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--particles", type=int, default=2**13)
    parser.add_argument("--copies", type=int, default=None)
    parser.add_argument("--plot", default="nt-adam-protocol.png")
    parser.add_argument("--rows", type=int, default=32, help="kernels: inputs of the three-way comparison")
    parser.add_argument("--width", type=int, nargs="+", default=[4096], help="kernels: widths of the empirical NTK")
    parser.add_argument("--big-rows", type=int, default=512, help="kernels: inputs of the MLP's timing (0: none)")
    parser.add_argument("--nt-python", default=None, help="kernels: python of a venv with neural-tangents 0.6.5")
    parser.add_argument("--cnn-rows", type=int, nargs="+", default=[32], help="kernels: inputs of the CNN timings")
    parser.add_argument("--image", type=int, default=3, help="kernels: the CNN's images are image × image")
    parser.add_argument("--repeats", type=int, default=7, help="kernels: timed runs of each side (the minimum)")
    parser.add_argument("--threads", type=int, default=1, help="kernels: cores (and threads) of both sides")
    args = parser.parse_args()
    for what in args.what:
        {"protocol": protocol, "cost": cost, "kernels": kernels, "ops": ops}[what](args)


if __name__ == "__main__":
    main()
