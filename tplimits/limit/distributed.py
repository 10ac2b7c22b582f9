"""Independent particle systems spread over the ranks of a ``torch.distributed`` process group.

A limit's standard errors come from ``batches`` independent particle systems, each drawn from its own
seed (``_system_seed(seed, b)``), so they can run anywhere: system ``b`` runs on rank ``b mod world
size``, and every rank receives every system's record (``all_gather_object``), in system order. Each
system computes exactly what it computes in one process, so on CPU the gathered run is bit-identical to
the single-process run with the same seed. Launch with ``torchrun --nproc-per-node N script.py``; the
script calls ``torch.distributed.init_process_group("gloo")`` (CPU) or ``"nccl"`` (one GPU per rank:
``torch.cuda.set_device(local_rank)`` and ``device=f"cuda:{local_rank}"``) before training.

An error in one system (a diverging run) stops every rank: the rank that saw it raises it as it was,
the others raise the same error as gathered from that rank, so no rank waits forever for the others.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from tplimits.errors import TplimitsError

Result = TypeVar("Result")


def process_group(distributed: Any) -> tuple[int, int]:
    """``(rank, world size)`` a run is spread over: ``distributed=None`` spreads it over an initialized
    process group if there is one, ``True`` requires one, ``False`` runs everything in this process."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TplimitsError(f"distributed must be True, False or None (automatic), got {distributed!r}")
    ready = dist.is_available() and dist.is_initialized()
    if distributed and not ready:
        raise TplimitsError("distributed=True needs an initialized torch.distributed process group: launch with "
                            "`torchrun --nproc-per-node N script.py` and call "
                            "torch.distributed.init_process_group('gloo') (or 'nccl') first")
    if distributed is False or not ready:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def owned_systems(batches: int, rank: int, size: int) -> range:
    """The independent systems rank ``rank`` of ``size`` runs: ``rank, rank + size, ...``."""
    return range(rank, batches, size)


def spread(batches: int, train_system: Callable[[int], Result], rank: int, size: int) -> list[Result]:
    """``[train_system(b) for b in range(batches)]``, each system run on one rank and the results gathered
    on every rank (in system order). The first failing system's error is raised on every rank."""
    own: dict[int, Any] = {}
    failure: BaseException | None = None
    for b in owned_systems(batches, rank, size):
        try:
            own[b] = train_system(b)
        except Exception as error:  # every rank must reach the gather, or the others wait forever
            own[b], failure = _portable(error), error
            break
    gathered: dict[int, Any] = {}
    if size == 1:
        gathered = own
    else:
        parts: list[Any] = [None] * size
        dist.all_gather_object(parts, own)
        for part in parts:
            gathered.update(part)
    errors = sorted((b, r) for b, r in gathered.items() if isinstance(r, BaseException))
    if errors:
        b, error = errors[0]
        raise failure if failure is not None and b in own else error
    return [gathered[b] for b in range(batches)]


def _portable(error: BaseException) -> BaseException:
    """``error`` as it can travel to the other ranks (pickled): itself, or a TplimitsError naming it."""
    try:
        pickle.dumps(error)
    except Exception:  # an exception holding an unpicklable object: its text travels instead
        return TplimitsError(f"{type(error).__name__}: {error}")
    return error

