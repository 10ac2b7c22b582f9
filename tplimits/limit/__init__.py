"""The μ-limit engine: Monte Carlo kets, ``derive(...).train(...)`` and ``Limit.check``."""

from tplimits.limit.api import Limit, Trajectory, batch_schedule, derive

__all__ = ["Limit", "Trajectory", "batch_schedule", "derive"]
