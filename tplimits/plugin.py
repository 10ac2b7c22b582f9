"""Everything a plugin author needs, in one module.

A plugin is a module (or object) with ``@hookimpl`` functions named after the hooks of
:class:`~tplimits.registry.specs.TplimitsSpec`; register it with :func:`register_plugin` or through
the ``tplimits`` entry-point group. Each hook returns values of the types below, and every answer
is checked when the plugin registers:

==============================  ================================================================
hook                            returns
==============================  ================================================================
``tplimits_architectures``      a list of :class:`Architecture`
``tplimits_lowering_rules``     ``{op: rule}``, ``rule(ctx: LoweringContext, node: OpNode)``
``tplimits_optimizers``         a list of :class:`UpdateRule` (gradient or non-gradient rules)
``tplimits_parametrizations``   a list of :class:`Parametrization` / :class:`ParametrizationFamily`
``tplimits_losses``             a list of :class:`Loss`
==============================  ================================================================

The built-in plugins (``tplimits.ops.*``, ``tplimits.architectures.*``, ``tplimits.optimizers.*``,
``tplimits.presets``, ``tplimits.losses``) import what they use from here, like any third party.
"""

from tplimits.core.frontend import Architecture
from tplimits.core.ir import Layout, Width, WidthInt, WidthPower, concrete_shape, fn_name, width_axes
from tplimits.core.lower import LoweringContext, MatrixValue, OpNode, Value, is_tensor_value
from tplimits.errors import (
    ConfigError,
    LoweringError,
    NotRepresentable,
    PluginError,
    TplimitsError,
    UnsupportedOperation,
)
from tplimits.ops.common import (
    AFFINE,
    MULTILINEAR,
    Pick,
    aten,
    check_broadcast,
    contract,
    coordinatewise,
    fresh_letters,
    identity,
    letter_axes,
    lower_einsum,
    normalize_dims,
    reduce_sum_or_mean,
    rule_table,
    scale_matrix,
    stop_gradient,
    tensor_args,
    vector_width_axis,
)
from tplimits.optimizers.base import (
    MatrixAction,
    State,
    UpdateRule,
    bias_correction,
    eps_homogeneity,
    safe_divide,
)
from tplimits.registry.manager import register_plugin, unregister_plugin
from tplimits.registry.specs import LoweringRule, hookimpl, hookspec
from tplimits.training.loss import Loss
from tplimits.training.parametrize import ABCD, ROLES, Parametrization, ParametrizationFamily

__all__ = [
    "ABCD",
    "ROLES",
    "Architecture",
    "ConfigError",
    "Layout",
    "Loss",
    "LoweringContext",
    "LoweringError",
    "LoweringRule",
    "MatrixAction",
    "MatrixValue",
    "NotRepresentable",
    "OpNode",
    "Parametrization",
    "ParametrizationFamily",
    "Pick",
    "PluginError",
    "State",
    "TplimitsError",
    "UnsupportedOperation",
    "UpdateRule",
    "Value",
    "Width",
    "AFFINE",
    "MULTILINEAR",
    "WidthInt",
    "WidthPower",
    "aten",
    "bias_correction",
    "check_broadcast",
    "concrete_shape",
    "contract",
    "coordinatewise",
    "eps_homogeneity",
    "fn_name",
    "fresh_letters",
    "hookimpl",
    "hookspec",
    "identity",
    "is_tensor_value",
    "letter_axes",
    "lower_einsum",
    "normalize_dims",
    "reduce_sum_or_mean",
    "register_plugin",
    "rule_table",
    "safe_divide",
    "scale_matrix",
    "stop_gradient",
    "tensor_args",
    "unregister_plugin",
    "vector_width_axis",
    "width_axes",
]
