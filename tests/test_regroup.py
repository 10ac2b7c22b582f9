"""The block-regrouping check of reshapes along the width axis, against cases decided by hand."""

from __future__ import annotations

from fractions import Fraction

import pytest

import tplimits as tpl
from tplimits.core.lower import LoweringContext
from tplimits.ops.shape import reshape_block

W = tpl.Width


def _block(src, dst, n=16):
    return reshape_block(LoweringContext(n), tuple(src), tuple(dst))


@pytest.mark.parametrize("src,dst,block", [
    ([2, W(1)], [2, W(1)], None),                                   # untouched
    ([2, 3, W(1)], [6, W(1)], None),                                # fixed axes merged
    ([2, W(1)], [2, 4, W(Fraction(1, 4))], Fraction(1, 4)),          # heads, contiguous
    ([2, W(1)], [2, W(Fraction(1, 4)), 4], Fraction(1, 4)),          # interleaved blocks
    ([2, 4, W(Fraction(1, 4))], [2, W(1)], Fraction(1, 4)),          # heads merged back
    ([2, W(3)], [2, 3, W(1)], Fraction(1)),                         # fused q/k/v
    ([5, 2, W(1)], [5, 8, W(Fraction(1, 4))], Fraction(1, 4)),       # MHA: batch x heads, fixed head count
    ([5, 2, W(1)], [5, W(Fraction(1, 2)), 4], Fraction(1, 4)),       # MHA: batch x heads, growing head count
    ([2, W(1)], [W(1), 2], Fraction(1, 2)),   # column j merges the j-th interleaved halves of both rows
    ([W(1), 2], [2, W(1)], Fraction(1, 2)),
])
def test_legal_regroupings(src, dst, block):
    assert _block(src, dst) == block


@pytest.mark.parametrize("src,dst", [
    ([3, W(1)], [W(1), 3]),              # 3 divides no width: coordinates smeared across rows
    ([5, W(1)], [W(1), 5]),
    ([2, 3, W(1)], [W(1), 6]),
])
def test_illegal_regroupings(src, dst):
    with pytest.raises(tpl.NotRepresentable, match="interleaves"):
        _block(src, dst)
