"""The built-in architecture plugins, used directly (no entry points needed)."""

from __future__ import annotations

import copy
import inspect
import itertools

import pytest
import torch
from torch import nn

from tplimits.architectures import decorrelated, mlp, resnet, transformer
from tplimits.plugin import Architecture

THIRD_WIDTH = {"mlp": 24, "decorrelated-mlp": 24, "resnet": 8, "transformer": 48}
ACTIVATIONS = ["relu", "tanh", "gelu", "silu", "sigmoid", "softplus", "identity"]


def _arch(module) -> Architecture:
    (arch,) = module.tplimits_architectures()
    assert isinstance(arch, Architecture)
    return arch


MLP = _arch(mlp)
RESNET = _arch(resnet)
TRANSFORMER = _arch(transformer)
DECORRELATED = _arch(decorrelated)
ALL = [MLP, RESNET, TRANSFORMER, DECORRELATED]


def _widths(arch: Architecture) -> list[int]:
    return [*arch.trace_widths, THIRD_WIDTH[arch.name]]


def _forward(arch: Architecture, width: int, **config) -> tuple[nn.Module, torch.Tensor]:
    cfg = {**arch.defaults, **config}
    model = arch.build(width, **cfg)
    assert isinstance(model, nn.Module)
    return model, model(*arch.example_inputs(**cfg))


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


# ---------------------------------------------------------------- the Architecture values


def test_names_and_metadata():
    assert [a.name for a in ALL] == ["mlp", "resnet", "transformer", "decorrelated-mlp"]
    for arch in ALL:
        w1, w2 = arch.trace_widths
        assert 0 < w1 < w2
        assert arch.description
        assert "seed" in arch.defaults


@pytest.mark.parametrize("arch", ALL, ids=lambda a: a.name)
def test_defaults_list_every_config_key(arch):
    """Every keyword of build / example_inputs is in ``defaults``, with the same default value."""
    for fn in (arch.build, arch.example_inputs):
        for name, p in inspect.signature(fn).parameters.items():
            if p.kind is p.VAR_KEYWORD or name == "width":
                continue
            assert name in arch.defaults, (arch.name, fn.__name__, name)
            assert arch.defaults[name] == p.default, (arch.name, name)


@pytest.mark.parametrize("arch", ALL, ids=lambda a: a.name)
def test_all_config_keys_accepted_by_both(arch):
    cfg = {**arch.defaults, "some_other_plugins_key": 1}
    arch.build(arch.trace_widths[0], **cfg)
    arch.example_inputs(**cfg)


@pytest.mark.parametrize("arch", ALL, ids=lambda a: a.name)
def test_example_inputs_deterministic(arch):
    a = arch.example_inputs(**arch.defaults)
    b = arch.example_inputs(**arch.defaults)
    c = arch.example_inputs(**{**arch.defaults, "seed": 1})
    assert isinstance(a, tuple) and len(a) == 1
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], c[0])
    if a[0].is_floating_point():
        assert a[0].dtype == torch.get_default_dtype()
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            assert arch.example_inputs(**arch.defaults)[0].dtype == torch.float64
        finally:
            torch.set_default_dtype(old)


def test_example_input_shapes():
    assert MLP.example_inputs(**MLP.defaults)[0].shape == (8, 16)
    assert MLP.example_inputs(d_in=5, batch=3)[0].shape == (3, 5)
    assert RESNET.example_inputs(**RESNET.defaults)[0].shape == (4, 3, 8, 8)
    ids = TRANSFORMER.example_inputs(**TRANSFORMER.defaults)[0]
    assert ids.shape == (2, 8) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < 32


# ---------------------------------------------------------------- MLP


@pytest.mark.parametrize("arch", [MLP, DECORRELATED], ids=lambda a: a.name)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mlp_builds_and_runs(arch, activation, depth):
    for width in _widths(arch):
        model, out = _forward(arch, width, activation=activation, depth=depth)
        assert out.shape == (8, 1)
        assert torch.isfinite(out).all()
        shapes = _shapes(model)
        expected = {"layers.0.weight": (width, 16), "layers.0.bias": (width,)}
        for i in range(1, depth):
            expected[f"layers.{i}.weight"] = (width, width)
            expected[f"layers.{i}.bias"] = (width,)
            if arch is DECORRELATED:
                expected[f"layers.{i}.decorrelation"] = (width, width)
        expected["readout.weight"] = (1, width)
        expected["readout.bias"] = (1,)
        assert shapes == expected


def test_mlp_config_options():
    model, out = _forward(MLP, 32, bias=False, d_in=5, d_out=3, batch=7)
    assert out.shape == (7, 3)
    assert all(not name.endswith("bias") for name, _ in model.named_parameters())
    assert _shapes(model)["layers.0.weight"] == (32, 5)


