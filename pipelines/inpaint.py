"""Sampling with the stock diffusers SDXL-inpainting pipeline, from precomputed prompt embeddings,
and the remover as the inference scripts load and run it (one set of arguments for all of them)."""
import argparse

import torch
from diffusers import StableDiffusionXLInpaintPipeline

from myutils.args import NONNEGATIVE_REAL, POSITIVE, SEED, real, resolution
from myutils.errors import UserError
from myutils.img_util import aspect_problem, paste_back, processing_size
from myutils.models import DEFAULT_MODEL, load_inpaint_pipeline, load_lora_into_pipeline
from myutils.sdxl_inpaint import encode_prompt_pair


def make_pipeline(vae, unet, scheduler):
    """A StableDiffusionXLInpaintPipeline without text encoders (prompts arrive as embeddings)."""
    pipe = StableDiffusionXLInpaintPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                            tokenizer_2=None, unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def inpaint(pipe, condition, images, masks, resolution, steps=50, strength=0.99, seed=0, guidance_scale=1.0,
            negative=None):
    """Remove the masked region of each PIL image (all of one size; `resolution` is an int or
    (height, width)). Image i uses generator seed `seed + i`, so a result does not depend on which
    other images share its batch. With guidance_scale > 1 this is real classifier-free guidance:
    the UNet sees the `negative` condition and the prompt, and their predictions are combined."""
    n = len(images)
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    kwargs = {}
    if guidance_scale > 1:
        if negative is None:
            raise ValueError("guidance_scale > 1 needs the negative (unconditional) condition")
        kwargs = {"negative_prompt_embeds": negative.prompt_embeds.expand(n, -1, -1),
                  "negative_pooled_prompt_embeds": negative.pooled_prompt_embeds.expand(n, -1)}
    out = pipe(prompt_embeds=condition.prompt_embeds.expand(n, -1, -1),
               pooled_prompt_embeds=condition.pooled_prompt_embeds.expand(n, -1),
               image=images, mask_image=masks, height=height, width=width,
               num_inference_steps=steps, strength=strength, guidance_scale=guidance_scale,
               generator=generators, output_type="pil", **kwargs)
    return out.images


def add_remover_args(p):
    """The arguments that choose and run a remover (inference_RORem.py, build_preference_pairs.py)."""
    p.add_argument("--pretrained_model", default=DEFAULT_MODEL, help="SDXL-inpainting folder or hub id")
    p.add_argument("--RORem_unet", default=None, help="remover UNet folder (diffusers layout, or a folder with unet/)")
    p.add_argument("--lora_path", "--RORem_LoRA", default=None, help="a LoRA (pytorch_lora_weights.safetensors or its folder)")
    p.add_argument("--fuse_lora", action=argparse.BooleanOptionalAction, default=False,
                   help="merge the LoRA into the UNet weights (faster sampling)")
    p.add_argument("--scheduler", choices=["default", "lcm"], default="default",
                   help="lcm: LCMScheduler, for a latent-consistency (4-step) LoRA")
    p.add_argument("--variant", default=None, help="e.g. fp16 for RORem's released weights")
    p.add_argument("--inference_steps", type=POSITIVE, default=50)
    p.add_argument("--strength", type=real(above=0, maximum=1), default=0.99, help="diffusers runs int(steps * strength) steps")
    p.add_argument("--guidance_scale", type=NONNEGATIVE_REAL, default=1.0, help="> 1: classifier-free guidance")
    p.add_argument("--prompt", default="")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--resolution", type=resolution, default=512, help="shorter side while processing (multiple of 8)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto", help="auto: fp16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="auto")


def check_remover_args(args):
    if int(args.inference_steps * args.strength) < 1:
        raise UserError(f"--inference_steps {args.inference_steps} at --strength {args.strength} runs no denoising step")


def load_remover(args, device, dtype):
    """The pipeline with the remover (and LoRA) in place, and the prompt pair encoded once."""
    pipe = load_inpaint_pipeline(args.pretrained_model, args.RORem_unet, variant=args.variant, dtype=dtype,
                                 flags=("--pretrained_model", "--RORem_unet"))
    if args.lora_path:
        # an LCM student runs with LCMScheduler in 4 steps, a remover's LoRA with the full sampler
        load_lora_into_pipeline(pipe, args.lora_path, "--RORem_LoRA", kinds=("lcm_student",) if args.scheduler == "lcm" else ("remover",))
        if args.fuse_lora:
            pipe.fuse_lora()
            pipe.unload_lora_weights()  # the merged weights stay; the LoRA layers go
    if args.scheduler == "lcm":
        from diffusers import LCMScheduler

        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = encode_prompt_pair(pipe, args.prompt, args.negative_prompt, device)
    return pipe, cond.to(device, dtype), uncond.to(device, dtype)


def count_unet_calls(pipe):
    """Count the UNet's forward calls from now on (one call may hold a CFG-doubled batch): returns a
    one-element list that grows with each call."""
    calls, forward = [0], pipe.unet.forward

    def counted(*a, **k):
        calls[0] += 1
        return forward(*a, **k)

    pipe.unet.forward = counted
    return calls


def remove_objects(pipe, cond, uncond, images, masks, args, seed):
    """Process same-sized images together; return results at each input's original size, pasted back."""
    w, h = images[0].size
    if aspect_problem(w, h):
        raise UserError(aspect_problem(w, h))
    size = processing_size(w, h, args.resolution)
    small = [im.resize(size, resample=3) for im in images]
    small_masks = [m.resize(size, resample=0) for m in masks]
    out = inpaint(pipe, cond, small, small_masks, (size[1], size[0]), args.inference_steps, args.strength,
                  seed=seed, guidance_scale=args.guidance_scale, negative=uncond)
    return [paste_back(r.resize((w, h), resample=3), im, m) for r, im, m in zip(out, images, masks)]
