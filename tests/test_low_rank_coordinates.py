"""Low-rank updates held as coordinates on the hat bases (``MatrixOperator.add_factor``).

Under a linear rule the update of a hidden matrix is ``Σ_s c_s A_s B_sᵀ``, with ``B_s`` the ket ``W`` was
applied to at step ``s`` and ``A_s`` the cotangent ``Wᵀ`` was applied to. Each was sampled by a hat, so it lies
in the span of that hat's basis; the engine keeps its coordinates there instead of the ``[P, K]`` columns.
Expected values come from the same system with the coordinates switched off (the factors kept as explicit
columns, the formula of Eq. 2.45 as written), which must agree to rounding.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable

import attrs
import pytest
import torch

import tplimits as tpl
from tests.conftest import particle_steps
from tplimits.limit.kets import HatFamily, MatrixOperator
from tplimits.limit.mu import ParticleNetwork
from tplimits.optimizers.base import UpdateRule

pytestmark = pytest.mark.usefixtures("every_direction")  # sampled kets in the span: coordinates throughout


@pytest.fixture(autouse=True)
def _only_rounding_in_the_span(monkeypatch):
    """``HatFamily.DROP`` takes a residual of up to 1e-10 of a ket's energy (1e-5 of its size) as in the span; the
    coordinates then miss that part, which the explicit columns keep (hats of one matrix meet such kets: 1.3e-8 of
    the outputs apart on the transformer). Here only rounding is taken as in the span, so the two must agree."""
    monkeypatch.setattr(HatFamily, "DROP", 1e-16)

CONFIGS = {
    "mlp": (dict(depth=3, d_in=4), lambda: torch.randn(4, 4, generator=torch.Generator().manual_seed(0))),
    "resnet": (dict(stages=1, image_size=4, batch=2, num_classes=3),
               lambda: tpl.architecture("resnet").example_inputs(image_size=4, batch=2)[0]),
    "transformer": (dict(n_layers=1, n_heads=2, vocab=16, seq_len=4, batch=2),
                    lambda: tpl.architecture("transformer").example_inputs(n_layers=1, n_heads=2, vocab=16,
                                                                           seq_len=4, batch=2)[0]),
}


def _run(name: str, optimizer: str, explicit: bool, steps: int = 4, particles: int = 512,
         **extra: object) -> tuple[list[torch.Tensor], ParticleNetwork]:
    options, inputs = CONFIGS[name]
    X = inputs()
    setup = tpl.derive(name, optimizer=optimizer, **options, **extra).setup(X)
    net = ParticleNetwork(setup, particles, 7, torch.float64, "cpu", "stein", 0.3, steps)
    if explicit:
        for operator in net.operators.values():
            for family in operator.families.values():
                family.remembers = False
    shape = net.outputs(net.forward((X,))).shape  # the same extra pass in both variants: the same draws
    target = torch.linspace(-1, 1, math.prod(shape), dtype=torch.float64).reshape(shape)
    return particle_steps(net, X, target, steps, last=True), net


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_coordinates_equal_explicit_factors(name, optimizer):
    held, net = _run(name, optimizer, explicit=False)
    explicit, reference = _run(name, optimizer, explicit=True)
    hidden = [n for n, op in net.operators.items() if op.families and n in net.setup.chosen]
    assert hidden
    for n in hidden:  # every factor held as coordinates, none as columns; the reference the other way round
        operator = net.operators[n]
        # the coordinates fold into the dense core (MatrixOperator._fold_if_cheaper); momentum's later changes to
        # the folded steps go through one mode core, the direction of its buffer
        assert operator.core is not None
        assert operator.mode_cores.shape[0] == (optimizer == "momentum")
        assert (operator.coordinate_steps or operator.core is not None) and operator.out_factors.cat() is None
        assert not reference.operators[n].coordinate_steps and reference.operators[n].out_factors.cat() is not None
    scale = max(float(o.abs().max()) for o in explicit)
    moved = float((explicit[-1] - explicit[0]).abs().max())
    assert moved > 1e-3 * scale  # the updates matter to the outputs compared
    for a, b in zip(held, explicit, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * scale)


def test_a_factor_no_hat_sampled_stays_explicit():
    """A factor that is not bit for bit a ket the hats sampled this step (here: the sampled ket scaled) is
    kept as columns, and the operator applies both kinds."""
    held, net = _run("mlp", "sgd", explicit=False, steps=2)
    operator = next(op for n, op in net.operators.items() if op.families and n in net.setup.chosen)
    x = torch.randn(1, operator.p_in, 3, dtype=torch.float64)
    before = operator.apply_canonical(x, True)
    out_factor = torch.randn(1, operator.p_out, 3, dtype=torch.float64)
    operator.add_factor(out_factor, x, step=0, weight=0.5)
    assert operator.out_factors.cat() is not None and (operator.coordinate_steps or operator.core is not None)
    after = operator.apply_canonical(x, True)
    expected = before + operator.coefficients[0] * operator.scale * 0.5 * out_factor @ (x.mT @ x)
    # the second application also sampled fresh hat directions for nothing new: x is in the span already
    torch.testing.assert_close(after, expected, rtol=1e-9, atol=1e-9)


def test_coordinate_blocks_join_without_growing_past_the_basis():
    """Blocks over a basis that grows to its particles and then stops, while the columns grow every step: the
    store reads as the blocks zero-padded and joined (torch.cat), and its rows never exceed the particles."""
    from tplimits.limit.kets import _Coordinates

    g = torch.Generator().manual_seed(0)
    store, blocks = _Coordinates(most_rows=40), []
    for r in (16, 32, 40, 40, 40, 40, 40, 40):
        block = torch.randn(3, r, 16, generator=g, dtype=torch.float64)
        store.append(block)
        blocks.append(torch.nn.functional.pad(block, (0, 0, 0, 40 - r)))
    assert store.buffer.shape[1] == 40
    torch.testing.assert_close(store.matrix(), torch.cat(blocks, dim=-1), rtol=0, atol=0)


def test_the_folded_core_follows_weight_decay():
    """Weight decay multiplies every earlier step's coefficient, so the folded core with them."""
    held, net = _run("mlp", "sgd", explicit=False, weight_decay=0.2)
    explicit, _ = _run("mlp", "sgd", explicit=True, weight_decay=0.2)
    assert any(op.core is not None for op in net.operators.values())
    scale = max(float(o.abs().max()) for o in explicit)
    for a, b in zip(held, explicit, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * scale)


