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

``distributed="shard"`` instead splits each particle system over the ranks by particle rows
(:class:`Shard`): memory per rank is the system's divided by the number of ranks, and every rank takes
part in every system.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tplimits.core.ir import Regroup, Width
from tplimits.core.lower import common_block
from tplimits.core.program import Program
from tplimits.errors import TplimitsError

SHARD = "shard"
"""``Limit.train(distributed=SHARD)``: every particle system split over the ranks by particle rows."""

Result = TypeVar("Result")


def process_group(distributed: Any) -> tuple[int, int]:
    """``(rank, world size)`` a run is spread over: ``distributed=None`` spreads it over an initialized
    process group if there is one, ``True`` requires one, ``False`` runs everything in this process;
    ``"shard"`` requires one and shards every system over it."""
    sharded = isinstance(distributed, str) and distributed == SHARD
    if not (distributed is None or isinstance(distributed, bool) or sharded):
        raise TplimitsError(f"distributed must be True, False, None (automatic) or 'shard', got {distributed!r}")
    ready = dist.is_available() and dist.is_initialized()
    if distributed and not ready:
        raise TplimitsError(f"distributed={distributed!r} needs an initialized torch.distributed process group: "
                            "launch with `torchrun --nproc-per-node N script.py` and call "
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


class Shard:
    """The rows of one particle system that rank ``rank`` of ``ranks`` holds (``distributed="shard"``).

    Every width axis of the program is a whole number of blocks of ``unit`` particles (the program's
    finest block of a regroup, such as a head, at the system's width); rank ``k`` holds rows
    ``[k·unit/ranks, (k+1)·unit/ranks)`` of every block, so a regroup that relabels contiguous blocks
    keeps every rank's rows its own and a coordinatewise function needs no other rank's rows. Every sum
    over particles goes through :func:`particle_sum` (an ``all_reduce``), random numbers are drawn full
    size from the system's generator on every rank and cut to the rank's rows (:meth:`rows`), so the
    sharded system computes the unsharded one's numbers up to the order of its sums.
    """

    def __init__(self, rank: int, ranks: int, unit: int, device: torch.device | str = "cpu", group: Any = None) -> None:
        if ranks < 1 or unit % ranks:
            raise TplimitsError(f"a block of {unit} particles cannot be split evenly over {ranks} ranks")
        self.rank, self.ranks, self.unit, self.group = rank, ranks, unit, group
        self.device = torch.device(device)  # where this rank's collectives run (nccl: its GPU)
        self.checked: set[str] = set()  # the regroups found to keep every rank's rows its own
        self._positions: dict[tuple[int, torch.device], torch.Tensor] = {}

    def positions(self, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The indices, in the whole system, of this rank's rows of a width axis of ``size`` particles."""
        key = (size, torch.device(device))
        if key not in self._positions:
            if size % self.unit:
                raise TplimitsError(f"a width axis of {size} particles is not a whole number of blocks of "
                                    f"{self.unit}: it cannot be sharded")
            per = self.unit // self.ranks
            blocks = torch.arange(size // self.unit, device=device)[:, None] * self.unit
            self._positions[key] = (blocks + self.rank * per + torch.arange(per, device=device)).reshape(-1)
        return self._positions[key]

    def rows(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """``t`` (the whole system's size along ``axis``) cut to this rank's rows along ``axis``."""
        size = t.shape[axis]
        if size == self.unit:  # one block: the rows are a slice (a view, no copy)
            per = size // self.ranks
            return t.narrow(axis, self.rank * per, per)
        return t.index_select(axis, self.positions(size, t.device))

    def width_rows(self, t: torch.Tensor, layout: Sequence[Any]) -> torch.Tensor:
        """``t`` (a value of ``layout``, whole-system sizes) cut to this rank's rows along every width axis."""
        for axis, spec in enumerate(layout):
            if isinstance(spec, Width):
                t = self.rows(t, axis)
        return t

    def first_rows(self, t: torch.Tensor, count: int, axis: int = 1) -> torch.Tensor:
        """The first ``count`` rows of the whole system along ``axis`` of ``t`` (this rank's rows there), on
        every rank: each rank writes the ones it holds into zeros and the ranks' tensors are summed, so every
        row arrives exactly as its rank has it."""
        where = self.positions(t.shape[axis] * self.ranks, t.device)
        mine = (where < count).nonzero().squeeze(1)
        shape = list(t.shape)
        shape[axis] = count
        out = t.new_zeros(shape).index_copy_(axis, where[mine], t.detach().index_select(axis, mine))
        dist.all_reduce(out, group=self.group)
        return out

    def whole(self, t: torch.Tensor, axis: int = 1) -> torch.Tensor:
        """``t`` (this rank's rows along ``axis``) as the whole system's tensor, in its row order, on every rank
        (detached): for a function of particles that is not a sum over them, such as a plugin's own mean."""
        return self.first_rows(t, t.shape[axis] * self.ranks, axis)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (a new tensor, on every rank)."""
        out = t.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=self.group)
        return out

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank (the same answer on every rank)."""
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def local_size(self, size: int) -> int:
        """The rows of a width axis of ``size`` particles this rank holds."""
        return size // self.ranks


def shard_of(program: Program, particles: int, rank: int, ranks: int, device: torch.device | str = "cpu",
             group: Any = None) -> Shard:
    """Rank ``rank``'s shard of a system of ``particles`` particles running ``program``: its unit is the
    program's finest block (the common block of every width ratio and regroup)."""
    ratios = [spec.ratio for ins in program.instructions for spec in getattr(ins, "layout", ())
              if isinstance(spec, Width)]
    block = common_block(*ratios, *(ins.block for ins in program.instructions if isinstance(ins, Regroup)))
    unit = block * particles
    if unit.denominator != 1 or unit.numerator % ranks:
        need = ranks / block
        raise TplimitsError(f"distributed='shard': the particles of each system ({particles}) must be a multiple of "
                            f"{need.numerator} to split the program's blocks of {Width(block)} particles evenly over "
                            f"{ranks} ranks; choose particles = batches · a multiple of {need.numerator}")
    return Shard(rank, ranks, int(unit), device, group)


def particle_sum(t: torch.Tensor, shard: Shard | None) -> torch.Tensor:
    """``t``, a sum over this process's particles, as the sum over the whole system's: the one reduction
    every average, inner product and Gram matrix over particles goes through."""
    return t if shard is None else shard.sum(t)
