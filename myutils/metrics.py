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
