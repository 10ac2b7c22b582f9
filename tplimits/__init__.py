"""tplimits: infinite-width limits of training any PyTorch model, checked against real training.

>>> import tplimits as tpl
>>> prog = tpl.lower("mlp", depth=2)          # the model as a Tensor Program
>>> sorted({p.kind for p in prog.parameters.values()})
['matrix', 'vector']
"""

from tplimits.core.backprop import TotalProgram, total_program
from tplimits.core.coordcheck import coord_check
from tplimits.core.frontend import lower
from tplimits.core.instantiate import ParametrizedModel, instantiate
from tplimits.core.interpret import FiniteInterpreter, Interpreter
from tplimits.core.parametrize import ABCD, Parametrization, Verdict, classify
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
from tplimits.limit import Limit, Trajectory, derive
from tplimits.limit.check import CheckReport
from tplimits.losses import Loss
from tplimits.optimizers import UpdateRule, make_optimizer, optimizer, optimizers
from tplimits.plugins import (
    Architecture,
    architecture,
    architectures,
    hookimpl,
    loss,
    losses,
    lowering_rules,
    parametrization,
    parametrizations,
    plugin_manager,
    register_plugin,
    unregister_plugin,
)

__version__ = "0.1.0"

__all__ = [
    "ABCD",
    "Architecture",
    "Avg",
    "CheckReport",
    "Constant",
    "FiniteInterpreter",
    "Input",
    "Interpreter",
    "Limit",
    "Loss",
    "LoweringError",
    "MatMul",
    "Nonlin",
    "NotRepresentable",
    "Parameter",
    "ParameterInfo",
    "Parametrization",
    "ParametrizedModel",
    "PluginError",
    "Program",
    "Regroup",
    "TotalProgram",
    "TplimitsError",
    "Trajectory",
    "TraceError",
    "UnsupportedOperation",
    "UpdateRule",
    "Verdict",
    "Width",
    "WidthError",
    "WidthInt",
    "WidthPower",
    "architecture",
    "architectures",
    "classify",
    "coord_check",
    "derive",
    "hookimpl",
    "instantiate",
    "loss",
    "losses",
    "lower",
    "lowering_rules",
    "make_optimizer",
    "optimizer",
    "optimizers",
    "parametrization",
    "parametrizations",
    "plugin_manager",
    "register_plugin",
    "total_program",
    "unregister_plugin",
]
