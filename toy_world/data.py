"""The toy world's data: procedural object-removal triplets (a background of one family: smooth
gradients with faint stripes, strong stripes, two tones split by an edge, or a grid; one
ellipse/rectangle/triangle object in a random colour, sometimes with a soft shadow; mask = object +
shadow, dilated; GT = the background alone), scored results with labelled failures, and loading toy
images as tensors. Used by the demo, the tests and the benchmarks, never by a training script."""
import json
import os

import numpy as np
from PIL import Image

SUPERSAMPLE = 4


# ----------------------------------------------------------------------------- data

def _background(rng, r):
    y, x = np.mgrid[0:r, 0:r] / r
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * x + np.sin(angle) * y
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-8)
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    img = c0 + (c1 - c0) * ramp[..., None]
    freq, phase, theta = rng.uniform(1.5, 4.0), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
    stripes = np.sin(2 * np.pi * freq * (np.cos(theta) * x + np.sin(theta) * y) + phase)
    return np.clip(img + rng.uniform(0.03, 0.1) * stripes[..., None], 0, 1)


def _distinct_colours(rng, min_difference=0.3):
    """Two RGB colours whose channels differ by at least min_difference on average (an edge to see)."""
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    while np.abs(c0 - c1).mean() < min_difference:
        c1 = rng.uniform(0, 1, 3)
    return c0, c1


def _stripes(rng, r):
    """A gradient under strong low-frequency stripes (amplitude 0.25-0.45, 1-2.5 periods across the
    image): the hole's content follows the phase outside it, which a mean colour cannot."""
    y, x = np.mgrid[0:r, 0:r] / r
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * x + np.sin(angle) * y
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-8)
    c0, c1 = rng.uniform(0.2, 0.8, 3), rng.uniform(0.2, 0.8, 3)
    freq, phase, theta = rng.uniform(1.0, 2.5), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
    stripes = np.sin(2 * np.pi * freq * (np.cos(theta) * x + np.sin(theta) * y) + phase)
    return np.clip(c0 + (c1 - c0) * ramp[..., None] + rng.uniform(0.25, 0.45) * stripes[..., None], 0, 1)


def _two_tone(rng, r):
    """Two flat colours split by a straight edge through the image's middle (it crosses most holes)."""
    y, x = (np.mgrid[0:r, 0:r] + 0.5) / r
    theta = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(0.35, 0.65, 2)
    side = (np.cos(theta) * (x - cx) + np.sin(theta) * (y - cy)) > 0
    c0, c1 = _distinct_colours(rng)
    return np.where(side[..., None], c0, c1)


def _grid(rng, r):
    """Grid lines of one colour on another (period 0.18-0.3 of the image): the hole hides crossings."""
    y, x = (np.mgrid[0:r, 0:r] + 0.5) / r
    period = rng.uniform(0.18, 0.3)
    width = rng.uniform(0.2, 0.35) * period
    ox, oy = rng.uniform(0, period, 2)
    lines = (((x - ox) % period) < width) | (((y - oy) % period) < width)
    c0, c1 = _distinct_colours(rng)
    return np.where(lines[..., None], c0, c1)


# smooth: the original toy (gradients with faint stripes, where the border's mean colour is nearly the
# best fill); the others put structure across the hole that a learned remover can continue
BACKGROUNDS = {"smooth": _background, "stripes": _stripes, "two_tone": _two_tone, "grid": _grid}


def _shape_alpha(rng, r):
    """Anti-aliased coverage (r, r) of one random shape, drawn on a supersampled grid."""
    n = r * SUPERSAMPLE
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / n
    cx, cy = rng.uniform(0.3, 0.7, 2)
    a, b = rng.uniform(0.1, 0.22, 2)
    rot = rng.uniform(0, np.pi)
    u = (x - cx) * np.cos(rot) + (y - cy) * np.sin(rot)
    v = -(x - cx) * np.sin(rot) + (y - cy) * np.cos(rot)
    kind = rng.integers(3)
    if kind == 0:
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1
    elif kind == 1:
        inside = (np.abs(u) <= a) & (np.abs(v) <= b)
    else:  # triangle: three half-planes around the centre
        angles = rot + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        pts = np.stack([cx + a * 1.4 * np.cos(angles), cy + b * 1.4 * np.sin(angles)], 1)
        signs = []
        for i in range(3):
            (x0, y0), (x1, y1) = pts[i], pts[(i + 1) % 3]
            signs.append((x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) >= 0)
        inside = (signs[0] == signs[1]) & (signs[1] == signs[2])
    return inside.reshape(r, SUPERSAMPLE, r, SUPERSAMPLE).mean(axis=(1, 3))


def _dilate(binary, px):
    img = Image.fromarray((binary * 255).astype(np.uint8))
    from PIL import ImageFilter

    return np.asarray(img.filter(ImageFilter.MaxFilter(2 * px + 1))) > 127