def test_mlp_activation_is_applied():
    torch.manual_seed(0)
    model = MLP.build(32, depth=2, activation="relu")
    (x,) = MLP.example_inputs()
    h = torch.relu(model.layers[1](torch.relu(model.layers[0](x))))
    torch.testing.assert_close(model(x), model.readout(h))
    identity = MLP.build(32, depth=2, activation="identity")
    identity.load_state_dict(model.state_dict())
    w = identity.readout.weight @ identity.layers[1].weight @ identity.layers[0].weight
    assert not torch.allclose(model(x), identity(x))
    torch.testing.assert_close(identity(x) - identity(torch.zeros_like(x)), x @ w.T)


@pytest.mark.parametrize("arch", [MLP, DECORRELATED], ids=lambda a: a.name)
def test_unknown_activation(arch):
    with pytest.raises(ValueError, match="swish7") as info:
        arch.build(32, activation="swish7")
    assert "tanh" in str(info.value) and "relu" in str(info.value)


@pytest.mark.parametrize("arch", [MLP, DECORRELATED], ids=lambda a: a.name)
def test_bad_depth(arch):
    with pytest.raises(ValueError, match="depth"):
        arch.build(32, depth=0)


# ---------------------------------------------------------------- decorrelated MLP


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_decorrelated_equals_mlp_at_init(depth):
    plain = MLP.build(32, depth=depth)
    dec = DECORRELATED.build(32, depth=depth)
    result = dec.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == [f"layers.{i}.decorrelation" for i in range(1, depth)]
    for i in range(1, depth):
        torch.testing.assert_close(dec.layers[i].decorrelation, torch.eye(32), rtol=0, atol=0)
    (x,) = MLP.example_inputs()
    torch.testing.assert_close(dec(x), plain(x), rtol=1e-6, atol=1e-6)


def test_decorrelation_enters_forward():
    torch.manual_seed(0)
    dec = DECORRELATED.build(32, depth=2, activation="tanh")
    (x,) = DECORRELATED.example_inputs()
    before = dec(x)
    with torch.no_grad():
        dec.layers[1].decorrelation.add_(0.3 * torch.randn(32, 32))
    after = dec(x)
    assert not torch.allclose(before, after)
    x1 = torch.tanh(dec.layers[0](x))
    r, w, b = dec.layers[1].decorrelation, dec.layers[1].weight, dec.layers[1].bias
    h2 = (r @ x1.T).T @ w.T + b  # h = W (R x) + b
    torch.testing.assert_close(after, dec.readout(torch.tanh(h2)))


def test_decorrelated_forward_changes_nothing():
    dec = DECORRELATED.build(32, depth=3)
    assert list(dec.buffers()) == []
    assert all(p.requires_grad for p in dec.parameters())
    with torch.no_grad():
        dec.layers[1].decorrelation.add_(0.1 * torch.randn(32, 32))
    before = copy.deepcopy(dec.state_dict())
    (x,) = DECORRELATED.example_inputs(batch=64)
    for _ in range(3):
        dec(x).sum().backward()
    after = dec.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # the decorrelation matrices are ordinary parameters and receive gradients
    assert dec.layers[1].decorrelation.grad is not None


# ---------------------------------------------------------------- ResNet


@pytest.mark.parametrize("stages,blocks", list(itertools.product([1, 2, 3], [1, 2])))
def test_resnet_builds_and_runs(stages, blocks):
    for width in _widths(RESNET):
        model, out = _forward(RESNET, width, stages=stages, blocks=blocks)
        assert out.shape == (4, 10)
        assert torch.isfinite(out).all()
        shapes = _shapes(model)
        assert shapes["stem_conv.weight"] == (width, 3, 3, 3)
        assert shapes["stem_bn.weight"] == (width,)
        assert shapes["head.weight"] == (10, width * 2 ** (stages - 1))
        assert all(
            not n.endswith("bias") or "bn" in n or n.startswith("head") or ".shortcut.1." in n for n in shapes
        )  # convolutions have no bias
        for s in range(stages):
            c = width * 2**s
            c_prev = width * 2 ** max(s - 1, 0)
            for b in range(blocks):
                c_in = c_prev if b == 0 else c
                prefix = f"stages.{s}.{b}"
                assert shapes[f"{prefix}.conv1.weight"] == (c, c_in, 3, 3)
                assert shapes[f"{prefix}.conv2.weight"] == (c, c, 3, 3)
                assert shapes[f"{prefix}.bn2.bias"] == (c,)
                block = model.stages[s][b]
                if s > 0 and b == 0:
                    assert shapes[f"{prefix}.shortcut.0.weight"] == (c, c_in, 1, 1)
                    assert shapes[f"{prefix}.shortcut.1.weight"] == (c,)
                    assert block.conv1.stride == (2, 2) and block.shortcut[0].stride == (2, 2)
                else:
                    assert block.shortcut is None
                    assert block.conv1.stride == (1, 1)


def test_resnet_config_options():
    model, out = _forward(RESNET, 16, in_channels=1, image_size=12, num_classes=5, batch=3)
    assert out.shape == (3, 5)
    assert _shapes(model)["stem_conv.weight"] == (16, 1, 3, 3)


