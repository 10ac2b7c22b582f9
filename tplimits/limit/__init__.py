"""The limit engines over shared ket machinery: :mod:`~tplimits.limit.kets` (operators on kets, the
ket interpreter), :mod:`~tplimits.limit.mu` (the μ-limit's particle system), :mod:`~tplimits.limit.limit`
(``Limit.train`` → :class:`Trajectory`) and :mod:`~tplimits.limit.check` (against finite training)."""

from tplimits.limit.check import CheckReport
from tplimits.limit.limit import Limit, Trajectory

__all__ = ["CheckReport", "Limit", "Trajectory"]
