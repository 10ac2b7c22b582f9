"""Custom models, written here, lowered and replayed at traced and untraced widths against torch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tplimits as tpl


def _close(out, ref):
    assert out.shape == ref.shape
    assert out.dtype == ref.dtype
    assert (out - ref).abs().max() <= 1e-10 * ref.abs().max()


def _compare(out, ref):
    """Same structure, every tensor leaf equal to rounding."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(out, torch.Tensor)
        _close(out, ref)
    elif isinstance(ref, dict):
        assert isinstance(out, dict) and out.keys() == ref.keys()
        for key in ref:
            _compare(out[key], ref[key])
    else:
        assert type(out) is type(ref) and len(out) == len(ref)
        for o, r in zip(out, ref, strict=True):
            _compare(o, r)


def _model(make, width, eval_mode=False):
    torch.manual_seed(width)
    model = make(width)
    return model.eval() if eval_mode else model


def check(make, inputs, width=16, others=(24,), eval_mode=False):
    """Lower ``make`` at ``width`` (and 2·width), replay at the traced widths and at ``others``."""
    build = (lambda w: make(w).eval()) if eval_mode else make
    prog = tpl.lower(build, example_inputs=inputs, width=width)
    for w in (width, 2 * width, *others):
        model = _model(make, w, eval_mode)
        with torch.no_grad():
            ref = model(*inputs)
            out = prog.replay(model, *inputs)
        _compare(out, ref)
    return prog


