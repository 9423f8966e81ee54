import numpy as np
import pytest
from PIL import Image

from myutils.img_util import paste_back
from myutils.metrics import accuracy_at, border_fill, masked_mse, roc_auc, win_rate


def test_masked_mse_by_hand():
    gt = Image.new("RGB", (4, 4), (255, 255, 255))  # +1 everywhere
    res = Image.new("RGB", (4, 4), (0, 0, 0))  # -1 everywhere: squared error 4 per pixel
    res.paste((255, 255, 255), (0, 0, 2, 4))  # left half correct
    mask = Image.new("L", (4, 4), 0)
    mask.paste(255, (1, 0, 3, 4))  # columns 1, 2: one right, one wrong
    assert abs(masked_mse(res, gt, mask) - 2.0) < 1e-12


def test_border_fill_uses_the_ring_and_paste_keeps_outside():
    src = np.zeros((7, 7, 3), np.uint8)
    src[:, :] = (10, 20, 30)
    src[3, 3] = (250, 0, 0)  # the object
    src[0, 0] = (0, 0, 0)  # far from the hole: not in the ring
    mask = Image.new("L", (7, 7), 0)
    mask.putpixel((3, 3), 255)
    filled = np.asarray(border_fill(Image.fromarray(src), mask))
    assert tuple(filled[3, 3]) == (10, 20, 30) and tuple(filled[0, 0]) == (0, 0, 0)
    out = np.asarray(paste_back(Image.new("RGB", (7, 7), (1, 2, 3)), Image.fromarray(src), mask))
    assert tuple(out[3, 3]) == (1, 2, 3) and tuple(out[1, 1]) == (10, 20, 30)


def test_roc_auc_and_accuracy_by_hand():
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) -> 3/4
    assert roc_auc([0.9, 0.5, 0.4, 0.1], [1, 0, 1, 0]) == 0.75
    assert roc_auc([0.5, 0.5], [1, 0]) == 0.5 and roc_auc([0.3, 0.2], [1, 1]) is None
    assert accuracy_at([0.9, 0.5, 0.4, 0.1], [1, 0, 1, 0]) == 0.5  # 0.9 right, 0.5 wrong, 0.4 wrong, 0.1 right


def test_win_rate_counts_ties_half_with_a_wilson_interval():
    a = [1, 1, 1, 1, 1, 1, 1, 0.5, 0, 0]
    b = [0, 0, 0, 0, 0, 0, 0, 0.5, 1, 1]
    p, (lo, hi) = win_rate(a, b)
    assert p == pytest.approx(0.75)
    # Wilson by hand, n = 10, z = 1.96: centre (0.75 + 0.19208) / 1.38416, half-width 0.23844
    assert lo == pytest.approx(0.44217, abs=1e-4) and hi == pytest.approx(0.91905, abs=1e-4)
    same, (lo, hi) = win_rate([0.3, 0.7, 0.1], [0.3, 0.7, 0.1])
    assert same == 0.5 and lo < 0.5 < hi
    with pytest.raises(ValueError):
        win_rate([1, 2], [1])