def test_resnet_global_average_pool():
    """The head sees the spatial mean of the last stage's features."""
    model = RESNET.build(16, stages=2).eval()
    (x,) = RESNET.example_inputs()
    feats = torch.relu(model.stem_bn(model.stem_conv(x)))
    for stage in model.stages:
        feats = stage(feats)
    assert feats.shape == (4, 32, 4, 4)
    torch.testing.assert_close(model(x), model.head(feats.mean(dim=(2, 3))))


# ---------------------------------------------------------------- Transformer


def _transformer_expected_shapes(width: int, n_layers: int, tied: bool) -> dict[str, tuple[int, ...]]:
    shapes = {"tok_emb.weight": (32, width), "pos_emb.weight": (8, width)}
    for i in range(n_layers):
        p = f"blocks.{i}"
        shapes |= {f"{p}.ln1.weight": (width,), f"{p}.ln1.bias": (width,)}
        for proj in ("q", "k", "v", "proj"):
            shapes |= {f"{p}.attn.{proj}.weight": (width, width), f"{p}.attn.{proj}.bias": (width,)}
        shapes |= {f"{p}.ln2.weight": (width,), f"{p}.ln2.bias": (width,)}
        shapes |= {f"{p}.mlp.fc_in.weight": (4 * width, width), f"{p}.mlp.fc_in.bias": (4 * width,)}
        shapes |= {f"{p}.mlp.fc_out.weight": (width, 4 * width), f"{p}.mlp.fc_out.bias": (width,)}
    shapes |= {"ln_f.weight": (width,), "ln_f.bias": (width,)}
    if not tied:
        shapes["head.weight"] = (32, width)
    return shapes


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_transformer_builds_and_runs(tied, attention, n_heads):
    for width in _widths(TRANSFORMER):
        model, out = _forward(TRANSFORMER, width, tied=tied, attention=attention, n_heads=n_heads)
        assert out.shape == (2, 8, 32)
        assert torch.isfinite(out).all()
        assert _shapes(model) == _transformer_expected_shapes(width, 2, tied)
        assert list(model.buffers()) == []
        assert model.blocks[0].attn.d_head == width // n_heads


def test_transformer_config_options():
    model, out = _forward(TRANSFORMER, 32, n_layers=1, vocab=11, seq_len=5, batch=3)
    assert out.shape == (3, 5, 11)
    assert len(model.blocks) == 1
    assert _shapes(model)["pos_emb.weight"] == (5, 32)
    # shorter sequences than seq_len are fine
    assert model(torch.zeros(2, 3, dtype=torch.long)).shape == (2, 3, 11)


def test_transformer_bad_config():
    with pytest.raises(ValueError, match="n_heads=3"):
        TRANSFORMER.build(32, n_heads=3)
    with pytest.raises(ValueError, match="flash9"):
        TRANSFORMER.build(32, attention="flash9")


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_transformer_causal(attention):
    torch.manual_seed(0)
    model = TRANSFORMER.build(32, attention=attention).double()
    (ids,) = TRANSFORMER.example_inputs()
    base = model(ids)
    for t in range(8):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 32
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n_heads", [1, 4])
def test_explicit_attention_matches_sdpa(tied, n_heads):
    torch.manual_seed(0)
    sdpa = TRANSFORMER.build(32, attention="sdpa", tied=tied, n_heads=n_heads).double()
    explicit = TRANSFORMER.build(32, attention="explicit", tied=tied, n_heads=n_heads).double()
    assert sdpa.state_dict().keys() == explicit.state_dict().keys()
    explicit.load_state_dict(sdpa.state_dict())  # strict: the parameter names coincide
    (ids,) = TRANSFORMER.example_inputs(batch=3)
    torch.testing.assert_close(explicit(ids), sdpa(ids), rtol=1e-10, atol=1e-10)
    assert explicit.blocks[0].attn.d_head ** -0.5 == pytest.approx((32 // n_heads) ** -0.5)


def test_tied_readout_shares_embedding():
    torch.manual_seed(0)
    tied = TRANSFORMER.build(32, tied=True)
    untied = TRANSFORMER.build(32, tied=False)
    assert tied.head is None and not any(n.startswith("head") for n, _ in tied.named_parameters())
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == 32 * 32
    ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])
    unused = 20  # a token that does not occur in ids
    for model, depends in ((tied, True), (untied, False)):
        before = model(ids)
        with torch.no_grad():
            # not a constant shift: LayerNorm outputs are orthogonal to the all-ones vector
            model.tok_emb.weight[unused] += torch.randn(32)
        after = model(ids)
        others = [v for v in range(32) if v != unused]
        torch.testing.assert_close(after[..., others], before[..., others], rtol=0, atol=0)
        assert (not torch.allclose(after[..., unused], before[..., unused])) == depends
    # gradients from the readout reach the embedding rows of tokens not in the input
    tied.zero_grad()
    tied(ids).sum().backward()
    assert tied.tok_emb.weight.grad[unused].abs().sum() > 0
    untied.zero_grad()
    untied(ids).sum().backward()
    assert untied.tok_emb.weight.grad[unused].abs().sum() == 0
