"""Update rules (the entrywise update functions ``Q_t`` of Tensor Programs IVb, Sec. 2.1) and the
finite-width ``torch.optim`` optimizer that applies them.

An :class:`UpdateRule` is the single source of truth of an optimizer: a pure tensor function with a
recursive state, ``(state, g_t, t, hyper) -> (Q_t, new_state)``, applied entrywise. The finite-width
:class:`TplimitsOptimizer` runs it on parameter tensors; the limit engines run the same function on
tensors of any shape (particles, particle pairs).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import attrs
import torch
from torch import nn

from tplimits.errors import ConfigError, OptionError, PluginError, check_option

State = dict[str, torch.Tensor]
UpdateFn = Callable[[State, torch.Tensor, int, Mapping[str, Any]], tuple[torch.Tensor, State]]
DescendFn = Callable[[torch.Tensor, State, torch.Tensor, int, Mapping[str, Any], float, torch.Tensor | None], None]

GROUP_OPTIONS: Mapping[str, Any] = {
    "lr_scale": 1.0,
    "grad_scale": 1.0,
    "weight_decay": 0.0,
    "normalize": False,
    "clip": None,
}
"""Per-group options of :class:`TplimitsOptimizer` besides ``lr``, with their defaults."""

_RESERVED = {"params", "lr", "rule", *GROUP_OPTIONS}


class MatrixAction(Protocol):
    """A matrix ``R`` as a non-gradient rule sees it: applied to the rows of a batch."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``R x`` for each row: [K, n_in] -> [K, n_out]."""

    def transpose(self, z: torch.Tensor) -> torch.Tensor:
        """``Rᵀ z`` for each row: [K, n_out] -> [K, n_in]."""


