"""Image helpers: loading any PNG/JPEG as RGB, binary masks, dilation, grids, paired crop/flip."""
import random

import numpy as np
import torch
from PIL import Image, ImageFilter

from .errors import UserError


def _to_uint8_array(img):
    """16-bit and 32-bit integer images are rescaled to 0..255; 8-bit ones pass through."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 or img.mode.startswith("I;16") else 255.0
        return np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max() <= 1.0 else 255.0
        return np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return None


def to_rgb(img):
    """Convert a PIL image of any mode (RGBA, L, P, LA, 16-bit, CMYK) to 8-bit RGB."""
    arr = _to_uint8_array(img)
    if arr is not None:
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        return img.convert("RGBA").convert("RGB")  # alpha is dropped, colours kept
    return img.convert("RGB")


def decoded(path):
    """An image file opened and decoded whole; a file that cannot be (truncated, not an image) is a
    UserError naming it, wherever it is met (a truncated JPEG passes Image.verify)."""
    try:
        img = Image.open(path)
        img.load()
        return img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot decode the image ({e})") from None


def load_image(path):
    """Open an image file as 8-bit RGB."""
    with decoded(path) as img:
        return to_rgb(img)


def mask_to_gray(img):
    """A mask of any mode as an 8-bit L image (RGB masks use their luminance)."""
    arr = _to_uint8_array(img)
    if arr is not None:
        return Image.fromarray(arr, mode="L")
    if img.mode == "L":
        return img.copy()
    return to_rgb(img).convert("L")


def binarize_mask(mask, dtype=torch.float32):
    """PIL mask -> tensor (1, H, W) with 1 where the value is >= 0.5 (region to remove), else 0."""
    arr = np.asarray(mask_to_gray(mask), dtype=np.float32) / 255.0
    return torch.from_numpy(arr >= 0.5)[None].to(dtype)


def load_mask(path):
    """Open a mask file as an 8-bit L image (not yet binarised, so it can be resized smoothly)."""
    with decoded(path) as img:
        return mask_to_gray(img)


def dilate_mask(mask, dilate_factor=15):
    """Grow the white (remove) region of a mask by `dilate_factor` pixels; returns an L image.

    A square max filter of size 2*d+1 moves every edge outward by d pixels.
    """
    mask = mask_to_gray(mask)
    if dilate_factor <= 0:
        return mask
    binary = mask.point(lambda v: 255 if v >= 128 else 0)
    return binary.filter(ImageFilter.MaxFilter(2 * int(dilate_factor) + 1))


def image_grid(images, rows, cols):
    """Paste equally sized PIL images into a rows x cols grid (row-major)."""
    if len(images) != rows * cols:
        raise ValueError(f"image_grid: {len(images)} images do not fill {rows}x{cols}")
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, img in enumerate(images):
        grid.paste(to_rgb(img).resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return grid


def pil_to_uint8(img):
    """RGB PIL image -> uint8 tensor (3, H, W): how a data loader sends an image (a quarter of float32)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def uint8_to_pixels(x):
    """uint8 image tensor -> float32 in [-1, 1], on whatever device it is (the one formula for both paths)."""
    return x.float() / 127.5 - 1.0


def pil_to_tensor(img):
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    return uint8_to_pixels(pil_to_uint8(img))


def tensor_to_pil(x):
    """Float tensor (3, H, W) in [-1, 1] -> RGB PIL image."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def crop_params(size, resolution, center_crop=True, random_flip=False, rng=None, flip=None):
    """Decide how one sample is resized, cropped and flipped; every image of the sample uses the same.

    size: (width, height) of the original. The shorter side is resized to `resolution` (aspect kept),
    then a resolution x resolution crop is taken (centre, or random from `rng`), then flipped with
    probability 0.5 if random_flip (or as `flip` says, when given). Returns a dict with the resized size, the crop offsets in
    resized pixels as SDXL's add_time_ids expects (top, left; after a flip the left offset is measured
    in the flipped image), the original size (height, width) and the flip flag.
    """
    rng = rng or random.Random(0)
    w, h = size
    scale = resolution / min(w, h)
    rw, rh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if center_crop:
        top, left = (rh - resolution) // 2, (rw - resolution) // 2
    else:
        top, left = rng.randint(0, rh - resolution), rng.randint(0, rw - resolution)
    coin = rng.random() < 0.5 if random_flip else False  # drawn even when forced, so later draws agree
    flip = bool(coin if flip is None else flip)
    return {
        "resized": (rw, rh),
        "box": (left, top, left + resolution, top + resolution),
        "flip": flip,
        "original_size": (h, w),
        "crop_top_left": (top, rw - left - resolution if flip else left),
    }


def apply_crop(img, params, is_mask=False):
    """Resize, crop and flip one image as `crop_params` decided (masks are resized smoothly, binarised later)."""
    resample = Image.BILINEAR if is_mask else Image.BICUBIC
    out = img.resize(params["resized"], resample=resample).crop(params["box"])
    return out.transpose(Image.FLIP_LEFT_RIGHT) if params["flip"] else out


def paste_back(result, source, mask):
    """The result inside the mask (>= 0.5), the source outside it: outside pixels stay exactly as given."""
    binary = mask_to_gray(mask).point(lambda v: 255 if v >= 128 else 0)
    return Image.composite(to_rgb(result), to_rgb(source), binary)


MAX_ASPECT = 4  # SDXL was trained up to about 1:4; beyond it the long side's cost grows with nothing to gain


def aspect_problem(width, height):
    """Why an image of this size is not run (too long for its width), or None."""
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > MAX_ASPECT:
        return (f"{width}x{height} px: one side is {ratio:.1f} times the other (at most {MAX_ASPECT}; the model runs with "
                "the short side at --resolution, so the long side would be that many times --resolution); crop it first")
    return None


def processing_size(width, height, resolution, multiple=8):
    """(width, height) to run the model at: the shorter side becomes `resolution` as in training,
    the aspect ratio is kept, and both sides are rounded to a multiple of 8."""
    scale = resolution / min(width, height)
    return tuple(max(multiple, int(round(v * scale / multiple)) * multiple) for v in (width, height))


def content_key(source_path, mask_path):
    """Identity of an input by what it contains, not its path: hashes of the decoded source pixels
    and of the binarised mask (a copy under another name or format is the same input)."""
    import hashlib

    h = hashlib.sha1()
    h.update(np.asarray(load_image(source_path)).tobytes())
    h.update(binarize_mask(load_mask(mask_path)).numpy().tobytes())
    return h.hexdigest()
