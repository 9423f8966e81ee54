#!/usr/bin/env python
"""Remove objects interactively: upload an image, paint over the object, get the result (Gradio).

    python app_RORem.py --pretrained_model diffusers/stable-diffusion-xl-1.0-inpainting-0.1 \
        --RORem_unet path/to/RORem_unet --lcm_lora path/to/RORem_LCM_lora \
        --RORem_discriminator path/to/RORem_discriminator

Open http://127.0.0.1:7860 (bound to 127.0.0.1 unless --host says otherwise; only the host names it
was started for are answered, --allowed_host adds one). Paint the object with
the brush (any colour; what is painted is removed) or upload a mask instead; choose the full sampler
(--inference_steps, 50 by default) or 4 steps with the LCM LoRA (--lcm_lora), and the seed. The
result is pasted back into the untouched image at its own size, as inference_RORem.py does, and can
be downloaded as PNG; with --RORem_discriminator the page shows its score (>= 0.5: success).

One pipeline serves both modes: the remover (its --lora_path merged in), with the LCM LoRA as an
adapter switched on only for 4-step removal, and the scheduler swapped per request. Requests run one
at a time (Gradio's queue), so an upload is refused with a message, before any work, when it is not
an image, has more than --max_side px a side, or is more than 4 times as long as it is wide.
"""
import argparse
import os
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from myutils.args import POSITIVE
from myutils.errors import UserError, output_folder, run_cli
from myutils.img_util import aspect_problem
from myutils.models import load_lora_into_pipeline, resolve_device_dtype
from myutils.web import add_server_args, allowed_hosts, check_port, guard_hosts, serve
from pipelines.inpaint import add_remover_args, check_remover_args, load_remover, remove_objects

FULL, FOUR = "full sampler", "4 steps (LCM)"
MAX_SEED = 2 ** 32 - 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_remover_args(p)
    p.add_argument("--lcm_lora", default=None, help="the LCM LoRA of train_RORem_lcm.py (enables 4-step removal)")
    p.add_argument("--RORem_discriminator", default=None, help="a discriminator folder: show each result's score")
    add_server_args(p)
    p.add_argument("--max_side", type=POSITIVE, default=8192, help="uploads with a longer side are refused (px)")
    p.add_argument("--output_dir", default=None, help="where results are saved for download (default: a temporary folder)")
    args = p.parse_args(argv)
    check_remover_args(args)
    if args.output_dir:
        output_folder(args.output_dir, "--output_dir")  # before minutes of model loading
    return args