def _with_rule(rule: UpdateRule, run: Callable[[], object]) -> object:
    plugin = types.ModuleType(rule.name.replace("-", "_"))
    plugin.tplimits_optimizers = tpl.hookimpl(lambda: [rule])
    tpl.register_plugin(plugin, name=rule.name)
    try:
        return run()
    finally:
        tpl.unregister_plugin(plugin)


def _lookback_init(g: torch.Tensor) -> dict:
    return {"previous": torch.zeros_like(g)}


def _lookback(state: dict, g: torch.Tensor, t: int, hyper: dict) -> tuple[torch.Tensor, dict]:
    return g + hyper["rho"] * state["previous"], {"previous": g}


def _hidden_lookback_init(g: torch.Tensor) -> dict:
    return {"previous": torch.zeros_like(g).tolist()}


def _hidden_lookback(state: dict, g: torch.Tensor, t: int, hyper: dict) -> tuple[torch.Tensor, dict]:
    # the same rule, its memory kept as Python numbers: no tensor of its state holds it
    previous = torch.tensor(state["previous"], dtype=g.dtype)
    return g + hyper["rho"] * previous, {"previous": g.detach().tolist()}


LOOKBACK = UpdateRule(name="lookback-test", init_state=_lookback_init, update=_lookback, defaults={"rho": 0.5},
                      memoryless=False, stationary=False, homogeneity=1.0, linear=True)


