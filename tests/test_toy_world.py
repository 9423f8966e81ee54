"""The toy world's generator: deterministic per seed, each background family draws the structure it
names, and on the structured families the classical border fill is measurably worse than on the
smooth one (so a learned remover has something to beat)."""
import numpy as np
import pytest
from PIL import Image

from myutils.metrics import border_fill, masked_mse
from toy_world.data import BACKGROUNDS, toy_sample, write_toy_dataset


def _samples(family, n, seed=0):
    rng = np.random.default_rng(seed)
    return [toy_sample(rng, 32, backgrounds=(family,)) for _ in range(n)]


def test_the_same_seed_draws_the_same_samples_and_families_mix():
    a = [toy_sample(np.random.default_rng(3), 32, backgrounds=tuple(BACKGROUNDS)) for _ in range(2)]
    assert all(np.array_equal(x, y) for x, y in zip(a[0], a[1]))
    rng = np.random.default_rng(4)
    # several families in one data set: the structured ones have two flat colours, the others do not
    flat = [len(np.unique(toy_sample(rng, 32, backgrounds=("two_tone", "stripes"))[2].reshape(-1, 3), axis=0)) == 2
            for _ in range(40)]
    assert 5 < sum(flat) < 35


def test_each_family_draws_its_structure():
    for src, mask, gt in _samples("two_tone", 30):
        assert len(np.unique(gt.reshape(-1, 3), axis=0)) == 2  # two flat colours
    hole_sees_both = [len(np.unique(gt[mask > 127], axis=0)) == 2 for _, mask, gt in _samples("two_tone", 60)]
    assert np.mean(hole_sees_both) > 0.5  # the edge crosses most holes
    for _, _, gt in _samples("grid", 30):
        colours, counts = np.unique(gt.reshape(-1, 3), axis=0, return_counts=True)
        assert len(colours) == 2 and 0.3 < counts.min() / counts.sum() < 0.65  # lines in both directions
    for _, _, gt in _samples("stripes", 30):
        luminance = gt.astype(float).mean(-1)
        assert np.ptp(luminance) > 0.35 * 255  # strong stripes, not a faint texture
    for _, _, gt in _samples("smooth", 30):
        assert len(np.unique(gt.reshape(-1, 3), axis=0)) > 50  # a gradient


def test_border_fill_is_measurably_worse_on_structured_backgrounds():
    def fill_error(family):
        errors = []
        for src, mask, gt in _samples(family, 60, seed=1):
            m = Image.fromarray(mask, mode="L")
            errors.append(masked_mse(border_fill(Image.fromarray(src), m), Image.fromarray(gt), m))
        return np.mean(errors)

    smooth = fill_error("smooth")
    for family in ("stripes", "two_tone", "grid"):
        assert fill_error(family) > 5 * smooth, family


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown toy backgrounds"):
        write_toy_dataset(str(tmp_path), 2, backgrounds=("plaid",))
