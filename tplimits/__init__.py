"""tplimits: infinite-width limits of training any PyTorch model, checked against real training.

>>> import tplimits as tpl
>>> prog = tpl.lower("mlp", depth=2)          # the model as a Tensor Program
>>> sorted({p.kind for p in prog.parameters.values()})
['matrix', 'vector']
"""

from tplimits.core.frontend import lower
from tplimits.core.interpret import FiniteInterpreter, Interpreter
from tplimits.core.program import (
    Avg,
    Constant,
    Input,
    MatMul,
    Nonlin,
    Parameter,
    ParameterInfo,
    Program,
    Regroup,
    Width,
    WidthInt,
    WidthPower,
)
from tplimits.errors import (
    LoweringError,
    NotRepresentable,
    PluginError,
    TplimitsError,
    TraceError,
    UnsupportedOperation,
    WidthError,
)
from tplimits.plugins import (
    Architecture,
    architecture,
    architectures,
    hookimpl,
    lowering_rules,
    plugin_manager,
    register_plugin,
    unregister_plugin,
)

__version__ = "0.1.0"

__all__ = [
    "Architecture",
    "Avg",
    "Constant",
    "FiniteInterpreter",
    "Input",
    "Interpreter",
    "LoweringError",
    "MatMul",
    "Nonlin",
    "NotRepresentable",
    "Parameter",
    "ParameterInfo",
    "PluginError",
    "Program",
    "Regroup",
    "TplimitsError",
    "TraceError",
    "UnsupportedOperation",
    "Width",
    "WidthError",
    "WidthInt",
    "WidthPower",
    "architecture",
    "architectures",
    "hookimpl",
    "lower",
    "lowering_rules",
    "plugin_manager",
    "register_plugin",
    "unregister_plugin",
]
