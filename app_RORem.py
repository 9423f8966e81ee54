#!/usr/bin/env python
"""Remove objects interactively: upload an image, paint over the object, get the result (Gradio).

    python app_RORem.py --pretrained_model diffusers/stable-diffusion-xl-1.0-inpainting-0.1 \
        --RORem_unet path/to/RORem_unet --lcm_lora path/to/RORem_LCM_lora \
        --RORem_discriminator path/to/RORem_discriminator

Open http://127.0.0.1:7860 (bound to 127.0.0.1 unless --host says otherwise). Paint the object with
the brush (any colour; what is painted is removed) or upload a mask instead; choose the full sampler
(--inference_steps, 50 by default) or 4 steps with the LCM LoRA (--lcm_lora), and the seed. The
result is pasted back into the untouched image at its own size, as inference_RORem.py does, and can
be downloaded as PNG; with --RORem_discriminator the page shows its score (>= 0.5: success).

One pipeline serves both modes: the remover (its --lora_path merged in), with the LCM LoRA as an
adapter switched on only for 4-step removal, and the scheduler swapped per request. Requests run one
at a time (Gradio's queue).
"""
import argparse
import os
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from myutils.errors import UserError, run_cli
from myutils.models import load_lora_into_pipeline, resolve_device_dtype
from pipelines.inpaint import add_remover_args, check_remover_args, load_remover, remove_objects

FULL, FOUR = "full sampler", "4 steps (LCM)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_remover_args(p)
    p.add_argument("--lcm_lora", default=None, help="the LCM LoRA of train_RORem_lcm.py (enables 4-step removal)")
    p.add_argument("--RORem_discriminator", default=None, help="a discriminator folder: show each result's score")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--output_dir", default=None, help="where results are saved for download (default: a temporary folder)")
    args = p.parse_args(argv)
    check_remover_args(args)
    return args


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

            load_lora_into_pipeline(self.pipe, args.lcm_lora, "--lcm_lora")
            self.pipe.to(self.device)
            self.pipe.unet.disable_adapters()
            self.lcm_scheduler = LCMScheduler.from_config(self.full_scheduler.config)
        self.reward = None
        if args.RORem_discriminator:
            from myutils.reward_utils import load_reward_model

            self.reward = load_reward_model(args.pretrained_model, args.RORem_discriminator, args.resolution,
                                            self.device, self.dtype, variant=args.variant)
        self.output_dir = args.output_dir or tempfile.mkdtemp(prefix="rorem_app_")
        os.makedirs(self.output_dir, exist_ok=True)

    def modes(self):
        return [FULL] + ([FOUR] if self.lcm_scheduler is not None else [])

    @torch.no_grad()
    def remove(self, image, mask, mode, seed):
        """(result PIL at the image's size, the saved PNG's path, the discriminator's score or None)."""
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
        path = os.path.join(self.output_dir, f"removed-{time.strftime('%Y%m%d-%H%M%S')}-{'4step' if four else 'full'}-seed{int(seed)}.png")
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
            editor = gr.ImageEditor(label="image: paint the object", type="pil", elem_id="editor", format="png",  # lossless
                                    brush=gr.Brush(colors=["#ff3b3b"], color_mode="fixed"))
            output = gr.Image(label="result", type="pil", format="png", elem_id="result")
        with gr.Row():
            mode = gr.Radio(remover.modes(), value=FULL, label="removal", elem_id="mode")
            seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
            mask_upload = gr.Image(label="or upload a mask (white = remove)", type="pil", image_mode="L", elem_id="mask_upload")
        button = gr.Button("Remove", variant="primary", elem_id="remove")
        score = gr.Markdown(elem_id="score")
        download = gr.File(label="download the result (PNG)", elem_id="download")
        button.click(run, [editor, mask_upload, mode, seed], [output, download, score], concurrency_limit=1)
    return demo


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    remover = Remover(args)
    demo = build_demo(remover)
    print(f"removal app at http://{args.host}:{args.port} ({', '.join(remover.modes())}); results saved in {remover.output_dir}")
    demo.queue().launch(server_name=args.host, server_port=args.port, allowed_paths=[remover.output_dir])
    return remover


if __name__ == "__main__":
    run_cli(main)
