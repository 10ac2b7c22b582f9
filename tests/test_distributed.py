"""Limits spread over the ranks of a torch.distributed process group (two gloo processes on this CPU).

Each rank trains the limit under the process group (the ``batches`` independent systems spread over
the ranks, the records gathered on every rank); rank 0 then trains the same limit in one process
(``distributed=False``) with the same seed, and every tensor of the two trajectories must be equal bit
for bit. A run that diverges in a system of one rank raises ``Diverged`` on every rank (none waits
forever).

Sharded (``distributed="shard"``), every system is split over the ranks by particle rows: each rank's
trajectory must equal the single-process one with the same seed up to the order of the sums over
particles (1e-10 in float64), for the linear-rule path (low-rank factors, autograd and Stein dots),
Adam's pair grids, normalized and clipped updates (norms of whole grids and vectors) and the decorrelation
rule (its rescaling from the whole system's rows), on a depth-3 MLP (autograd dots), the decorrelated MLP
and the Transformer (Stein dots; heads: blocks of n/2 particles). ``Limit.check`` spreads its finite
models over the ranks, each trained as in one process, and ``Limit.kernel`` its Monte Carlo systems, bit
for bit the one-process kernel; ``Limit.compare`` its systems and finite models, bit for bit the
one-process report.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import socket
import warnings

import attrs
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tplimits as tpl
from tplimits.limit.check import CheckReport
from tplimits.limit.compare import FidelityReport

RUNS = {  # name: (derive options, train options)
    "sgd": (dict(optimizer="sgd", depth=2, d_in=3), dict(steps=3, lr=0.5, particles=1024, batches=4,
                                                          kernels=("tanh_1",))),
    "adam-copies": (dict(optimizer="adam", depth=3, d_in=3), dict(steps=3, lr=0.02, particles=768, batches=3,
                                                                  copies=64)),
    "nt-adam": (dict(optimizer="adam", param="NTP", depth=2, d_in=3), dict(steps=3, lr=0.02, particles=512,
                                                                           batches=2, center=True)),
}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)


def _fields(traj: tpl.Trajectory) -> dict[str, torch.Tensor]:
    fields = {"outputs": traj.outputs, "outputs_se": traj.outputs_se, "loss": traj.loss, "loss_se": traj.loss_se}
    fields.update({f"kernel {k}": v for k, v in traj.kernels.items()})
    fields.update({f"kernel se {k}": v for k, v in traj.kernels_se.items()})
    return fields


def _join(rank: int, size: int, init: str, backend: str) -> str:
    """Join the process group as ``rank``; the device this rank computes on."""
    torch.set_num_threads(1)
    device = "cpu"
    if backend == "nccl":
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    # a rank that fails leaves the other waiting in a collective: minutes, not gloo's default half hour
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=size,
                            timeout=datetime.timedelta(minutes=5))
    return device


def _leave() -> None:
    """End a rank whose results are saved: after every rank has saved, tear the group down and exit.

    The barrier keeps a rank from closing its connections while the other still communicates. The
    process then ends without interpreter finalization, where gloo's threads have aborted a finished
    run (``terminate called without an active exception``, SIGABRT) after its results were written.
    """
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _worker(rank: int, size: int, init: str, out: str, backend: str = "gloo") -> None:
    device = _join(rank, size, init, backend)
    try:
        X, y = _data()
        results: dict[str, object] = {}
        for name, (derive, train) in RUNS.items():
            limit = tpl.derive("mlp", **derive)
            spread = limit.train(X, y, progress=False, seed=5, device=device, **train)
            results[name] = {"spread": _fields(spread)}
            if rank == 0:
                single = limit.train(X, y, progress=False, seed=5, device=device, distributed=False, **train)
                results[name]["single"] = _fields(single)
        kernel = tpl.derive("mlp", optimizer="sgd", param="NTP", depth=2, d_in=3)
        options = dict(path="monte carlo", particles=1024, batches=4, seed=5, device=device)
        spread_kernel = kernel.kernel(X, **options)
        results["kernel"] = {"spread": (spread_kernel.value, spread_kernel.se)}
        if rank == 0:
            single_kernel = kernel.kernel(X, distributed=False, **options)
            results["kernel"]["single"] = (single_kernel.value, single_kernel.se)
        compare = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=3)
        options = dict(widths=[16, 32], seeds=3, steps=2, lr=0.5, particles=256, batches=4, progress=False)
        results["compare"] = {"spread": _fidelity(compare.compare(X, y, **options))}
        if rank == 0:
            results["compare"]["single"] = _fidelity(compare.compare(X, y, distributed=False, **options))
        try:  # lr far too large: the first system diverges on rank 0, the others would on rank 1
            tpl.derive("mlp", optimizer="sgd", depth=2, d_in=3).train(X, y, steps=5, lr=1e4, particles=256,
                                                                      batches=4, progress=False)
            results["diverged"] = None
        except tpl.Diverged as error:
            results["diverged"] = (type(error).__name__, error.step)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    _leave()


def _fidelity(report: FidelityReport) -> dict[str, torch.Tensor]:
    """A compare report's tensors (its per-step, per-value statistics)."""
    fields = attrs.asdict(report, recurse=False)
    return {k: v for k, v in fields.items() if isinstance(v, torch.Tensor)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compare(ranks: list[dict], exact: bool) -> None:
    for name in RUNS:
        single = ranks[0][name]["single"]
        assert float(single["outputs_se"].max()) > 0  # several systems, so standard errors are real numbers
        for r, results in enumerate(ranks):
            spread = results[name]["spread"]
            assert spread.keys() == single.keys()
            for key, value in single.items():
                if exact:
                    assert torch.equal(spread[key], value), f"{name}: {key} on rank {r} differs from one process"
                else:  # systems of rank 1 ran on another GPU (of the same kind)
                    torch.testing.assert_close(spread[key], value, rtol=1e-10, atol=1e-12)
    single = ranks[0]["kernel"]["single"]
    assert float(single[1].max()) > 0
    for results in ranks:  # Limit.kernel's systems spread over the ranks too
        for got, want in zip(results["kernel"]["spread"], single, strict=True):
            if exact:
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    single = ranks[0]["compare"]["single"]
    assert float(single["resolution"].max()) > 0
    for results in ranks:  # Limit.compare's systems and finite models spread too
        assert results["compare"]["spread"].keys() == single.keys()
        for key, want in single.items():
            if exact:
                assert torch.equal(results["compare"]["spread"][key], want), key
            else:
                torch.testing.assert_close(results["compare"]["spread"][key], want, rtol=1e-10, atol=1e-12)
    assert [results["diverged"] for results in ranks] == [ranks[0]["diverged"]] * len(ranks)
    assert ranks[0]["diverged"] is not None and ranks[0]["diverged"][0] == "Diverged"


def test_two_gloo_ranks_equal_one_process_bit_for_bit(tmp_path: pathlib.Path):
    size = 2
    mp.spawn(_worker, args=(size, f"tcp://127.0.0.1:{_free_port()}", str(tmp_path)), nprocs=size, join=True)
    _compare([torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(size)], exact=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(), reason="needs 2 GPUs and NCCL")
def test_two_nccl_ranks_equal_one_process(tmp_path: pathlib.Path):
    size = 2
    mp.spawn(_worker, args=(size, f"tcp://127.0.0.1:{_free_port()}", str(tmp_path), "nccl"), nprocs=size,
             join=True)
    _compare([torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(size)], exact=False)


def _transformer(optimizer: str, **options: object) -> tuple[tpl.Limit, torch.Tensor, torch.Tensor]:
    config = dict(n_layers=1, n_heads=2, vocab=16, seq_len=4, batch=2)
    X = tpl.architecture("transformer").example_inputs(**config)[0]
    y = torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(1))
    return tpl.derive("transformer", optimizer=optimizer, **config, **options), X, y


