
import numpy as np
import pytest
from PIL import Image

from myutils.img_util import binarize_mask, crop_params, dilate_mask, image_grid, load_image, load_mask, to_rgb


def test_to_rgb_converts_every_mode(tmp_path):
    rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 0))
    assert to_rgb(rgba).mode == "RGB" and to_rgb(rgba).getpixel((0, 0)) == (10, 20, 30)
    assert to_rgb(Image.new("L", (4, 3), 77)).getpixel((1, 1)) == (77, 77, 77)
    p = Image.new("P", (4, 3))
    p.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    p.putpixel((0, 0), 1)
    assert to_rgb(p).getpixel((0, 0)) == (200, 100, 50)
    # 16-bit grayscale: 65535 -> 255, 32768 -> 128 (not clipped to 255 as a plain convert would)
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    assert [load_image(path).getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]


def test_binarize_at_half():
    m = Image.fromarray(np.array([[0, 127, 128, 255]], dtype=np.uint8), mode="L")
    assert binarize_mask(m).tolist() == [[[0.0, 0.0, 1.0, 1.0]]]  # 127/255 < 0.5 <= 128/255


def _half_white(mode):
    """A 4x2 mask, left half 'remove', right half 'keep', in the given mode (file suffix, image). Grey
    levels sit at 0.6 and 0.4 of the mode's full scale, so a wrong scale (16-bit read as 8-bit) flips them."""
    on = np.zeros((2, 4), bool)
    on[:, :2] = True
    level = np.where(on, 0.6, 0.4)
    if mode == "1":
        return ".png", Image.fromarray(on)
    if mode == "P":  # palette index 1 is white, index 0 red (luminance 76: keep)
        img = Image.fromarray(on.astype(np.uint8), mode="P")
        img.putpalette([255, 0, 0, 255, 255, 255] + [0] * 762)
        return ".png", img
    if mode == "RGBA":  # alpha is dropped, the colour decides
        arr = np.zeros((2, 4, 4), np.uint8)
        arr[on] = (255, 255, 255, 40)
        arr[~on] = (0, 0, 0, 255)
        return ".png", Image.fromarray(arr, mode="RGBA")
    if mode == "I;16":
        return ".png", Image.fromarray((level * 65535).astype(np.uint16))
    if mode == "I":  # 32-bit integer, 16-bit range
        return ".tif", Image.fromarray((level * 65535).astype(np.int32), mode="I")
    if mode == "I8":  # 32-bit integer holding 8-bit values
        return ".tif", Image.fromarray((level * 255).astype(np.int32), mode="I")
    if mode == "F":
        return ".tif", Image.fromarray(level.astype(np.float32), mode="F")
    if mode == "RGB":
        return ".png", Image.fromarray(np.repeat((level * 255).astype(np.uint8)[..., None], 3, axis=2))
    return ".png", Image.fromarray((level * 255).astype(np.uint8), mode="L")


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGBA", "RGB", "I;16", "I", "I8", "F"])
def test_masks_of_every_mode_read_the_same(tmp_path, mode):
    suffix, img = _half_white(mode)
    path = tmp_path / ("m" + suffix)
    img.save(path)
    assert Image.open(path).mode == {"I8": "I"}.get(mode, mode)  # the file really is of that mode
    gray = load_mask(path)
    assert gray.mode == "L"
    assert binarize_mask(gray).tolist() == [[[1.0, 1.0, 0.0, 0.0]] * 2]
    assert np.asarray(gray)[:, 2:].max() < 128 and np.asarray(gray)[:, :2].min() >= 128


def test_dilate_mask_grows_by_factor():
    m = Image.new("L", (21, 21), 0)
    m.putpixel((10, 10), 255)
    out = np.asarray(dilate_mask(m, 3)) > 127
    assert out.sum() == 7 * 7 and out[7:14, 7:14].all()
    assert (np.asarray(dilate_mask(m, 0)) > 127).sum() == 1


def test_image_grid_places_row_major():
    ims = [Image.new("RGB", (2, 3), (i * 40, 0, 0)) for i in range(6)]
    g = image_grid(ims, rows=2, cols=3)
    assert g.size == (6, 6)
    assert g.getpixel((4, 0))[0] == 80 and g.getpixel((0, 3))[0] == 120
    with pytest.raises(ValueError):
        image_grid(ims, 2, 2)


def test_crop_keeps_aspect_and_reports_offsets():
    import random

    p = crop_params((80, 40), 32)  # width 80, height 40 -> shorter side to 32: 64 x 32
    assert p["resized"] == (64, 32) and p["box"] == (16, 0, 48, 32)
    assert p["original_size"] == (40, 80) and p["crop_top_left"] == (0, 16)
    p = crop_params((80, 40), 32, center_crop=False, random_flip=True, rng=random.Random(3), flip=True)
    left = p["box"][0]
    assert p["flip"] and p["crop_top_left"] == (0, 64 - left - 32)  # offset measured in the flipped image
