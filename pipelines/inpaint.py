"""Sampling with the stock diffusers SDXL-inpainting pipeline, from precomputed prompt embeddings."""
import torch
from diffusers import StableDiffusionXLInpaintPipeline


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