def _mlp(optimizer: str, **options: object) -> tuple[tpl.Limit, torch.Tensor, torch.Tensor]:
    return (tpl.derive("mlp", optimizer=optimizer, depth=3, d_in=3, **options), *_data())


SHARDED = {  # name: (limit, X, y), train options
    "mlp-sgd-autograd": (lambda: _mlp("sgd"), dict(steps=3, lr=0.5, particles=512, batches=2, kernels=("tanh_1",),
                                                    X_test=_data()[0][:2] + 1)),
    "mlp-adam-copies": (lambda: _mlp("adam"), dict(steps=3, lr=0.02, particles=512, batches=2, copies=48)),
    "mlp-adam-dense": (lambda: _mlp("adam"), dict(steps=2, lr=0.02, particles=256, batches=2)),
    # a non-gradient rule: its signal through R's sharded products, its rescaling from the whole system's rows
    "decorrelated-sgd": (lambda: (tpl.derive("decorrelated-mlp", optimizer="sgd", depth=3, d_in=3), *_data()),
                         dict(steps=3, lr=0.5, particles=512, batches=2)),
    "decorrelated-adam-copies": (lambda: (tpl.derive("decorrelated-mlp", optimizer="adam", depth=3, d_in=3),
                                          *_data()), dict(steps=3, lr=0.02, particles=512, batches=2, copies=48)),
    "transformer-sgd": (lambda: _transformer("sgd"), dict(steps=2, lr=0.5, particles=256, batches=2,
                                                          loss="cross_entropy")),
    "transformer-adam-copies": (lambda: _transformer("adam"), dict(steps=2, lr=0.02, particles=256, batches=2,
                                                                   loss="cross_entropy", copies=24)),
    # every update divided by its whole norm: the squares of each rank's rows of grids and vectors all-reduced
    "mlp-sgd-normalized-copies": (lambda: _mlp("sgd", param="muP-normalized"),
                                  dict(steps=3, lr=0.3, particles=512, batches=2, copies=48)),
    # θ₀ = 1 clips some updates and leaves others normalized (the outputs differ from normalized alone by 4e-3)
    "mlp-adam-clipped-dense": (lambda: _mlp("adam", param="muP-normalized", clip=1.0),
                               dict(steps=2, lr=0.02, particles=256, batches=2)),
    # the NT limit: kernel dynamics; grids against copies (gathered to every rank); decayed tangents, whole grids
    "nt-sgd": (lambda: _mlp("sgd", param="NTP"), dict(steps=3, lr=0.5, particles=512, batches=2,
                                                      kernels=("tanh_1",), X_test=_data()[0][:2] + 1)),
    "nt-adam-copies": (lambda: _mlp("adam", param="NTP"), dict(steps=3, lr=0.02, particles=512, batches=2, copies=48,
                                                               center=True)),
    "nt-normalized-decay": (lambda: _mlp("sgd", param="NTP-normalized", weight_decay=0.1),
                            dict(steps=2, lr=0.3, particles=256, batches=2)),
    "nt-transformer-adam": (lambda: _transformer("adam", param="NTP"),
                            dict(steps=2, lr=0.02, particles=256, batches=2, loss="cross_entropy", copies=24)),
}


