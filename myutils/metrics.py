"""Image-space metrics for removal results, and the classical baseline they are compared with."""
import numpy as np
from PIL import Image, ImageFilter


def _arr(img):
    return np.asarray(img.convert("RGB"), dtype=np.float64) / 127.5 - 1.0  # [-1, 1]


def _mask(mask):
    return np.asarray(mask.convert("L"), dtype=np.float64) >= 127.5


def masked_mse(result, gt, mask):
    """Mean squared error in [-1, 1] pixel space over the masked region only."""
    m = _mask(mask)
    if not m.any():
        raise ValueError("masked_mse: the mask is empty")
    return float(((_arr(result) - _arr(gt)) ** 2)[m].mean())


def border_fill(source, mask):
    """Fill the hole with the mean colour of the ring of pixels just outside it."""
    m = _mask(mask)
    ring = (np.asarray(Image.fromarray((m * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(3))) > 127) & ~m
    src = np.asarray(source.convert("RGB"), dtype=np.float64)
    colour = src[ring].mean(0) if ring.any() else src[~m].mean(0)
    out = src.copy()
    out[m] = colour
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def roc_auc(scores, labels):
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties
    counted half (Mann-Whitney). Labels >= 0.5 are positive. None if one class is absent."""
    s, y = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels, dtype=np.float64).ravel() >= 0.5
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def accuracy_at(scores, labels, threshold=0.5):
    """Fraction where (score >= threshold) agrees with (label >= 0.5)."""
    s, y = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels, dtype=np.float64).ravel()
    return float(((s >= threshold) == (y >= 0.5)).mean())
