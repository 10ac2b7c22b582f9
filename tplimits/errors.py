"""Errors tplimits raises. Every message names the node / parameter / option and what to do."""


class TplimitsError(Exception):
    """Base class of every tplimits error."""


class PluginError(TplimitsError):
    """A plugin is missing, malformed or conflicting."""


class TraceError(TplimitsError):
    """The model could not be traced, or its traces at two widths disagree."""


class WidthError(TplimitsError):
    """Sizes or constants do not scale with width in a way a Tensor Program can express."""


class LoweringError(TplimitsError):
    """Base class of errors raised while lowering a traced graph to a Tensor Program."""


class NotRepresentable(LoweringError):
    """The op is understood but has no Tensor Program counterpart (e.g. max over the width axis)."""


class UnsupportedOperation(LoweringError):
    """No lowering rule is registered for an op."""


class Diverged(TplimitsError):
    """A training run (the limit's or a finite model's) blew up: a non-finite value, or outputs beyond
    the bound of :func:`tplimits.limit.runs.explosion_bound`.

    ``step`` is the step at which it was seen, ``value`` the program value (or model output) that blew up
    first, ``trajectory`` what was computed before it (a :class:`~tplimits.Trajectory` of the system
    that diverged, when the limit diverged; else None).
    """

    def __init__(self, message: str, *, step: int | None = None, value: str | None = None,
                 trajectory: object = None) -> None:
        super().__init__(message)
        self.step, self.value, self.trajectory = step, value, trajectory


class CheckpointError(TplimitsError):
    """A checkpoint file cannot be read, or was written by another run than the one asked for."""


class ConfigError(TplimitsError, ValueError):
    """An option has a value that cannot be used (an architecture's activation, depth, head count, …).
    Also a ``ValueError``, which is what such a value is."""