def _own_mean_signal(R: object, x: torch.Tensor, hyper: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The decorrelation signal normalized by its own mean over coordinates: not coordinate by coordinate."""
    z = R(x)
    z = z / z.square().mean().sqrt()
    return z, R.transpose(z)


OWN_MEAN = attrs.evolve(tpl.optimizer("decorrelation"), name="own-mean", signal=_own_mean_signal)


class _Interleaved(torch.nn.Module):
    """Pairs of neighbouring coordinates summed: a view of the width axis into interleaved blocks."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp, self.out = torch.nn.Linear(3, width), torch.nn.Linear(width // 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(h.view(x.shape[0], -1, 2).sum(-1))


def _report(report: CheckReport) -> dict[str, torch.Tensor]:
    return {"finite_mean": report.finite_mean, "finite_se": report.finite_se, "gap": report.gap,
            "limit": report.limit.outputs}


def _shard_worker(rank: int, size: int, init: str, out: str, backend: str = "gloo") -> None:
    device = _join(rank, size, init, backend)
    try:
        results: dict[str, object] = {}
        for name, (make, train) in SHARDED.items():
            limit, X, y = make()
            with warnings.catch_warnings():  # the Transformer's attention scale under μP
                warnings.simplefilter("ignore", UserWarning)
                sharded = limit.train(X, y, progress=False, seed=5, distributed="shard", device=device, **train)
                results[name] = {"sharded": _fields(sharded) | {"test": sharded.test_outputs}}
                if rank == 0:
                    single = limit.train(X, y, progress=False, seed=5, distributed=False, device=device, **train)
                    results[name]["single"] = _fields(single) | {"test": single.test_outputs}
        if backend == "gloo":
            results.update(_shard_checks(rank, out))
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    _leave()


def _shard_checks(rank: int, out: str) -> dict[str, object]:
    """Limit.check under the process group, the refusals of distributed='shard', a diverging sharded run."""
    results: dict[str, object] = {}
    X, y = _data()
    limit = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=3)
    check = dict(widths=[16, 32], seeds=3, steps=2, lr=0.5, particles=256, batches=2, progress=False)
    results["check"] = {"sharded": _report(limit.check(X, y, distributed="shard", **check))}
    if rank == 0:
        results["check"]["single"] = _report(limit.check(X, y, distributed=False, **check))
    nt = tpl.derive("mlp", optimizer="sgd", param="NTP", depth=2, d_in=3)
    results["kernels"] = {}
    for kind in ("ntk", "nngp"):
        options = dict(kind=kind, X2=X[:2] + 1, path="monte carlo", particles=512, batches=2, seed=3)
        sharded = nt.kernel(X, distributed="shard", **options)
        results["kernels"][kind] = {"sharded": (sharded.value, sharded.se)}
        if rank == 0:
            single = nt.kernel(X, distributed=False, **options)
            results["kernels"][kind]["single"] = (single.value, single.se)
    refused = {"checkpoint": (limit, dict(checkpoint=os.path.join(out, "never.pt"))),
               "odd particles": (limit, dict(particles=2 * 17)),
               "signal not coordinatewise": (tpl.derive("decorrelated-mlp", optimizer="sgd", depth=2, d_in=3,
                                                        update_rules={"*.decorrelation": OWN_MEAN}), {}),
               "interleaved": (tpl.derive(_Interleaved, example_inputs=(X,), optimizer="sgd"), {})}
    results["refusals"] = {}
    for key, (run, options) in refused.items():
        try:
            run.train(X, y, steps=1, progress=False, batches=2, distributed="shard", **{"particles": 64, **options})
            results["refusals"][key] = None
        except tpl.TplimitsError as error:
            results["refusals"][key] = (type(error).__name__, str(error))
    try:
        limit.train(X, y, steps=5, lr=1e4, particles=256, batches=2, progress=False, distributed="shard")
        results["diverged"] = None
    except tpl.Diverged as error:
        results["diverged"] = (type(error).__name__, error.step, error.value)
    return results


