"""What the user hands over -> two models at two widths -> a lowered Program.

``arch`` may be

* a registered architecture name (``"mlp"``, ``"transformer"``, …) with its config;
* a callable ``width -> nn.Module`` with ``example_inputs``;
* an ``nn.Module`` with ``base=`` the same architecture at another width, and ``example_inputs``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tplimits.core.lower import lower_trace
from tplimits.core.program import Program
from tplimits.core.trace import ModelPair, build_pair, infer_widths, trace_pair
from tplimits.errors import TplimitsError
from tplimits.plugins.manager import architecture, lowering_rules

DEFAULT_WIDTH = 64


def resolve(arch: Any, example_inputs: Any = None, base: torch.nn.Module | None = None,
            **config: Any) -> ModelPair:
    """Turn any accepted form of ``arch`` into a :class:`ModelPair` ready to trace."""
    width = config.pop("width", None)
    if isinstance(arch, str):
        spec = architecture(arch)
        unknown = set(config) - set(spec.defaults)
        if spec.defaults and unknown:
            raise TplimitsError(f"architecture {arch!r} has no option(s) {sorted(unknown)}; "
                                f"its options are {sorted(spec.defaults)}")
        inputs = example_inputs if example_inputs is not None else spec.example_inputs(**config)
        n_a, n_b = spec.trace_widths
        return build_pair(lambda n: spec.build(n, **config), _as_tuple(inputs), n_a, n_b, width or n_a)
    if isinstance(arch, torch.nn.Module):
        if example_inputs is None:
            raise TplimitsError("lowering an nn.Module needs `example_inputs=` (a tuple of inputs to its forward)")
        if config:
            raise TplimitsError(f"options {sorted(config)} only apply to registered architectures")
        if base is None:
            raise TplimitsError(
                "an nn.Module alone does not say which axes grow with width: pass `base=` the same "
                "architecture at another width, or pass a callable `width -> nn.Module` instead"
            )
        n, n_base = infer_widths(arch, base)
        return ModelPair(arch, base, _as_tuple(example_inputs), n, n_base, width or n)
    if callable(arch):
        if example_inputs is None:
            raise TplimitsError("lowering a callable `width -> nn.Module` needs `example_inputs=`")
        n = width or DEFAULT_WIDTH
        build: Callable[[int], torch.nn.Module] = lambda w: arch(w, **config)  # noqa: E731
        return build_pair(build, _as_tuple(example_inputs), n, 2 * n, n)
    raise TplimitsError(f"cannot lower {type(arch).__name__!r}: pass a registered architecture name, a callable "
                        "`width -> nn.Module`, or an nn.Module with `base=`")


def _as_tuple(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)


def lower(arch: Any, example_inputs: Any = None, base: torch.nn.Module | None = None, **config: Any) -> Program:
    """Trace ``arch`` at two widths and lower it to a Tensor Program.

    >>> import tplimits as tpl
    >>> prog = tpl.lower("mlp", depth=2, d_in=4, d_out=1)
    >>> prog.parameters["layers.1.weight"].kind
    'matrix'
    """
    pair = resolve(arch, example_inputs, base, **config)
    traced = trace_pair(pair)
    return lower_trace(traced, lowering_rules(), width=pair.width)