def _x(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------ convolutions


class Conv1dNet(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inp = nn.Conv1d(3, width, 3, padding=1)
        self.hid = nn.Conv1d(width, width, 3, stride=2, padding=2, dilation=2)
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.tanh(self.hid(h))
        return self.head(h.mean(-1))


def test_conv1d_stride_padding_dilation():
    prog = check(Conv1dNet, (_x(2, 3, 11),), others=(24, 40))
    assert prog.parameters["hid.weight"].kind == "matrix"
    assert prog.parameters["inp.weight"].kind == "vector"
    assert prog.parameters["head.weight"].kind == "vector"


class Conv2dSame(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inp = nn.Conv2d(2, width, 3, padding="same")
        self.hid = nn.Conv2d(width, width, 3, padding="same")
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        h = F.gelu(self.inp(x))
        h = F.gelu(self.hid(h))
        return self.head(h.mean((2, 3)))


def test_conv2d_padding_same_and_spatial_mean_pool():
    prog = check(Conv2dSame, (_x(2, 2, 5, 6),), width=8, others=(12,))
    assert prog.parameters["hid.weight"].kind == "matrix"


class Depthwise(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inp = nn.Conv2d(3, width, 1)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.pw = nn.Conv2d(width, width, 1)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.dw(h))
        h = self.pw(h)
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def test_depthwise_conv():
    prog = check(Depthwise, (_x(2, 3, 5, 5),), width=8, others=(12,))
    assert prog.parameters["dw.weight"].kind == "vector"
    assert prog.parameters["pw.weight"].kind == "matrix"


# ------------------------------------------------------------------------------ normalization


class GroupNormNet(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inp = nn.Conv1d(3, width, 1)
        self.gn = nn.GroupNorm(4, width)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        h = self.gn(self.inp(x))
        return self.head(torch.tanh(h).mean(-1))


def _perturb_affine(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gn.weight", "gn.bias", "norm.weight", "bn.weight", "bn.bias")):
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_group_norm_fixed_groups_over_growing_channels():
    check(lambda w: _perturb_affine(GroupNormNet(w)), (_x(3, 3, 7),), width=16, others=(24, 48))


class RMSNet(nn.Module):
    def __init__(self, width, builtin):
        super().__init__()
        self.builtin = builtin
        self.inp = nn.Linear(6, width)
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        if self.builtin:
            h = self.norm(h)
        else:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.out(h)


@pytest.mark.parametrize("builtin", [True, False], ids=["nn.RMSNorm", "hand-written"])
def test_rms_norm(builtin):
    prog = check(lambda w: _perturb_affine(RMSNet(w, builtin)), (_x(2, 4, 6),))
    assert "avg" in prog.format()


class LayerNormResidual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inp = nn.Linear(5, width)
        self.ln = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.fc(F.silu(self.ln(h)))
        return self.out(h)


def test_residual_add_with_layer_norm():
    check(LayerNormResidual, (_x(3, 5),))


class BatchNormNet(nn.Module):
    def __init__(self, width, seq):
        super().__init__()
        self.seq = seq
        self.inp = nn.Linear(4, width)
        self.bn = nn.BatchNorm1d(width)
        self.fc = nn.Linear(width, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        h = self.inp(x)
        if self.seq:
            h = h.transpose(1, 2)
        h = torch.relu(self.bn(h))
        if self.seq:
            h = h.mean(-1)
        return self.out(self.fc(h))


def _with_stats(model):
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    return _perturb_affine(model)


@pytest.mark.parametrize("seq", [False, True], ids=["BC", "BCL"])
def test_batch_norm_train_mode(seq):
    x = _x(6, 5, 4) if seq else _x(6, 4)
    check(lambda w: BatchNormNet(w, seq), (x,))


@pytest.mark.parametrize("seq", [False, True], ids=["BC", "BCL"])
def test_batch_norm_eval_mode(seq):
    x = _x(6, 5, 4) if seq else _x(6, 4)
    check(lambda w: _with_stats(BatchNormNet(w, seq)), (x,), eval_mode=True)


class BatchNorm2dEval(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inp = nn.Conv2d(2, width, 3, padding=1)
        self.hid = nn.Conv2d(width, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.hid(torch.relu(self.inp(x)))))
        return self.head(h.mean((-2, -1)))


def test_batch_norm2d_eval_mode():
    check(lambda w: _with_stats(BatchNorm2dEval(w)), (_x(2, 2, 4, 4),), width=8, others=(12,), eval_mode=True)


# ------------------------------------------------------------------------------ attention


class ManyHeads(nn.Module):
    """Heads grow with width; d_head is fixed."""

    d_head = 4

    def __init__(self, width, sdpa):
        super().__init__()
        self.sdpa = sdpa
        self.heads = width // self.d_head
        self.inp = nn.Linear(6, width)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.o = nn.Linear(width, width)
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.inp(x)
        q, k, v = (f(h).view(b, t, self.heads, self.d_head).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            logits = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)
            mask = torch.ones(t, t, dtype=torch.bool).tril()
            a = logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        a = a.transpose(1, 2).reshape(b, t, -1)
        return self.out(h + self.o(a))


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "explicit"])
def test_attention_head_count_grows(sdpa):
    prog = check(lambda w: ManyHeads(w, sdpa), (_x(2, 5, 6),), width=16, others=(24, 8))
    assert prog.parameters["q.weight"].kind == "matrix"


class FusedQKV(nn.Module):
    """d_head grows with width: the 1/sqrt(d_head) scale is a power of n."""

    heads = 2

    def __init__(self, width):
        super().__init__()
        self.width = width
        self.inp = nn.Linear(6, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.o = nn.Linear(width, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.inp(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(self.o(a.transpose(1, 2).reshape(b, t, self.width)))


def test_fused_qkv_chunk():
    prog = check(FusedQKV, (_x(2, 4, 6),), others=(24, 40))
    assert prog.parameters["qkv.weight"].kind == "matrix"
    assert "n^-1/2" in prog.format()


# ------------------------------------------------------------------------------ width-axis structure


class CatWidth(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.a = nn.Linear(4, width)
        self.b = nn.Linear(4, width)
        self.fc = nn.Linear(2 * width, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        h = torch.cat([torch.tanh(self.a(x)), torch.relu(self.b(x))], dim=-1)
        return self.out(torch.tanh(self.fc(h)))


def test_cat_along_width_then_linear_from_2n():
    prog = check(CatWidth, (_x(3, 4),))
    assert prog.parameters["fc.weight"].kind == "matrix"


class StdVar(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inp = nn.Linear(4, width)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return torch.stack([h.std(-1), h.var(-1, unbiased=True), h.var(-1, unbiased=False),
                            h.std(-1, correction=0)], dim=-1)


def test_std_var_over_width():
    check(StdVar, (_x(3, 4),), others=(24, 40))


class Multipliers(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.w = nn.Parameter(torch.randn(width, width))
        self.v = nn.Parameter(torch.randn(width, width))
        self.gain = nn.Parameter(torch.tensor(0.7))
        self.mult = 1 / width
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(F.linear(h, self.w * self.mult))
        h = torch.tanh(F.linear(h, self.v * self.gain))
        h = torch.tanh(F.linear(h, self.w * 0.5))
        return self.out(h)


def test_weight_multipliers():
    prog = check(Multipliers, (_x(3, 4),), others=(24, 40))
    assert prog.parameters["gain"].kind == "scalar"
    assert prog.parameters["w"].kind == "matrix"
    assert "n^-1" in prog.format()


class InOutStorage(nn.Module):
    """GPT-2 style: W stored (in, out), used as x @ W."""

    def __init__(self, width):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(4, width) / 2)
        self.w = nn.Parameter(torch.randn(width, width) / width**0.5)
        self.w_out = nn.Parameter(torch.randn(width, 3) / width)

    def forward(self, x):
        h = torch.tanh(x @ self.w_in)
        h = torch.tanh(h @ self.w)
        return h @ self.w_out


def test_x_matmul_w_stored_in_out():
    prog = check(InOutStorage, (_x(2, 5, 4),))
    assert prog.parameters["w"].kind == "matrix"
    assert prog.parameters["w"].fan_in_axes == (0,)


class EinsumNet(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(width, 4) / 2)
        self.w = nn.Parameter(torch.randn(width, width) / width**0.5)
        self.w_out = nn.Parameter(torch.randn(3, width) / width)

    def forward(self, x):
        h = torch.tanh(torch.einsum("bti,oi->bto", x, self.w_in))
        h = torch.tanh(torch.einsum("io,bti->bto", self.w, h))
        return torch.einsum("bto,co->btc", h, self.w_out)


def test_einsum_layers():
    prog = check(EinsumNet, (_x(2, 3, 4),))
    assert prog.parameters["w"].kind == "matrix"


class SeqPool(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.fc = nn.Linear(width, width)
        self.out = nn.Linear(width, 5)

    def forward(self, x):
        h = F.gelu(self.fc(torch.tanh(self.inp(x))))
        pooled = h.mean(1) + h.amax(1)  # max over positions, a fixed axis
        return F.log_softmax(self.out(pooled), dim=-1)


def test_mean_and_max_pool_over_sequence_log_softmax():
    check(SeqPool, (_x(3, 6, 4),), others=(24, 40))


class MaskedCumsum(nn.Module):
    """A causal prefix-mean whose mask and counts are built inside forward."""

    def __init__(self, width):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.fc = nn.Linear(width, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        t = x.shape[1]
        pos = torch.arange(t)
        mask = (pos[None, :] <= pos[:, None]).to(x.dtype)
        counts = torch.ones(t, dtype=torch.long).cumsum(0).to(x.dtype)
        h = torch.tanh(self.inp(x))
        h = torch.einsum("st,btd->bsd", mask, h) / counts[:, None]
        return self.out(torch.tanh(self.fc(h)))


def test_masks_from_arange_and_cumsum_are_folded():
    check(MaskedCumsum, (_x(2, 5, 4),))


def make_sequential(width):
    return nn.Sequential(nn.Linear(7, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 3))


def test_sequential():
    prog = check(make_sequential, (_x(4, 7),), others=(24, 100))
    kinds = {k: v.kind for k, v in prog.parameters.items()}
    assert kinds == {"0.weight": "vector", "0.bias": "vector", "2.weight": "matrix", "2.bias": "vector",
                     "4.weight": "vector", "4.bias": "scalar"}


class ExplicitScale(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.width = width
        self.inp = nn.Linear(4, width)
        self.fc = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, 2, bias=False)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.fc(h) / math.sqrt(self.width))
        return self.out(h) * (1 / math.sqrt(self.width))


def test_explicit_inverse_sqrt_width_scale():
    prog = check(ExplicitScale, (_x(3, 4),), others=(24, 100))
    assert "n^-1/2" in prog.format()


# ------------------------------------------------------------------------------ output structures


class TupleOut(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h), h


def test_tuple_output_with_hidden_state_vector():
    prog = check(TupleOut, (_x(3, 4),))
    model = _model(TupleOut, 40)
    _, hidden = prog.replay(model, _x(3, 4))
    assert hidden.shape == (3, 40)


class DictOut(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.fc = nn.Linear(width, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        z = self.fc(h)
        return {"logits": self.out(z), "hidden": z, "norm": z.pow(2).mean(-1)}


def test_dict_output():
    check(DictOut, (_x(3, 4),))


def test_vector_output_hidden_states():
    """A model returning its [B, width] hidden state replays at any width."""
    make = lambda w: nn.Sequential(nn.Linear(4, w), nn.Tanh(), nn.Linear(w, w))  # noqa: E731
    check(make, (_x(3, 4),), others=(24, 40))


def test_base_module_lowering():
    x = _x(3, 4)
    prog = tpl.lower(_model(DictOut, 32), base=_model(DictOut, 16), example_inputs=(x,))
    model = _model(DictOut, 48)
    with torch.no_grad():
        _compare(prog.replay(model, x), model(x))


# ------------------------------------------------------------------------------ known gaps


class GroupPerChannel(nn.Module):
    """GroupNorm with one channel per group: the group count grows with width."""

    def __init__(self, width):
        super().__init__()
        self.inp = nn.Conv1d(3, width, 1)
        self.gn = nn.GroupNorm(width, width)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.gn(self.inp(x))).mean(-1))


def test_group_norm_one_channel_per_group():
    check(lambda w: _perturb_affine(GroupPerChannel(w)), (_x(3, 3, 7),))


class CausalConv(nn.Module):
    """Left-pads the sequence (a fixed axis) so the convolution is causal."""

    def __init__(self, width):
        super().__init__()
        self.inp = nn.Conv1d(3, width, 1)
        self.conv = nn.Conv1d(width, width, 3)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.conv(F.pad(h, (2, 0))))
        return self.head(h.transpose(1, 2))


def test_pad_along_fixed_axis():
    check(CausalConv, (_x(2, 3, 6),))


class MHA(nn.Module):
    def __init__(self, width, heads, cross):
        super().__init__()
        self.cross = cross
        self.inp = nn.Linear(6, width)
        self.ctx = nn.Linear(6, width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        h = self.inp(x)
        kv = torch.tanh(self.ctx(x)) if self.cross else h
        return self.out(h + self.attn(h, kv, kv, need_weights=False)[0])


def test_multihead_attention_fixed_heads():
    prog = check(lambda w: MHA(w, 2, cross=False), (_x(2, 5, 6),))
    assert prog.parameters["attn.in_proj_weight"].kind == "matrix"


def test_multihead_attention_head_count_grows():
    check(lambda w: MHA(w, w // 4, cross=False), (_x(2, 5, 6),))


def test_multihead_attention_separate_query_and_key():
    """A key/value input other than the query splits in_proj_weight into [E, 2E] row blocks."""
    check(lambda w: MHA(w, 2, cross=True), (_x(2, 5, 6),))