def _compare_sharded(ranks: list[dict]) -> None:
    for name in SHARDED:
        single = ranks[0][name]["single"]
        assert float(single["outputs"][-1].abs().max()) > 1e-3 and single["loss"][-1] != single["loss"][0]
        for r, results in enumerate(ranks):
            sharded = results[name]["sharded"]
            assert sharded.keys() == single.keys()
            for key, value in single.items():
                if value is None:
                    assert sharded[key] is None
                    continue
                torch.testing.assert_close(sharded[key], value, rtol=1e-10, atol=1e-12, equal_nan=True,
                                           msg=lambda m, name=name, key=key, r=r: f"{name}: {key} on rank {r}: {m}")
    assert ranks[0]["mlp-sgd-autograd"]["single"]["test"] is not None


def test_one_system_sharded_over_two_gloo_ranks_equals_one_process(tmp_path: pathlib.Path):
    size = 2
    mp.spawn(_shard_worker, args=(size, f"tcp://127.0.0.1:{_free_port()}", str(tmp_path)), nprocs=size, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(size)]
    _compare_sharded(ranks)
    refusals = ranks[0]["refusals"]
    assert refusals["checkpoint"][0] == "CheckpointError"
    odd = refusals["odd particles"][1]
    assert "particles of each system (17) must be a multiple of 2" in odd
    own_mean = refusals["signal not coordinatewise"]
    assert own_mean[0] == "TplimitsError" and "rule 'own-mean'" in own_mean[1]
    assert "coordinate by coordinate" in own_mean[1]
    assert refusals["interleaved"][0] == "NotRepresentable" and "interleaved blocks" in refusals["interleaved"][1]
    assert [results["refusals"] for results in ranks] == [refusals] * size
    single = ranks[0]["check"]["single"]  # finite models spread over the ranks: each trained as in one process
    for results in ranks:
        for key, value in single.items():
            if key in ("limit", "gap"):  # the sharded limit, and the finite models' distance to it
                torch.testing.assert_close(results["check"]["sharded"][key], value, rtol=1e-10, atol=1e-12)
            else:
                assert torch.equal(results["check"]["sharded"][key], value), key
    assert [results["diverged"] for results in ranks] == [ranks[0]["diverged"]] * size
    assert ranks[0]["diverged"] is not None and ranks[0]["diverged"][0] == "Diverged"
    for kind, kernels in ranks[0]["kernels"].items():  # Limit.kernel with each system sharded
        assert float(kernels["single"][0].abs().min()) > 1e-3
        for results in ranks:
            torch.testing.assert_close(results["kernels"][kind]["sharded"], kernels["single"], rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(), reason="needs 2 GPUs and NCCL")
