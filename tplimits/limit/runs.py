"""What a run of the limit and the finite-width runs it is checked against share: the schedule of
training rows, the default dtype during instantiation, and standard errors over independent runs."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from tplimits.errors import TplimitsError


def batch_schedule(n_train: int, batch_size: int | None, steps: int, seed: int) -> list[torch.Tensor]:
    """The rows trained on at each step: all of them (``batch_size=None``), or consecutive batches of
    a fresh random permutation per epoch (the last, smaller batch of an epoch included)."""
    everything = torch.arange(n_train)
    if batch_size is None or batch_size >= n_train:
        return [everything] * steps
    if batch_size < 1:
        raise TplimitsError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    schedule: list[torch.Tensor] = []
    while len(schedule) < steps:
        schedule.extend(torch.randperm(n_train, generator=generator).split(batch_size))
    return schedule[:steps]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` for the duration of the block."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def standard_error(samples: torch.Tensor) -> torch.Tensor:
    """The standard error of the mean over the first axis (0 for a single sample)."""
    if samples.shape[0] < 2:
        return torch.zeros_like(samples[0])
    return samples.std(dim=0, unbiased=True) / math.sqrt(samples.shape[0])
