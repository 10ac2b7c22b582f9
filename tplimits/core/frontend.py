"""What the user hands over -> two models at two widths -> a lowered Program.

``arch`` may be

* an :class:`Architecture` (what a registered name resolves to) with its config;
* a callable ``width -> nn.Module`` with ``example_inputs``;
* an ``nn.Module`` with ``base=`` the same architecture at another width, and ``example_inputs``.

Names are resolved to these objects by the public entry points (:mod:`tplimits.api`); the front end
knows no registry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from tplimits.core.batch import BatchSpec, generalise
from tplimits.core.lower import lower_trace
from tplimits.core.program import Program
from tplimits.core.trace import (
    GraphTrace,
    ModelPair,
    WidthTrace,
    batch_size,
    build_pair,
    carry_over,
    error_reason,
    infer_widths,
    resize_batch,
    trace_like,
    trace_pair,
)
from tplimits.errors import ConfigError, TplimitsError, check_option

DEFAULT_WIDTH = 64


@attrs.frozen
class Architecture:
    """A named model family that can be built at any width.

    ``build(width, **config)`` returns an ``nn.Module`` whose hidden sizes scale with ``width``;
    ``example_inputs(**config)`` returns a tuple of example inputs (their sizes must not depend
    on width). ``trace_widths`` are the two widths at which the family is traced to find its
    width axes; both must be valid widths for every config (e.g. divisible by the head count).
    ``update_rules`` maps parameter-name patterns to the non-gradient rule that updates them.
    """

    name: str
    build: Callable[..., torch.nn.Module]
    example_inputs: Callable[..., tuple]
    trace_widths: tuple[int, int] = (32, 64)
    defaults: Mapping[str, Any] = attrs.field(factory=dict)
    description: str = ""
    update_rules: Mapping[str, str] = attrs.field(factory=dict)


ArchitectureLike = Architecture | Callable[..., torch.nn.Module] | torch.nn.Module
"""What the front end lowers (a registered name is resolved to its :class:`Architecture` first)."""

ExampleInputs = torch.Tensor | tuple | list | None
"""The positional arguments of the model's forward (one tensor, or a tuple of them)."""


def resolve(arch: ArchitectureLike, example_inputs: ExampleInputs = None, base: torch.nn.Module | None = None,
            **config: Any) -> ModelPair:
    """Turn any accepted form of ``arch`` into a :class:`ModelPair` ready to trace."""
    width = config.pop("width", None)
    if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width < 1):
        raise TplimitsError(f"width must be a positive integer, got {width!r}")
    if isinstance(arch, Architecture):
        _check_options(arch, config)
        inputs = example_inputs if example_inputs is not None else arch.example_inputs(**config)
        n_a, n_b = arch.trace_widths
        return build_pair(lambda n: _module(arch.build(n, **config), arch.name), as_tuple(inputs), n_a, n_b,
                          width or n_a)
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
        return ModelPair(arch, base, as_tuple(example_inputs), n, n_base, width or n)
    if callable(arch):
        if example_inputs is None:
            raise TplimitsError("lowering a callable `width -> nn.Module` needs `example_inputs=`")
        _check_signature(arch, config)
        n = width or DEFAULT_WIDTH
        return build_pair(lambda w: _module(arch(w, **config), arch), as_tuple(example_inputs), n, 2 * n, n)
    raise TplimitsError(f"cannot lower {type(arch).__name__!r}: pass a registered architecture name, a callable "
                        "`width -> nn.Module`, or an nn.Module with `base=`")


def _check_options(arch: Architecture, config: Mapping[str, Any]) -> None:
    """An architecture's options are its own and of the kind of their defaults (a count stays a positive
    integer), so that a wrong value is named here rather than failing inside the model's constructor."""
    unknown = set(config) - set(arch.defaults)
    if arch.defaults and unknown:
        raise TplimitsError(f"architecture {arch.name!r} has no option(s) {sorted(unknown)}; "
                            f"its options are {sorted(arch.defaults)}")
    for key, value in config.items():
        check_option(f"architecture {arch.name!r}", key, value, arch.defaults.get(key))