def seed_of(value):
    """The seed typed in the page: a whole number in [0, 2**32 - 1] (1.5 is not taken as 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value % 1 or not 0 <= value <= MAX_SEED:
        raise UserError(f"seed {value!r}: a whole number from 0 to {MAX_SEED}")
    return int(value)


def check_upload(image, max_side, what="the image"):
    """Refuse, with a message, an upload the queue should not spend minutes on."""
    w, h = image.size
    if max(w, h) > max_side:
        raise UserError(f"{what} is {w}x{h} px: at most {max_side} px a side (downscale it first)")
    if aspect_problem(w, h):
        raise UserError(f"{what}: {aspect_problem(w, h)}")


def readable_uploads(component, what):
    """Make a Gradio image component's own decoding of an upload say what is wrong, in the page, instead
    of Gradio's generic error (a file that is not an image, one past Pillow's decompression-bomb limit)."""
    import gradio as gr
    from PIL import Image as PILImage

    decode = component.preprocess

    def preprocess(payload):
        try:
            return decode(payload)
        except PILImage.DecompressionBombError:
            raise gr.Error(f"{what} has more than {2 * PILImage.MAX_IMAGE_PIXELS // 10**6} million pixels (Pillow's "
                           "decompression-bomb limit): downscale it first") from None
        except (PILImage.UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise gr.Error(f"{what} is not an image this app can read ({e.__class__.__name__})") from None

    component.preprocess = preprocess
    return component


def mask_from_editor(value):
    """The mask (L, white = remove) of an ImageEditor value: every pixel painted on any layer."""
    background = value.get("background") if isinstance(value, dict) else None
    if background is None:
        raise UserError("upload an image first")
    painted = np.zeros((background.height, background.width), dtype=bool)
    for layer in value.get("layers") or []:
        if layer is not None:
            painted |= np.asarray(layer.convert("RGBA"))[..., 3] > 0
    return Image.fromarray((painted * 255).astype(np.uint8), "L")


class Remover:
    """The loaded models and one removal per call."""

    def __init__(self, args):
        self.args = args
        self.device, self.dtype = resolve_device_dtype(args.device, args.dtype)
        spec = SimpleNamespace(**{**vars(args), "fuse_lora": bool(args.lora_path), "scheduler": "default"})
        self.pipe, self.cond, self.uncond = load_remover(spec, self.device, self.dtype)
        self.full_scheduler = self.pipe.scheduler
        self.lcm_scheduler = None
        if args.lcm_lora:
            from diffusers import LCMScheduler

            load_lora_into_pipeline(self.pipe, args.lcm_lora, "--lcm_lora", kinds=("lcm_student",))
            self.pipe.to(self.device)
            self.pipe.unet.disable_adapters()
            self.lcm_scheduler = LCMScheduler.from_config(self.full_scheduler.config)
        self.reward = None
        if args.RORem_discriminator:
            from myutils.reward_utils import load_reward_model

            self.reward = load_reward_model(args.pretrained_model, args.RORem_discriminator, args.resolution,
                                            self.device, self.dtype, variant=args.variant)
        self.output_dir = args.output_dir or tempfile.mkdtemp(prefix="rorem_app_")

    def modes(self):
        return [FULL] + ([FOUR] if self.lcm_scheduler is not None else [])

    @torch.no_grad()
    def remove(self, image, mask, mode, seed):
        """(result PIL at the image's size, the saved PNG's path, the discriminator's score or None)."""
        seed = seed_of(seed)
        check_upload(image, self.args.max_side)
        check_upload(mask, self.args.max_side, "the mask")
        image = image.convert("RGB")
        mask = mask.convert("L").resize(image.size, Image.NEAREST)
        if not (np.asarray(mask) >= 128).any():
            raise UserError("paint over the object to remove (or upload a mask) first")
        if mode not in self.modes():
            raise UserError(f"{mode!r}: this app offers {', '.join(self.modes())}" +
                            ("" if self.lcm_scheduler else " (start it with --lcm_lora for 4-step removal)"))
        four = mode == FOUR
        spec = SimpleNamespace(resolution=self.args.resolution, inference_steps=4 if four else self.args.inference_steps,
                               strength=1.0 if four else self.args.strength, guidance_scale=1.0 if four else self.args.guidance_scale)
        self.pipe.scheduler = self.lcm_scheduler if four else self.full_scheduler
        if self.lcm_scheduler is not None:
            (self.pipe.unet.enable_adapters if four else self.pipe.unet.disable_adapters)()
        result = remove_objects(self.pipe, self.cond, self.uncond, [image], [mask], spec, int(seed))[0]
        stem = os.path.join(self.output_dir, f"removed-{time.strftime('%Y%m%d-%H%M%S')}-{'4step' if four else 'full'}-seed{seed}")
        path, n = f"{stem}.png", 1
        while os.path.exists(path):  # the same removal twice in a second: keep both
            n += 1
            path = f"{stem}-{n}.png"
        result.save(path)
        score = None
        if self.reward is not None:
            from myutils.reward_utils import score_images

            score = score_images(self.reward, image, mask, result)
        return result, path, score


def build_demo(remover):
    import gradio as gr

    def run(editor, mask_upload, mode, seed):
        try:
            image = editor.get("background") if isinstance(editor, dict) else None
            if image is None:
                raise UserError("upload an image first")
            mask = mask_upload if mask_upload is not None else mask_from_editor(editor)
            result, path, score = remover.remove(image, mask, mode, seed)
        except UserError as e:
            raise gr.Error(str(e))
        verdict = "" if score is None else f"discriminator score **{score:.3f}** ({'success' if score >= 0.5 else 'failure'} at 0.5)"
        return result, path, verdict

    with gr.Blocks(title="RORem object removal") as demo:
        gr.Markdown("## RORem object removal\nUpload an image, paint over the object (the brush), choose the sampler and the seed.")
        with gr.Row():
            editor = readable_uploads(gr.ImageEditor(label="image: paint the object", type="pil", elem_id="editor", format="png",
                                                     brush=gr.Brush(colors=["#ff3b3b"], color_mode="fixed")), "the image")
            output = gr.Image(label="result", type="pil", format="png", elem_id="result")
        with gr.Row():
            mode = gr.Radio(remover.modes(), value=FULL, label="removal", elem_id="mode")
            seed = gr.Number(value=0, label="seed", elem_id="seed")  # checked by seed_of: no silent rounding
            mask_upload = readable_uploads(gr.Image(label="or upload a mask (white = remove)", type="pil", image_mode="L",
                                                    elem_id="mask_upload"), "the mask")
        button = gr.Button("Remove", variant="primary", elem_id="remove")
        score = gr.Markdown(elem_id="score")
        download = gr.File(label="download the result (PNG)", elem_id="download")
        button.click(run, [editor, mask_upload, mode, seed], [output, download, score], concurrency_limit=1)
    return demo


def build_server(remover, hosts):
    """The page as an ASGI app answering only `hosts` (Gradio's own launch checks no Host header)."""
    import gradio as gr
    from fastapi import FastAPI

    app = gr.mount_gradio_app(FastAPI(), build_demo(remover).queue(), path="", allowed_paths=[remover.output_dir])
    return guard_hosts(app, hosts)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    check_port(args.host, args.port)  # before minutes of model loading
    remover = Remover(args)
    app = build_server(remover, allowed_hosts(args.host, args.allowed_host))
    print(f"removal app at http://{args.host}:{args.port} ({', '.join(remover.modes())}); results saved in {remover.output_dir}")
    serve(app, args)
    return remover


if __name__ == "__main__":
    run_cli(main)
