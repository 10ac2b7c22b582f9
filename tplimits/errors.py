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
