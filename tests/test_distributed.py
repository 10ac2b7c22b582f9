"""Limits spread over the ranks of a torch.distributed process group (two gloo processes on this CPU).

Each rank trains the limit under the process group (the ``batches`` independent systems spread over
the ranks, the records gathered on every rank); rank 0 then trains the same limit in one process
(``distributed=False``) with the same seed, and every tensor of the two trajectories must be equal bit
for bit. A run that diverges in a system of one rank raises ``Diverged`` on every rank (none waits
forever).
"""

from __future__ import annotations

import os
import pathlib
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tplimits as tpl

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


def _worker(rank: int, size: int, init: str, out: str, backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    device = "cpu"
    if backend == "nccl":
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=size)
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
        try:  # lr far too large: the first system diverges on rank 0, the others would on rank 1
            tpl.derive("mlp", optimizer="sgd", depth=2, d_in=3).train(X, y, steps=5, lr=1e4, particles=256,
                                                                      batches=4, progress=False)
            results["diverged"] = None
        except tpl.Diverged as error:
            results["diverged"] = (type(error).__name__, error.step)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


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


def test_distributed_true_needs_a_process_group():
    X, y = _data()
    limit = tpl.derive("mlp", optimizer="sgd", depth=2, d_in=3)
    with pytest.raises(tpl.TplimitsError, match="distributed=True needs an initialized torch.distributed"):
        limit.train(X, y, steps=1, particles=256, progress=False, distributed=True)
    with pytest.raises(tpl.TplimitsError, match="distributed must be True, False or None"):
        limit.train(X, y, steps=1, particles=256, progress=False, distributed="yes")