def toy_sample(rng, resolution=32, dilate=2, backgrounds=("smooth",)):
    """One (source, mask, GT) triple as uint8 arrays (H, W, 3), (H, W), (H, W, 3); the background
    from one of `backgrounds` (BACKGROUNDS' names), drawn uniformly when there are several."""
    family = backgrounds[rng.integers(len(backgrounds))] if len(backgrounds) > 1 else backgrounds[0]
    bg = BACKGROUNDS[family](rng, resolution)
    alpha = _shape_alpha(rng, resolution)
    src = bg.copy()
    covered = alpha > 0
    if rng.random() < 0.5:  # soft shadow: the shape, shifted and blurred, darkens the background
        from PIL import ImageFilter

        dx, dy = rng.integers(1, max(2, resolution // 12) + 1, 2)
        shadow = np.roll(np.roll(alpha, dy, 0), dx, 1)
        shadow = np.asarray(Image.fromarray((shadow * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0))) / 255
        src = src * (1 - 0.45 * shadow[..., None])
        covered |= shadow > 0.05
    colour = rng.uniform(0, 1, 3)
    src = src * (1 - alpha[..., None]) + colour * alpha[..., None]
    mask = _dilate(covered, dilate)
    to8 = lambda a: (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    return to8(src), (mask * 255).astype(np.uint8), to8(bg)


def write_toy_dataset(out_dir, num, resolution=32, seed=0, backgrounds=("smooth",)):
    """Write source/, mask/, GT/ PNGs and meta.json (paths relative to out_dir)."""
    unknown = sorted(set(backgrounds) - set(BACKGROUNDS))
    if unknown:
        raise ValueError(f"unknown toy backgrounds {unknown}; choose from {sorted(BACKGROUNDS)}")
    rng = np.random.default_rng(seed)
    for sub in ("source", "mask", "GT"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    meta = []
    for i in range(num):
        src, mask, gt = toy_sample(rng, resolution, backgrounds=tuple(backgrounds))
        name = f"{i:05d}.png"
        Image.fromarray(src).save(os.path.join(out_dir, "source", name))
        Image.fromarray(mask, mode="L").save(os.path.join(out_dir, "mask", name))
        Image.fromarray(gt).save(os.path.join(out_dir, "GT", name))
        meta.append({"source": f"source/{name}", "mask": f"mask/{name}", "GT": f"GT/{name}"})
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return os.path.join(out_dir, "meta.json")


FAILURES = ("object left in", "blurred hole", "wrong colour")


def _failure(kind, src, mask, gt, rng):
    """A bad removal of the same input: the object left in, the hole blurred, or a wrong colour."""
    from PIL import ImageFilter

    m = mask[..., None] > 127
    if kind == "object left in":
        return src
    if kind == "blurred hole":
        blurred = np.asarray(Image.fromarray(src).filter(ImageFilter.GaussianBlur(max(1.0, src.shape[0] / 16))))
        return np.where(m, blurred, gt)
    colour = rng.integers(0, 256, 3).astype(np.uint8)
    return np.where(m, colour, gt)


def write_scored_toy_dataset(toy_meta, out_dir, seed=0, results=None, good_fraction=0.5, good_floor=0.02):
    """Scored triplets from a toy data set: per input, the true removal (score 1) and one deliberate
    failure (score 0), so classes are balanced. `results`: optional {name: meta.json written by
    inference_RORem.py} of remover outputs, each labelled as an annotator would: 1 if its masked MSE
    against GT is below `good_fraction` of the classical border fill's on the same input (a result that
    is not clearly better than the trivial fill is not a good removal), or below `good_floor` ([-1, 1]
    pixel units; where the fill is nearly perfect, e.g. a hole inside one flat region), else 0. One
    absolute threshold cannot serve every background family: the fill's error is 0.018 on the smooth
    family and 0.16-0.26 on the structured ones."""
    from myutils.annotation import gt_label
    from myutils.img_util import load_image
    from myutils.metrics import border_fill, masked_mse

    rng = np.random.default_rng(seed)
    root = os.path.dirname(os.path.abspath(toy_meta))
    with open(toy_meta) as f:
        inputs = json.load(f)
    os.makedirs(os.path.join(out_dir, "edited"), exist_ok=True)
    outputs = {}  # (remover name, source path) -> result path
    for name, res_meta in (results or {}).items():
        with open(res_meta) as f:
            for r in json.load(f):
                outputs[name, os.path.normpath(r["source"])] = os.path.join(os.path.dirname(os.path.abspath(res_meta)), r["GT"])
    meta = []
    for i, e in enumerate(inputs):
        paths = {k: os.path.join(root, e[k]) for k in ("source", "mask", "GT")}
        images = {k: Image.open(paths[k]).convert("L" if k == "mask" else "RGB") for k in ("source", "mask", "GT")}
        src, mask, gt = (np.asarray(images[k]) for k in ("source", "mask", "GT"))
        kind = FAILURES[rng.integers(len(FAILURES))]
        bad = os.path.join(out_dir, "edited", f"{i:05d}_bad.png")
        Image.fromarray(_failure(kind, src, mask, gt, rng).astype(np.uint8)).save(bad)
        base = {"source": paths["source"], "mask": paths["mask"]}
        meta.append({**base, "GT": paths["GT"], "score": 1, "kind": "ground truth"})
        meta.append({**base, "GT": bad, "score": 0, "kind": kind})
        fill_err = masked_mse(border_fill(images["source"], images["mask"]), images["GT"], images["mask"]) if results else None
        for name in results or {}:
            res = outputs.get((name, os.path.normpath(paths["source"])))
            if res and os.path.isfile(res):
                err = masked_mse(load_image(res), images["GT"], images["mask"])
                meta.append({**base, "GT": res, "score": gt_label(err, fill_err, good_fraction, good_floor), "kind": name,
                             "masked_mse": err, "border_fill_masked_mse": fill_err})
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return os.path.join(out_dir, "meta.json")


# ----------------------------------------------------------------------------- tiny models


def load_toy_images(meta_path, keys=("source", "GT")):
    """All images of a toy meta.json as a float tensor (N, 3, H, W) in [-1, 1]."""
    import torch

    from myutils.img_util import load_image, pil_to_tensor

    root = os.path.dirname(os.path.abspath(meta_path))
    with open(meta_path) as f:
        meta = json.load(f)
    return torch.stack([pil_to_tensor(load_image(os.path.join(root, e[k]))) for e in meta for k in keys])
