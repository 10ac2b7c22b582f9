"""Errors tplimits raises. Every message names the node / parameter / option and what to do.

Also the one check every named option goes through (an architecture's options, an update rule's
hyperparameters): :func:`check_option`, a value must be of the kind of its default.
"""

import math
from typing import Any


class TplimitsError(Exception):
    """Base class of every tplimits error."""


class PluginError(TplimitsError):
    """A plugin is missing, malformed or conflicting."""


class TraceError(TplimitsError):
    """The model could not be traced, or its traces at two widths disagree."""


class WidthError(TplimitsError):
    """Sizes or constants do not scale with width in a way a Tensor Program can express."""


class BatchSizeError(TplimitsError):
    """A program is run at a batch size it cannot take: it was lowered at another one and its graph depends
    on the batch size, or the inputs do not make a whole batch."""


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


class StaleValueError(TplimitsError):
    """A program value formed only when read (a per-coordinate pullback's, :mod:`tplimits.core.pullback`) was
    read after a value it is formed from changed in place in the interpreter's values; ``value`` names it."""

    def __init__(self, message: str, *, value: str = "") -> None:
        super().__init__(message)
        self.value = value


class CheckpointError(TplimitsError):
    """A checkpoint file cannot be read, or was written by another run than the one asked for."""


class UnknownInitLaw(TplimitsError):
    """A tensor of fixed size (no width axis) is drawn at random by the model from a law the limit cannot
    know (it may depend on the width) while its value matters in the limit; ``parameter`` names it."""

    def __init__(self, message: str, *, parameter: str = "") -> None:
        super().__init__(message)
        self.parameter = parameter


class ConfigError(TplimitsError, ValueError):
    """An option has a value that cannot be used (an architecture's activation, depth, head count, …).
    Also a ``ValueError``, which is what such a value is."""


class NoWidthWarning(UserWarning):
    """A model lowered to a program in which nothing scales with width: its "limit" is the model itself.
    Usually the width is not passed to the layers (a callable ignoring ``width``, or a fixed ``nn.Module``)."""


class SteinBiasWarning(UserWarning):
    """A Monte Carlo limit whose Stein dot estimates see too few particles per direction: a bias of its
    kernels that its standard errors do not show (more particles per system remove it)."""


class OptionError(ConfigError, TypeError):
    """An option that does not exist (an unknown hyperparameter of an update rule, an unknown optimizer
    option). Also a ``TypeError``, which is what ``torch.optim`` raises for one."""


def _conforms(value: Any, default: Any) -> bool:
    """Whether ``value`` can stand where ``default`` does: the same kind (a positive count stays a
    positive integer, a real number stays finite, a tuple keeps its length)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool) and (default <= 0 or value > 0)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(default, tuple | list):
        return (isinstance(value, tuple | list) and len(value) == len(default)
                and all(_conforms(v, d) for v, d in zip(value, default, strict=True)))
    return default is None or isinstance(value, type(default))


def check_option(owner: str, key: str, value: Any, default: Any) -> None:
    """Raise :class:`ConfigError` naming ``owner`` and ``key`` unless ``value`` is of ``default``'s kind."""
    if not _conforms(value, default):
        kind = ("a positive integer" if isinstance(default, int) and not isinstance(default, bool) and default > 0
                else "a finite number" if isinstance(default, float) else type(default).__name__)
        raise ConfigError(f"{owner}: {key}={value!r} must be {kind} like its default ({default!r})")


def check_count(name: str, value: Any, minimum: int) -> None:
    """Raise :class:`TplimitsError` naming ``name`` unless ``value`` is an integer >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise TplimitsError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_real(name: str, value: Any, minimum: float | None = None) -> None:
    """Raise :class:`TplimitsError` naming ``name`` unless ``value`` is a finite number (>= ``minimum``)."""
    if (not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value)
            or minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise TplimitsError(f"{name} must be a finite number{bound}, got {value!r}")