@attrs.frozen
class DenseAction:
    """A finite-width matrix as a :class:`MatrixAction`."""

    matrix: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.T

    def transpose(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.matrix


@attrs.frozen
class UpdateRule:
    """An entrywise update function ``Q_t(g_0, ..., g_t)`` written as a recursion over a state.

    ``init_state(g)`` returns the state for a gradient tensor shaped like ``g`` (before step 0);
    ``update(state, g_t, t, hyper)`` returns ``(Q_t, new_state)`` for step ``t = 0, 1, 2, ...``. It
    must be pure (no in-place change of ``state`` or ``g_t``) and entrywise, so it runs unchanged on
    tensors of any shape. ``hyper`` holds exactly the keys of ``defaults``.

    Flags: ``memoryless`` (Def 2.1.1: ``Q_t`` depends on ``g_t`` only), ``stationary`` (Def 2.1.2:
    memoryless and the same function at every ``t``), ``homogeneity`` (the degree ``k`` with
    ``Q(s g) = s^k Q(g)`` for ``s > 0`` at the default hyperparameters, ``None`` if not homogeneous),
    ``linear`` (``Q`` is linear in the gradients, so a limit may keep low-rank factors).
    ``homogeneity_fn(hyper)`` gives the degree at other hyperparameters (e.g. Adam with ``eps = 0``).

    A rule with ``needs_activations=True`` (a non-gradient rule, e.g. decorrelation) is not driven by
    gradients but by the batch of inputs ``x`` ([K, n_in]) of its matrix's layer.
    ``signal(R, x, hyper) -> (A, B)`` gives the tensor fed to ``update`` in place of a gradient as a
    batch average of outer products, ``Aᵀ B / (K·n_out)`` with ``A``: [K, n_out], ``B``: [K, n_in] — the
    units of a gradient, so the same rule has an infinite-width limit. ``R`` is a :class:`MatrixAction`:
    the finite optimizer passes the dense matrix, the limit engines an operator on kets, so one
    definition serves both; each coordinate (column) of ``A`` and ``B`` comes from the same coordinate of
    ``R``'s products and of ``x`` alone (a limit sharded over processes sees a rank's coordinates).
    ``rescale(z_old, z_new, hyper)``, if given, is a factor the matrix is multiplied by after the step, from the
    layer's outputs before and after it (``R x``, [K, n_out]); it must be a ratio of averages over coordinates
    so that it has a limit. ``option_defaults`` overrides the defaults of the optimizer's group options
    (:data:`GROUP_OPTIONS`), e.g. a default weight decay.

    ``descend_in_place(p, state, g, t, hyper, step, scratch)``, optional, is a fast path of the same step for a
    tensor updated in place: ``p ← p − step · Q_t`` with ``state``'s tensors overwritten by the new state's;
    ``scratch`` is a tensor of ``p``'s shape it may overwrite, and it allocates no other temporary. It must
    agree with ``update`` to rounding (tests/test_in_place_rules.py checks the built-in ones);
    :func:`apply_rule_in_place` runs it, tile by tile, wherever the update can be cut into tiles, and
    ``update`` everywhere else (normalized or clipped updates, the limit's differentiable steps). A fast path
    with ``descend_scratch=False`` gets ``scratch=None`` and takes a given gradient in one piece, untiled
    (SGD's single pass).
    """

    name: str
    init_state: Callable[[torch.Tensor], State]
    update: UpdateFn
    defaults: Mapping[str, Any] = attrs.field(converter=dict)
    memoryless: bool
    stationary: bool
    homogeneity: float | None
    linear: bool
    description: str = ""
    homogeneity_fn: Callable[[Mapping[str, Any]], float | None] | None = None
    needs_activations: bool = False
    signal: Callable[[MatrixAction, torch.Tensor, Mapping[str, Any]], tuple[torch.Tensor, torch.Tensor]] | None = None
    rescale: Callable[[torch.Tensor, torch.Tensor, Mapping[str, Any]], torch.Tensor] | None = None
    option_defaults: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    descend_in_place: DescendFn | None = None
    descend_scratch: bool = True

    def __attrs_post_init__(self) -> None:
        clash = sorted(_RESERVED & set(self.defaults))
        if clash:
            raise PluginError(f"update rule {self.name!r}: hyperparameters {clash} clash with optimizer options")
        unknown = sorted(set(self.option_defaults) - set(GROUP_OPTIONS))
        if unknown:
            raise PluginError(
                f"update rule {self.name!r}: option_defaults {unknown} are not optimizer options "
                f"({sorted(GROUP_OPTIONS)})"
            )
        if self.stationary and not self.memoryless:
            raise PluginError(f"update rule {self.name!r}: stationary requires memoryless (Def 2.1.2)")
        if self.needs_activations and self.signal is None:
            raise PluginError(f"update rule {self.name!r}: needs_activations=True requires a signal function")
        if self.rescale is not None and not self.needs_activations:
            raise PluginError(f"update rule {self.name!r}: rescale applies to rules driven by activations only")
        if self.homogeneity_fn is not None and self.homogeneity_fn(self.defaults) != self.homogeneity:
            raise PluginError(
                f"update rule {self.name!r}: homogeneity={self.homogeneity} disagrees with "
                f"homogeneity_fn(defaults)={self.homogeneity_fn(self.defaults)}"
            )

    def __deepcopy__(self, memo: dict) -> UpdateRule:
        return self

    def hyper(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The defaults updated with ``overrides``; unknown names raise :class:`OptionError` (a ``TypeError``),
        values not of their default's kind :class:`ConfigError`."""
        if overrides is not None and not isinstance(overrides, Mapping):
            raise ConfigError(f"update rule {self.name!r}: hyperparameters must be a mapping {{name: value}}, got "
                              f"{type(overrides).__name__}")
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self.defaults), key=repr)
        if unknown:
            raise OptionError(
                f"update rule {self.name!r} has no hyperparameter(s) {unknown}; known: {sorted(self.defaults)}"
            )
        for key, value in overrides.items():
            check_option(f"update rule {self.name!r}", key, value, self.defaults[key])
        return {**self.defaults, **overrides}

    def homogeneity_for(self, hyper: Mapping[str, Any] | None = None) -> float | None:
        """The homogeneity degree at the given hyperparameters (defaults filled in)."""
        if self.homogeneity_fn is None:
            return self.homogeneity
        return self.homogeneity_fn(self.hyper(hyper))

    def Q(self, gradients: Sequence[torch.Tensor], hyper: Mapping[str, Any] | None = None) -> torch.Tensor:
        """``Q_t(g_0, ..., g_t)`` with ``t = len(gradients) - 1``, by running the recursion from the
        initial state."""
        if not gradients:
            raise ValueError("Q needs at least one gradient (g_0)")
        h = self.hyper(hyper)
        state = self.init_state(gradients[0])
        for t, g in enumerate(gradients):
            q, state = self.update(state, g, t, h)
        return q