@pytest.mark.parametrize("case", ["nesterov", "dampening", "weight-decay", "lookback", "declared-memoryless"])
def test_a_rule_with_memory_folds_through_the_directions_of_its_state(case):
    """A linear rule with memory changes earlier steps' coefficients after they are folded: along its state's
    per-step tensors (momentum's buffer, nesterov or damped; a look-back's previous gradient), one mode core each.
    The ``memoryless`` flag is not trusted either way: momentum declared memoryless folds the same. Eight steps
    fold several times, so mode cores are carried from one fold to the next."""
    momentum = tpl.optimizer("momentum")
    rule, extra = {
        "nesterov": ("momentum", {"optimizer_options": {"nesterov": True}}),
        "dampening": ("momentum", {"optimizer_options": {"dampening": 0.3, "momentum": 0.7}}),
        "weight-decay": ("momentum", {"weight_decay": 0.2}),
        "lookback": (LOOKBACK, {}),
        "declared-memoryless": (attrs.evolve(momentum, name="momentum-declared-memoryless", memoryless=True,
                                             stationary=True), {}),
    }[case]

    def both() -> tuple:
        name = rule if isinstance(rule, str) else rule.name
        return (_run("mlp", name, explicit=False, steps=8, **extra),
                _run("mlp", name, explicit=True, steps=8, **extra)[0])

    (held, net), explicit = both() if isinstance(rule, str) else _with_rule(rule, both)
    operators = [op for n, op in net.operators.items() if op.families and n in net.setup.chosen]
    assert all(op.core is not None and op.mode_cores.shape[0] == 1 for op in operators)
    scale = max(float(o.abs().max()) for o in explicit)
    assert float((explicit[-1] - explicit[0]).abs().max()) > 1e-3 * scale
    for a, b in zip(held, explicit, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * scale)


def test_a_rule_whose_memory_its_state_does_not_hold_is_refused():
    """The look-back rule with its memory kept as Python numbers: once its steps are folded, its change to the
    last one lies outside the (empty) span of its state's tensors, and the run stops naming the rule and the
    parameter rather than training on a wrong core."""
    hidden = UpdateRule(name="hidden-lookback", init_state=_hidden_lookback_init, update=_hidden_lookback,
                        defaults={"rho": 0.5}, memoryless=False, stationary=False, homogeneity=1.0, linear=True)
    with pytest.raises(tpl.TplimitsError, match="'hidden-lookback' changes the coefficients of earlier steps of "
                                                "parameter 'layers.1.weight'"):
        _with_rule(hidden, lambda: _run("mlp", "hidden-lookback", explicit=False, steps=4))


def test_a_core_and_the_coordinates_after_it_apply_together(monkeypatch):
    """The coordinates fold when applying them costs what the core would: with the bases growing by as many
    columns per step as the coordinates, at steps 1, 2, 4, 8, …; in between, the steps since the last fold are
    applied beside the core, on bases that grew since it was folded."""
    applied: list[tuple[bool, bool]] = []
    original = MatrixOperator._low_rank_coordinates

    def record(operator, inner, forward):
        out = original(operator, inner, forward)
        applied.append((operator.core is not None, bool(operator.coordinate_steps)))
        return out

    monkeypatch.setattr(MatrixOperator, "_low_rank_coordinates", record)
    held, _ = _run("mlp", "sgd", explicit=False, steps=8)
    monkeypatch.setattr(MatrixOperator, "_low_rank_coordinates", original)
    explicit, _ = _run("mlp", "sgd", explicit=True, steps=8)
    assert (True, True) in applied and (True, False) in applied  # both kinds at once, and the core alone
    scale = max(float(o.abs().max()) for o in explicit)
    for a, b in zip(held, explicit, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * scale)



def test_a_run_resumed_after_a_fold_under_momentum_continues_exactly():
    """The cores, the folded steps, the memory's directions and the rule's memory itself come back from a
    checkpoint: the resumed run folds again (carrying the mode cores) exactly as the run it continues."""
    options, inputs = CONFIGS["mlp"]
    X = inputs()
    y = torch.linspace(-1, 1, 4, dtype=torch.float64)[:, None]
    setup = tpl.derive("mlp", optimizer="momentum", **options).setup(X)
    a = ParticleNetwork(setup, 512, 0, torch.float64, "cpu", "stein", 0.3, 10)
    particle_steps(a, X, y, 4)  # folded at steps 1 and 2, and again in the next step's forward pass, resumed
    assert all(op.mode_cores is not None for n, op in a.operators.items() if op.families and n in setup.chosen)
    b = ParticleNetwork(setup, 512, 99, torch.float64, "cpu", "stein", 0.3, 10)
    b.load_state_dict(a.state_dict())
    for out_a, out_b in zip(particle_steps(a, X, y, 5), particle_steps(b, X, y, 5), strict=True):
        assert torch.equal(out_a, out_b)
