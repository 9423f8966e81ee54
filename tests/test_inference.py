"""inference_RORem.py: any size in, same size out, untouched outside the mask, real CFG, batch
modes that write one result per entry and skip finished ones, LoRA and RORem UNet inputs, clear errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import inference_RORem as inf
from myutils.errors import UserError
from myutils.img_util import processing_size
from pipelines.inpaint import load_remover, remove_objects

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _photo(path, size, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _mask(path, size, box):
    m = Image.new("L", size, 0)
    m.paste(255, box)
    m.save(path)


def _strs(argv):
    return [str(a) for a in argv]


def _main(argv):
    return inf.main(_strs(argv))


def _base(model, *extra):
    return ["--pretrained_model", model, "--resolution", "32", "--inference_steps", "3", *extra]


def test_processing_size_keeps_aspect_and_multiples_of_8():
    assert processing_size(1000, 600, 512) == (856, 512)
    assert processing_size(45, 30, 32) == (48, 32)
    assert processing_size(512, 512, 512) == (512, 512)


def test_odd_size_in_same_size_out_outside_untouched(tmp_path, tiny_model_dir):
    _photo(tmp_path / "in.png", (45, 30))
    _mask(tmp_path / "m.png", (45, 30), (10, 5, 25, 20))
    out = tmp_path / "out.png"
    _main(_base(tiny_model_dir, "--image_path", tmp_path / "in.png", "--mask_path", tmp_path / "m.png", "--save_path", out))
    src, res = np.asarray(Image.open(tmp_path / "in.png")), np.asarray(Image.open(out))
    assert res.shape == src.shape
    inside = np.zeros(src.shape[:2], bool)
    inside[5:20, 10:25] = True
    assert np.array_equal(res[~inside], src[~inside])
    assert np.abs(res[inside].astype(int) - src[inside]).mean() > 5


def test_dilation_grows_the_repainted_region(tmp_path, tiny_model_dir):
    _photo(tmp_path / "in.png", (32, 32))
    _mask(tmp_path / "m.png", (32, 32), (12, 12, 20, 20))
    out = tmp_path / "out.png"
    _main(_base(tiny_model_dir, "--image_path", tmp_path / "in.png", "--mask_path", tmp_path / "m.png",
                   "--save_path", out, "--dilate_size", "3"))
    src, res = np.asarray(Image.open(tmp_path / "in.png")), np.asarray(Image.open(out))
    assert not np.array_equal(res[10, 14], src[10, 14])  # 2 px outside the mask, inside the dilated one
    assert np.array_equal(res[5, 5], src[5, 5])


def test_classifier_free_guidance_is_real(tmp_path, tiny_model_dir):
    """guidance > 1 doubles the UNet batch: the negative condition first, then the prompt."""
    args = inf.parse_args(_strs(_base(tiny_model_dir, "--image_path", "x", "--mask_path", "y", "--guidance_scale", "3",
                                      "--negative_prompt", "blurry")))
    pipe, cond, uncond = load_remover(args, "cpu", torch.float32)
    assert not torch.allclose(cond.prompt_embeds, uncond.prompt_embeds)
    seen = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda x, t, **kw: (seen.append((x.shape[0], kw["encoder_hidden_states"])), forward(x, t, **kw))[1]
    img, mask = Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    guided = remove_objects(pipe, cond, uncond, [img], [mask], args, seed=0)[0]
    assert seen[0][0] == 2 and torch.allclose(seen[0][1][0], uncond.prompt_embeds[0]) and torch.allclose(seen[0][1][1], cond.prompt_embeds[0])
    seen.clear()
    args.guidance_scale = 1.0
    plain = remove_objects(pipe, cond, uncond, [img], [mask], args, seed=0)[0]
    assert seen[0][0] == 1
    assert np.abs(np.asarray(guided, float) - np.asarray(plain, float)).max() > 0


def test_meta_batch_mode_writes_results_and_skips_done(tmp_path, tiny_model_dir, toy_meta):
    out = tmp_path / "res"
    argv = _base(tiny_model_dir, "--meta_path", toy_meta, "--save_path", out, "--batch_size", "4")
    _main(argv)
    meta = json.load(open(out / "meta.json"))
    assert len(meta) == 12 and all(os.path.isfile(out / m["GT"]) for m in meta)
    assert meta[0]["reference_GT"].startswith("GT/")  # the input's own GT is kept, renamed
    first = out / meta[0]["GT"]
    stamp = os.stat(first).st_mtime_ns
    os.remove(out / meta[5]["GT"])
    _main(argv)  # only the missing one is redone
    assert os.stat(first).st_mtime_ns == stamp and os.path.isfile(out / meta[5]["GT"])
    one = tmp_path / "one"  # batch size does not change a result (per-image seeds)
    _main(_base(tiny_model_dir, "--meta_path", toy_meta, "--save_path", one))
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(one / meta[0]["GT"])))
    # another batch into the same folder (a folder of images): its results join the meta.json, the first 12 stay
    (tmp_path / "photos").mkdir()
    (tmp_path / "masks").mkdir()
    root = os.path.dirname(toy_meta)
    for i, e in enumerate(json.load(open(toy_meta))[:2]):
        Image.open(os.path.join(root, e["source"])).save(tmp_path / "photos" / f"p{i}.png")
        Image.open(os.path.join(root, e["mask"])).save(tmp_path / "masks" / f"p{i}.png")
    _main(_base(tiny_model_dir, "--image_path", tmp_path / "photos", "--mask_path", tmp_path / "masks", "--save_path", out))
    both = json.load(open(out / "meta.json"))
    assert both[:12] == meta and [e["GT"] for e in both[12:]] == ["p0.png", "p1.png"]
    assert all(os.path.isfile(out / e["GT"]) for e in both)


def test_folder_mode_matches_masks_by_name(tmp_path, tiny_model_dir):
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    _photo(tmp_path / "img" / "a.jpg", (40, 32))
    _photo(tmp_path / "img" / "b.png", (32, 32), seed=1)
    _mask(tmp_path / "msk" / "a.png", (40, 32), (4, 4, 12, 12))
    _mask(tmp_path / "msk" / "b.png", (32, 32), (4, 4, 12, 12))
    _main(_base(tiny_model_dir, "--image_path", tmp_path / "img", "--mask_path", tmp_path / "msk", "--save_path", tmp_path / "o"))
    assert Image.open(tmp_path / "o" / "a.png").size == (40, 32) and os.path.isfile(tmp_path / "o" / "b.png")
    os.remove(tmp_path / "msk" / "b.png")
    with pytest.raises(UserError, match=r"no mask for 'b.png' \(looked for b.\* and mask_b.\*"):
        _main(_base(tiny_model_dir, "--image_path", tmp_path / "img", "--mask_path", tmp_path / "msk", "--save_path", tmp_path / "o"))


def test_lora_and_rorem_unet_inputs(tmp_path, tiny_model_dir):
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    unet.save_pretrained(tmp_path / "rorem_unet", variant="fp16")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian"))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    StableDiffusionXLInpaintPipeline.save_lora_weights(str(tmp_path / "lora"), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    _photo(tmp_path / "in.png", (32, 32))
    _mask(tmp_path / "m.png", (32, 32), (8, 8, 24, 24))
    common = ["--image_path", tmp_path / "in.png", "--mask_path", tmp_path / "m.png"]
    _main(_base(tiny_model_dir, *common, "--save_path", tmp_path / "base.png", "--RORem_unet", tmp_path / "rorem_unet", "--variant", "fp16"))
    _main(_base(tiny_model_dir, *common, "--save_path", tmp_path / "lora.png",
                   "--lora_path", tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    base, lora = (np.asarray(Image.open(tmp_path / f), float) for f in ("base.png", "lora.png"))
    assert np.abs(base - lora).max() > 0


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_model_dir):
    _photo(tmp_path / "in.png", (40, 32))
    _mask(tmp_path / "small.png", (32, 32), (4, 4, 12, 12))
    with pytest.raises(UserError, match=r"'mask' is 32x32 but 'source' is 40x32 .*small.png"):
        _main(_base(tiny_model_dir, "--image_path", tmp_path / "in.png", "--mask_path", tmp_path / "small.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="'mask' file is not a readable image"):
        _main(_base(tiny_model_dir, "--image_path", tmp_path / "in.png", "--mask_path", tmp_path / "bad.png"))
    with pytest.raises(UserError, match="give either --meta_path, or --image_path"):
        _main(_base(tiny_model_dir))
    _mask(tmp_path / "fits.png", (40, 32), (4, 4, 12, 12))
    one = ["--image_path", tmp_path / "in.png", "--mask_path", tmp_path / "fits.png"]
    for save, message in ((tmp_path, "a folder, but one image is written to a file"), (tmp_path / "out", "not an image file name"),
                          (tmp_path / "out.txt", "not an image file name"), (tmp_path / "in.png" / "out.png", "in.png is a file, not a folder")):
        with pytest.raises(UserError, match=message):  # before any model is loaded
            _main(_base("/nonexistent/model", *one, "--save_path", save))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "inference_RORem.py"), *map(str, _base(tiny_model_dir)),
                          "--image_path", str(tmp_path / "none.png"), "--mask_path", str(tmp_path / "small.png")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: --image_path/--mask_path: entry 0: 'source' file not found")


def test_batch_output_never_replaces_inputs_or_reuses_other_work(tmp_path, tiny_model_dir, toy_meta):
    """--save_path the folder of --meta_path would replace the input meta.json: refused, nothing
    written. Results in --save_path made with other settings (or from other inputs) are not passed off
    as this run's: refused unless --overwrite; the same settings reuse them."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(os.path.dirname(toy_meta), data)
    meta = data / os.path.basename(toy_meta)
    before = meta.read_bytes()
    with pytest.raises(UserError, match=r"its meta.json would replace the input --meta_path"):
        _main(_base(tiny_model_dir, "--meta_path", meta, "--save_path", data))
    assert meta.read_bytes() == before

    out = tmp_path / "res"
    _main(_base(tiny_model_dir, "--meta_path", meta, "--save_path", out))
    first = out / json.load(open(out / "meta.json"))[0]["GT"]
    stamp = os.stat(first).st_mtime_ns
    _main(_base(tiny_model_dir, "--meta_path", meta, "--save_path", out, "--batch_size", "3"))  # same results: all reused
    assert os.stat(first).st_mtime_ns == stamp
    with pytest.raises(UserError, match=r"12 results there were made from other inputs or settings .* --overwrite"):
        _main(_base(tiny_model_dir, "--meta_path", meta, "--save_path", out, "--seed", "7"))
    assert os.stat(first).st_mtime_ns == stamp
    _photo(data / json.load(open(meta))[0]["source"], (32, 32), seed=9)  # an input changed since: its result is stale
    with pytest.raises(UserError, match=r"1 results there were made from other inputs"):
        _main(_base(tiny_model_dir, "--meta_path", meta, "--save_path", out))
    _main(_base(tiny_model_dir, "--meta_path", meta, "--save_path", out, "--seed", "7", "--overwrite"))
    assert os.stat(first).st_mtime_ns != stamp
