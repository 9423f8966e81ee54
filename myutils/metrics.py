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


def win_rate(scores_a, scores_b, z=1.96):
    """Paired comparison of system A against B on the same inputs (higher score wins): the fraction
    A wins, ties counted half, and its Wilson score interval (z = 1.96: 95%). Identical systems: 0.5."""
    a, b = np.asarray(scores_a, dtype=np.float64).ravel(), np.asarray(scores_b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"win_rate needs two equally long, non-empty score lists (got {a.size} and {b.size})")
    n = a.size
    p = float(((a > b).sum() + 0.5 * (a == b).sum()) / n)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p, (float(centre - half), float(centre + half))


def masked_psnr(result, gt, mask):
    """PSNR in dB over the masked region, pixels in [0, 1] (peak 1); inf for a perfect match."""
    m = _mask(mask)
    if not m.any():
        raise ValueError("masked_psnr: the mask is empty")
    mse = float((((_arr(result) - _arr(gt)) / 2) ** 2)[m].mean())
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def frechet_distance(features_a, features_b, eps=1e-6):
    """FID between two feature sets (rows = images): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b)),
    computed as pytorch-fid's calculate_frechet_distance computes it (the product's square root, eps on
    the diagonals if it is singular, its real part). Not that function itself: it passes scipy's sqrtm a
    `disp` argument that scipy 1.18 removed."""
    from scipy import linalg

    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("frechet_distance needs at least two images per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s_a)) * eps
        covmean = linalg.sqrtm((s_a + offset) @ (s_b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def masked_means(values, mask):
    """Per-image means of a (N, 1, H, W) map inside and outside a (N, 1, H, W) {0, 1} mask: (inside,
    outside), NaN where a region is empty."""
    m = (mask >= 0.5).float()
    inside = (values * m).sum((1, 2, 3)) / m.sum((1, 2, 3))
    outside = (values * (1 - m)).sum((1, 2, 3)) / (1 - m).sum((1, 2, 3))
    return inside, outside


def cohen_kappa(labels_a, labels_b):
    """Cohen's kappa of two raters over the same items: (p_o - p_e) / (1 - p_e), p_o the observed
    agreement, p_e the agreement expected from each rater's own label frequencies. 1.0 when both give
    one and the same label throughout (no chance to disagree); None for no items."""
    a, b = list(labels_a), list(labels_b)
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa needs two equally long label lists (got {len(a)} and {len(b)})")
    if not a:
        return None
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    p_e = sum((a.count(c) / n) * (b.count(c) / n) for c in set(a) | set(b))
    return 1.0 if p_e == 1 else float((p_o - p_e) / (1 - p_e))
