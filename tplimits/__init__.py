"""tplimits: infinite-width limits of training any PyTorch model, checked against real training.

>>> import tplimits as tpl
>>> prog = tpl.lower("mlp", depth=2)          # the model as a Tensor Program
>>> sorted({p.kind for p in prog.parameters.values()})
['matrix', 'vector']

The pipeline (docs/architecture.md): :mod:`tplimits.core` (trace, IR, lower, interpret, backprop),
:mod:`tplimits.training` (parametrizations, classification, instantiation, coordinate checks),
:mod:`tplimits.limit` (the limit engines), with the public verbs in :mod:`tplimits.api` and everything
a plugin author needs in :mod:`tplimits.plugin`.
"""

from tplimits.api import classify, coord_check, derive, diagnose, instantiate, linearize, lower, make_optimizer
from tplimits.core.backprop import TotalProgram, total_program
from tplimits.core.frontend import Architecture
from tplimits.core.interpret import FiniteInterpreter, Interpreter
from tplimits.core.ir import (
    Avg,
    Constant,
    Input,
    MatMul,
    Nonlin,
    Parameter,
    ParameterInfo,
    Regroup,
    Width,
    WidthInt,
    WidthPower,
)
from tplimits.core.program import Program
from tplimits.diagnostics.diagnose import Diagnosis, Measure, ParamDiagnosis
from tplimits.diagnostics.linearize import LinearizedModel
from tplimits.errors import (
    BatchSizeError,
    CheckpointError,
    ConfigError,
    Diverged,
    LoweringError,
    NotRepresentable,
    NoWidthWarning,
    PluginError,
    StaleValueError,
    SteinBiasWarning,
    TplimitsError,
    TraceError,
    UnsupportedOperation,
    WidthError,
)
from tplimits.limit import CheckReport, Limit, Trajectory
from tplimits.optimizers.base import TplimitsOptimizer, UpdateRule
from tplimits.registry.manager import (
    architecture,
    list_architectures,
    list_losses,
    list_optimizers,
    list_parametrizations,
    loss,
    lowering_rules,
    optimizer,
    parametrization,
    plugin_manager,
    register_plugin,
    unregister_plugin,
)
from tplimits.registry.specs import hookimpl
from tplimits.training.classify import Verdict
from tplimits.training.loss import Loss
from tplimits.training.model import ParametrizedModel
from tplimits.training.parametrize import ABCD, Parametrization, ParametrizationFamily

__version__ = "0.1.0"

__all__ = [
    "ABCD",
    "Architecture",
    "Avg",
    "BatchSizeError",
    "CheckReport",
    "CheckpointError",
    "ConfigError",
    "Constant",
    "FiniteInterpreter",
    "Diagnosis",
    "Diverged",
    "Input",
    "Interpreter",
    "Limit",
    "LinearizedModel",
    "Loss",
    "LoweringError",
    "MatMul",
    "Measure",
    "Nonlin",
    "NotRepresentable",
    "NoWidthWarning",
    "SteinBiasWarning",
    "StaleValueError",
    "ParamDiagnosis",
    "Parameter",
    "ParameterInfo",
    "Parametrization",
    "ParametrizationFamily",
    "ParametrizedModel",
    "PluginError",
    "Program",
    "Regroup",
    "TotalProgram",
    "TplimitsError",
    "TplimitsOptimizer",
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
    "classify",
    "coord_check",
    "derive",
    "diagnose",
    "hookimpl",
    "instantiate",
    "linearize",
    "list_architectures",
    "list_losses",
    "list_optimizers",
    "list_parametrizations",
    "loss",
    "lower",
    "lowering_rules",
    "make_optimizer",
    "optimizer",
    "parametrization",
    "plugin_manager",
    "register_plugin",
    "total_program",
    "unregister_plugin",
]