def _check_signature(build: Callable, config: Mapping[str, Any]) -> None:
    """A callable ``width -> nn.Module`` must take the options it is given."""
    try:
        signature = inspect.signature(build)
    except (TypeError, ValueError):  # a builtin or extension callable: nothing to check up front
        return
    try:
        signature.bind(DEFAULT_WIDTH, **config)
    except TypeError as error:
        name = getattr(build, "__name__", repr(build))
        raise ConfigError(f"{name}{signature} cannot be called as {name}(width, **{dict(config)!r}): {error}; "
                          "options apply to a callable only if it takes them") from None


def _module(model: Any, source: Any) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        name = getattr(source, "__name__", source)
        raise TplimitsError(f"{name!r} built a {type(model).__name__}, not an nn.Module: a callable "
                            "`width -> nn.Module` must return the model at that width")
    return model


def as_tuple(inputs: ExampleInputs) -> tuple:
    """Example inputs as a tuple (a single tensor becomes a 1-tuple)."""
    return tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)


def lower_pair(pair: ModelPair, rules: Mapping[Any, Callable]) -> Program:
    """Trace the two models of ``pair`` and lower them with ``rules`` to a Tensor Program (batch-generic
    where the model allows, see :mod:`tplimits.core.batch`)."""
    traced = trace_pair(pair)
    program = lower_trace(traced, rules, width=pair.width)
    return with_batch_spec(program, traced, pair, rules)


def with_batch_spec(program: Program, traced: WidthTrace, pair: ModelPair, rules: Mapping[Any, Callable]) -> Program:
    """``program`` with how it depends on the batch size, found by lowering the model once more at another batch
    size; or with why it holds at its own batch size only.

    The trace of the second width, taken on more examples, serves when it could be; else, or when its program
    does not generalise (it is also at another width), the model itself is traced on one example more along
    the inputs' batch axis (``traced.batch_axis``: axis 1 of a sequence-first model's inputs), and that decides."""
    axis = traced.batch_axis
    size = batch_size(pair.inputs, axis)
    if size is None:
        return attrs.evolve(program, batch_dependence=f"its inputs have no batch axis (axis {axis} of a tensor input)")
    if traced.batch_trace is not None:
        try:
            return attrs.evolve(program, batch=_generalise(program, traced, (traced.batch_trace, pair.n_other),
                                                           traced.batch_sizes, pair, rules))
        except TplimitsError:  # the same width at another batch size decides below
            pass
    sizes = (size, size + 1)
    try:
        other = trace_like(traced, pair.model, resize_batch(pair.inputs, sizes[1], axis))
    except Exception as error:  # noqa: BLE001 - a model that refuses another batch size: that is the finding
        return attrs.evolve(program, batch_dependence=f"the model fails on {sizes[1]} examples: {error_reason(error)}")
    try:
        return attrs.evolve(program, batch=_generalise(program, traced, (other, pair.n), sizes, pair, rules))
    except TplimitsError as error:  # what differs at the other batch size is why the program is specific to its own
        return attrs.evolve(program, batch_dependence=str(error))


def _generalise(program: Program, traced: WidthTrace, other: tuple[GraphTrace, int], sizes: tuple[int, int],
                pair: ModelPair, rules: Mapping[Any, Callable]) -> BatchSpec:
    """``program``'s batch spec from ``other`` = (a trace at batch size ``sizes[1]`` lined up with ``traced``,
    its width)."""
    trace, width = other
    return generalise(program, lower_trace(carry_over(traced, trace, sizes, width), rules, width=pair.width), sizes)


def lower_architecture(arch: ArchitectureLike, rules: Mapping[Any, Callable], example_inputs: ExampleInputs = None,
                       base: torch.nn.Module | None = None, **config: Any) -> Program:
    """Trace ``arch`` at two widths and lower it with ``rules`` to a Tensor Program."""
    return lower_pair(resolve(arch, example_inputs, base, **config), rules)