def _param_list(params: Any) -> list:
    """``params`` as a non-empty list of tensors or param-group dicts (what ``torch.optim`` accepts)."""
    if isinstance(params, torch.Tensor) or not isinstance(params, Iterable) or isinstance(params, str | Mapping):
        raise OptionError(f"params must be an iterable of parameters or param-group dicts (e.g. "
                          f"model.parameters()), got {type(params).__name__}")
    params = list(params)
    if not params:
        raise ConfigError("params is empty: the optimizer has no parameter to update")
    bad = [type(p).__name__ for p in params if not isinstance(p, torch.Tensor | dict)]
    if bad:
        raise OptionError(f"params must hold tensors or param-group dicts, got {sorted(set(bad))}")
    return params


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_group(group: Mapping[str, Any]) -> None:
    """A param group's options, each a finite number in its range (``ConfigError``, also a ``ValueError``)."""
    if not _real(group["lr"]) or group["lr"] < 0:
        raise ConfigError(f"lr must be a finite number >= 0, got {group['lr']!r}")
    if not _real(group["lr_scale"]) or group["lr_scale"] < 0:
        raise ConfigError(f"lr_scale (the n^-c factor) must be a finite number >= 0, got {group['lr_scale']!r}")
    if not _real(group["grad_scale"]) or group["grad_scale"] <= 0:
        raise ConfigError(f"grad_scale (the n^d factor) must be a finite number > 0, got {group['grad_scale']!r}")
    if not _real(group["weight_decay"]) or not 0 <= group["weight_decay"] <= 1:
        raise ConfigError(f"weight_decay is the decoupled lambda of Eq. 2.50, in [0, 1]; got {group['weight_decay']!r}")
    if group["clip"] is not None and (not _real(group["clip"]) or group["clip"] <= 0):
        raise ConfigError(f"clip (the threshold theta of Eq. 2.54) must be a finite number > 0 or None, got "
                          f"{group['clip']!r}")
    if not isinstance(group["normalize"], bool):
        raise ConfigError(f"normalize must be True or False, got {group['normalize']!r}")
    rule = group["rule"]
    for key, default in rule.defaults.items():
        check_option(f"update rule {rule.name!r}", key, group[key], default)


class TplimitsOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` applying an :class:`UpdateRule` (Eqs. 2.4, 2.50, 2.54):

    ``w <- (1 - weight_decay) w - lr * lr_scale * Q_t(grad_scale * g_0, ..., grad_scale * g_t) / nu``

    with ``nu = 1``, or ``nu = ||Q_t||`` (Frobenius norm of the whole tensor) when ``normalize``, and
    ``nu = min(||Q_t||, clip)`` when ``clip`` is set. Every param group carries ``lr``, the options
    of :data:`GROUP_OPTIONS` and the rule's hyperparameters; each parameter has its own step
    counter ``t``. Parameters whose gradient is ``None`` are skipped.

    A param group may carry its own ``rule`` (another :class:`UpdateRule`, e.g. a non-gradient rule for
    some matrices); its options then default to that rule's. For a rule with ``needs_activations=True``
    pass the batch of inputs of each parameter's layer, ``step(activations={param: x})`` (``x`` of shape
    ``[..., fan_in]``), or let the optimizer record them in every forward pass (:meth:`watch`);
    parameters without inputs are skipped and their gradients are ignored.
    """

    def __init__(self, params: Iterable[Any], rule: UpdateRule, *, lr: float, **options: Any) -> None:
        if not isinstance(rule, UpdateRule):
            raise OptionError(f"expected an UpdateRule, got {type(rule).__name__}; use make_optimizer for names")
        params = _param_list(params)
        unknown = sorted(set(options) - _RESERVED - set(rule.defaults))
        if unknown:
            raise OptionError(
                f"unknown option(s) {unknown} for update rule {rule.name!r}; options: "
                f"{sorted(['lr', *GROUP_OPTIONS])}, hyperparameters: {sorted(rule.defaults)}"
            )
        self.rule = rule
        self._recorded: dict[int, torch.Tensor] = {}
        self._watched: set[int] = set()
        defaults = {"lr": lr, **GROUP_OPTIONS, **rule.option_defaults, **rule.defaults, **options, "rule": rule}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        rule = param_group.get("rule", self.rule)
        if not isinstance(rule, UpdateRule):
            raise OptionError(f"a param group's rule must be an UpdateRule, got {type(rule).__name__}")
        if rule is not self.rule:  # the group's own rule sets its defaults
            for key, value in {**GROUP_OPTIONS, **rule.option_defaults, **rule.defaults}.items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    def watch(self, param: torch.Tensor, module: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Record the first positional input of ``module`` in every forward pass as the layer input of
        ``param`` (a parameter of an activation-driven group), for the next :meth:`step`."""
        if not isinstance(module, nn.Module):
            raise ConfigError(f"watch(param, module): module must be an nn.Module, got {type(module).__name__}")
        driven = {id(p) for g in self.param_groups if g["rule"].needs_activations for p in g["params"]}
        if id(param) not in driven:
            raise ConfigError("watch(param, module): param is not a parameter of this optimizer's groups driven by "
                              "layer inputs (a non-gradient rule)")
        self._watched.add(id(param))
        return module.register_forward_pre_hook(functools.partial(_store_input, self._recorded, id(param)))

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "rule": self.rule, "_recorded": self._recorded, "_watched": self._watched}

    def __repr__(self) -> str:
        return f"{type(self).__name__}[{self.rule.name}]" + super().__repr__()[len(type(self).__name__) :]

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict with rules by name (checked by :meth:`load_state_dict`), a snapshot: steps
        update the rule states in place, so their tensors are copied."""
        packed = super().state_dict()
        state = _copied_states(packed["state"])
        groups = [{**g, "rule": g["rule"].name} for g in packed["param_groups"]]
        return {**packed, "state": state, "param_groups": groups, "rule": self.rule.name}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        saved = state_dict.get("rule", self.rule.name)
        if saved != self.rule.name:
            raise PluginError(f"state dict is for update rule {saved!r}, this optimizer runs {self.rule.name!r}")
        groups = [dict(g) for g in state_dict["param_groups"]]
        for group, own in zip(groups, self.param_groups, strict=False):
            name = group.get("rule", own["rule"].name)
            if name != own["rule"].name:
                raise PluginError(f"state dict has a param group of update rule {name!r} where this optimizer "
                                  f"runs {own['rule'].name!r}")
            group["rule"] = own["rule"]
        super().load_state_dict({"state": _copied_states(state_dict["state"]), "param_groups": groups})

    def _inputs(self, activations: Mapping[torch.Tensor, torch.Tensor] | None) -> dict[int, torch.Tensor]:
        driven = [g for g in self.param_groups if g["rule"].needs_activations]
        if not driven:
            if activations is not None:
                raise ConfigError(f"update rule {self.rule.name!r} is driven by gradients; it takes no activations")
            return {}
        if activations is None:
            if not self._watched:
                names = sorted({g["rule"].name for g in driven})
                raise ConfigError(f"update rule(s) {names} need the inputs of each parameter's layer: call "
                                 "step(activations={param: x})")
            missing = [id(p) for g in driven for p in g["params"] if id(p) in self._watched
                       and id(p) not in self._recorded]
            if missing:
                raise ConfigError("a rule-driven parameter's layer has not run since the last step: call the "
                                 "model before opt.step()")
            return dict(self._recorded)
        own = {id(p) for group in driven for p in group["params"]}
        stray = [tuple(k.shape) for k in activations if id(k) not in own]
        if stray:
            raise ConfigError(f"activations given for tensors that are not parameters of this optimizer: {stray}")
        return {id(p): x for p, x in activations.items()}

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        activations: Mapping[torch.Tensor, torch.Tensor] | None = None,
    ) -> Any:
        """One update of every parameter with a gradient (or, for activation rules, with inputs).
        ``closure`` re-evaluates the model and returns the loss, which is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        inputs = self._inputs(activations)
        for group in self.param_groups:
            rule = group["rule"]
            hyper = {k: group[k] for k in rule.defaults}
            for p in group["params"]:
                x = inputs.get(id(p))
                if rule.needs_activations:
                    if x is None:
                        continue
                    x = _batch_rows(p, x)
                    g = activation_signal(rule, DenseAction(p.detach()), x, hyper, p.shape[0])
                else:
                    if p.grad is None:
                        continue
                    if p.grad.is_sparse:
                        raise RuntimeError("TplimitsOptimizer does not support sparse gradients")
                    g = p.grad
                self._update(p, g, x, group, hyper)
        self._recorded.clear()
        return loss

    def _update(
        self, p: torch.Tensor, g: torch.Tensor, x: torch.Tensor | None, group: Mapping[str, Any], hyper: dict
    ) -> None:
        # in place, in tiles: a fresh tensor of the parameter's size per step costs as much as the rule on CPU
        rule, scale = group["rule"], group["grad_scale"]
        z_old = DenseAction(p)(x) if rule.rescale is not None else None
        state = None
        if p.is_contiguous():
            whole = rule.descend_in_place is not None and not rule.descend_scratch and scale == 1
            state = apply_rule_in_place(rule, p.view(-1), _gradient_tiles(g.reshape(-1), scale),
                                        _flat_state(self.state[p]), group, hyper, tile=p.numel() if whole else None)
        if state is not None:
            self.state[p] = _shaped_state(state, p.shape)
        else:
            q, self.state[p] = rule_direction(rule, g * scale if scale != 1 else g, self.state[p], group, hyper)
            _descend(p, q, group)
        if rule.rescale is not None:
            p.mul_(rule.rescale(z_old, DenseAction(p)(x), hyper))


def _gradient_tiles(g: torch.Tensor, scale: float) -> Callable[[slice], torch.Tensor]:
    """The tiles ``scale · g[rows]`` of a flat gradient: views of it at scale 1, else each written into one buffer
    (valid until the next tile)."""
    if scale == 1:
        return g.__getitem__
    buffer = g.new_empty(0)

    def tile(rows: slice) -> torch.Tensor:
        part = g[rows]
        if buffer.numel() < part.numel():
            buffer.resize_(part.numel())
        return torch.mul(part, scale, out=buffer[: part.numel()])

    return tile


def _copied_states(states: Mapping[Any, Mapping[str, Any]]) -> dict[Any, dict[str, Any]]:
    """Per-parameter optimizer states with their rule-state tensors copied (steps update them in place)."""
    return {k: {key: {n: t.clone() if torch.is_tensor(t) else t for n, t in val.items()} if isinstance(val, dict)
                else val for key, val in v.items()}
            for k, v in states.items()}


def _flat_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer state with its tensors as flat views (the same storage)."""
    if not state:
        return {}
    return {**state, "q_state": {k: v.view(-1) if torch.is_tensor(v) and v.is_contiguous() else v
                                 for k, v in state["q_state"].items()}}


def _shaped_state(state: Mapping[str, Any], shape: torch.Size) -> dict[str, Any]:
    return {**state, "q_state": {k: v.view(shape) for k, v in state["q_state"].items()}}


def _batch_rows(R: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The layer inputs ``x`` of matrix ``R`` as rows ``[K, n_in]`` (leading axes flattened)."""
    if R.ndim != 2:
        raise ConfigError(f"a matrix driven by layer inputs must be 2-d, got shape {tuple(R.shape)}")
    if x.shape[-1] != R.shape[1]:
        raise ConfigError(f"layer inputs of shape {tuple(x.shape)} do not match R of shape {tuple(R.shape)}")
    return x.detach().reshape(-1, R.shape[1])


def _store_input(store: dict[int, torch.Tensor], key: int, module: nn.Module, args: tuple) -> None:
    store[key] = args[0].detach()


def activation_signal(rule: UpdateRule, R: MatrixAction, x: torch.Tensor, hyper: Mapping[str, Any],
                      n_out: int) -> torch.Tensor:
    """The dense signal ``Aᵀ B / (K·n_out)`` of a non-gradient rule on the batch ``x`` ([K, n_in])."""
    A, B = rule.signal(R, x, hyper)
    return A.T @ B / (A.shape[0] * n_out)


def apply_rule(rule: UpdateRule, p: torch.Tensor, g: torch.Tensor, state: Mapping[str, Any],
               group: Mapping[str, Any], hyper: Mapping[str, Any], norm_scale: float = 1.0,
               whole: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """One update of ``p`` by ``rule`` with the options of ``group`` (Eqs. 2.4, 2.50, 2.54), as a pure
    function: returns the new tensor and the new state (``{}`` before the first step). ``g`` is the
    already scaled gradient. The limit engine runs it on particles, keeping the autograd graph; where ``p``
    holds a sample of a larger tensor's entries (a copy population), the norm of normalized / clipped
    updates is the larger tensor's, estimated as ``norm_scale`` times the sample's. ``whole``: ``p`` is this
    process's part of a tensor split over processes, and ``whole(s)`` turns a sum over its entries into the
    sum over the whole tensor's (the update's norm is the whole tensor's)."""
    q, new_state = rule_direction(rule, g, state, group, hyper, norm_scale, whole)
    new = p * (1 - group["weight_decay"]) if group["weight_decay"] else p
    return new - (group["lr"] * group["lr_scale"]) * q, new_state


CPU_TILE_ENTRIES = 2**18
"""Entries a CPU update takes at once (2 MiB in float64): its temporaries stay in cache and below the
allocator's threshold for fresh pages (a parameter-sized temporary costs a page fault per 4 KiB)."""
GPU_TILE_ENTRIES = 2**22
"""Entries an accelerator update takes at once (fewer, larger kernel launches)."""


def tile_entries(device: torch.device) -> int:
    """How many entries :func:`apply_rule_in_place` updates at once on ``device``."""
    return CPU_TILE_ENTRIES if device.type == "cpu" else GPU_TILE_ENTRIES


def apply_rule_in_place(rule: UpdateRule, p: torch.Tensor, gradient: Callable[[slice], torch.Tensor],
                        state: Mapping[str, Any], group: Mapping[str, Any], hyper: Mapping[str, Any], axis: int = 0,
                        tile: int | None = None) -> dict[str, Any] | None:
    """:func:`apply_rule` on ``p`` and its state in place, a tile of ``tile`` entries (rows along ``axis``) at a
    time, the gradient of rows ``rows`` being ``gradient(rows)`` (already scaled): memory is ``p`` and its
    state plus one tile, not several ``p``-sized temporaries. Returns the new state (its tensors are the old
    ones, updated), or None without touching anything when the update cannot be cut into tiles: a
    normalized or clipped update needs the norm of the whole update, and a state that is not entrywise
    (one tensor per entry of ``p``) belongs to the whole tensor."""
    state = state or {"step": 0, "q_state": rule.init_state(p)}
    entrywise = all(torch.is_tensor(v) and v.shape == p.shape for v in state["q_state"].values())
    if group["normalize"] or group["clip"] is not None or not entrywise:
        return None
    tile = tile_entries(p.device) if tile is None else tile
    rows_per_tile = max(1, tile * p.shape[axis] // max(p.numel(), 1))
    if rule.descend_in_place is not None:
        _descend_tiles(rule, p, gradient, state, group, hyper, axis, rows_per_tile)
        return {"step": state["step"] + 1, "q_state": state["q_state"]}
    for start in range(0, p.shape[axis], rows_per_tile):
        rows = slice(start, start + rows_per_tile)
        index = (slice(None),) * axis + (rows,)
        tile_state = {"step": state["step"], "q_state": {k: v[index] for k, v in state["q_state"].items()}}
        q, new_state = rule_direction(rule, gradient(rows), tile_state, group, hyper)
        _descend(p[index], q, group)
        for key, value in new_state["q_state"].items():
            state["q_state"][key][index] = value
    return {"step": state["step"] + 1, "q_state": state["q_state"]}


def _descend_tiles(rule: UpdateRule, p: torch.Tensor, gradient: Callable[[slice], torch.Tensor],
                   state: Mapping[str, Any], group: Mapping[str, Any], hyper: Mapping[str, Any], axis: int,
                   rows: int) -> None:
    """The rule's fast path (``descend_in_place``) on tiles of ``rows`` rows along ``axis``, each a view of ``p``
    and of its state tensors: they are updated where they lie, with no copy back."""
    names = list(state["q_state"])
    step = group["lr"] * group["lr_scale"]
    decay = 1 - group["weight_decay"]
    views = zip(p.split(rows, axis), *(state["q_state"][k].split(rows, axis) for k in names), strict=True)
    scratch = None  # one buffer for every tile: a fresh tile-sized tensor costs page faults on CPU
    for i, (p_tile, *state_tiles) in enumerate(views):
        if scratch is None and rule.descend_scratch:
            scratch = torch.empty(p_tile.numel(), dtype=p.dtype, device=p.device)
        if decay != 1:
            p_tile.mul_(decay)
        rule.descend_in_place(p_tile, dict(zip(names, state_tiles, strict=True)),
                              gradient(slice(i * rows, (i + 1) * rows)), state["step"], hyper, step,
                              None if scratch is None else scratch[: p_tile.numel()].view(p_tile.shape))


def _descend(p: torch.Tensor, q: torch.Tensor, group: Mapping[str, Any]) -> None:
    """``p ← (1 − weight_decay) p − lr · lr_scale · q`` in place."""
    if group["weight_decay"]:
        p.mul_(1 - group["weight_decay"])
    p.add_(q, alpha=-(group["lr"] * group["lr_scale"]))


def rule_direction(rule: UpdateRule, g: torch.Tensor, state: Mapping[str, Any], group: Mapping[str, Any],
                   hyper: Mapping[str, Any], norm_scale: float = 1.0,
                   whole: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """``Q_t / ν`` of :func:`apply_rule` (the rule's output, normalized or clipped as ``group`` says) and the
    new state: the update is ``p ← (1 − weight_decay) p − lr · lr_scale · Q_t / ν``."""
    if not state:
        state = {"step": 0, "q_state": rule.init_state(g)}
    q, q_state = rule.update(state["q_state"], g, state["step"], hyper)
    if group["normalize"] or group["clip"] is not None:
        # split over processes, the norm is of the whole tensor: a number like an expectation, so not differentiated
        norm = torch.linalg.vector_norm(q) if whole is None else whole(q.detach().square().sum()).sqrt()
        nu = norm * norm_scale
        if group["clip"] is not None:
            nu = nu.clamp(max=group["clip"])
        q = q / nu.clamp_min(torch.finfo(q.dtype).tiny)
    return q, {"step": state["step"] + 1, "q_state": q_state}


@contextlib.contextmanager
def record_inputs(modules: Mapping[torch.Tensor, nn.Module]) -> Iterator[dict[torch.Tensor, torch.Tensor]]:
    """Record the (detached) first positional input of each module, keyed by the given parameter,
    during the forward passes run inside the block; the result is ready for
    ``TplimitsOptimizer.step(activations=...)``::

        with record_inputs({layer.decorrelation: layer for layer in layers}) as inputs:
            loss = loss_fn(model(x), y)
        decorrelation_opt.step(activations=inputs)
    """
    recorded: dict[torch.Tensor, torch.Tensor] = {}

    def store(param: torch.Tensor, module: nn.Module, args: tuple) -> None:
        recorded[param] = args[0].detach()

    handles = [module.register_forward_pre_hook(functools.partial(store, p)) for p, module in modules.items()]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def bias_correction(beta: float, t: int) -> float:
    """``1 - beta^(t+1)``, the bias correction of an exponential moving average after step ``t``."""
    return 1 - beta ** (t + 1)


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` with ``0`` where the denominator is ``0`` (e.g. ``eps = 0`` and a
    gradient history of zeros); a NaN stays NaN, as in ``torch.optim``, so a non-finite gradient shows."""
    # in place on the fresh quotient: one tensor of the result's size, not two
    return (numerator / denominator).masked_fill_(denominator == 0, 0)


def _zero_degree_when_zero(names: tuple[str, ...], hyper: Mapping[str, Any]) -> float | None:
    return 0.0 if all(hyper[name] == 0 for name in names) else None


def eps_homogeneity(*names: str) -> Callable[[Mapping[str, Any]], float | None]:
    """A ``homogeneity_fn``: degree 0 when every hyperparameter in ``names`` is 0, else ``None``."""
    return functools.partial(_zero_degree_when_zero, names)


__all__ = [
    "GROUP_OPTIONS",
    "DenseAction",
    "MatrixAction",
    "State",
    "TplimitsOptimizer",
    "UpdateRule",
    "activation_signal",
    "apply_rule",
    "apply_rule_in_place",
    "bias_correction",
    "eps_homogeneity",
    "record_inputs",
    "rule_direction",
    "safe_divide",
]