def test_one_system_sharded_over_two_nccl_ranks_equals_one_process(tmp_path: pathlib.Path):
    size = 2
    mp.spawn(_shard_worker, args=(size, f"tcp://127.0.0.1:{_free_port()}", str(tmp_path), "nccl"), nprocs=size,
             join=True)
    _compare_sharded([torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(size)])


def test_distributed_true_needs_a_process_group():
    X, y = _data()
    limit = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=3)
    with pytest.raises(tpl.TplimitsError, match="distributed=True needs an initialized torch.distributed"):
        limit.train(X, y, steps=1, particles=256, progress=False, distributed=True)
    with pytest.raises(tpl.TplimitsError, match="distributed='shard' needs an initialized torch.distributed"):
        limit.train(X, y, steps=1, particles=256, progress=False, distributed="shard")
    with pytest.raises(tpl.TplimitsError, match="distributed must be True, False, None .automatic. or 'shard'"):
        limit.train(X, y, steps=1, particles=256, progress=False, distributed="yes")
    kernel = tpl.derive("mlp", optimizer="sgd", param="NTP", depth=2, d_in=3)
    with pytest.raises(tpl.TplimitsError, match="distributed=True needs an initialized torch.distributed"):
        kernel.kernel(X, path="monte carlo", particles=256, distributed=True)
    with pytest.raises(tpl.TplimitsError, match="distributed='shard' needs an initialized torch.distributed"):
        kernel.kernel(X, path="monte carlo", particles=256, distributed="shard")
    with pytest.raises(tpl.TplimitsError, match="distributed must be True, False, None .automatic. or 'shard'"):
        kernel.kernel(X, path="monte carlo", particles=256, distributed="yes")
    with pytest.raises(tpl.TplimitsError, match="distributed=True needs an initialized torch.distributed"):
        limit.compare(X, y, widths=[16], seeds=2, steps=1, progress=False, distributed=True)
    with pytest.raises(tpl.TplimitsError, match="compare spreads whole particle systems .* pass True"):
        limit.compare(X, y, widths=[16], seeds=2, steps=1, progress=False, distributed="shard")
