"""SDXL-inpainting conditioning, the one place every script builds the UNet's inputs.

Conventions match diffusers' StableDiffusionXLInpaintPipeline:
- UNet input = cat([noisy_latents (4), mask (1), masked_image_latents (4)], dim=1).
- Mask 1 = region to remove; masked image = source * (mask < 0.5) in [-1, 1]; the mask is
  downsampled to latent size with nearest interpolation.
- add_time_ids = original_size (h, w) + crop_top_left (top, left) + target_size (h, w), or
  original_size + crop + aesthetic score when the UNet was built with requires_aesthetics_score.
- Prompt embeddings are computed once (empty prompt by default) and the text encoders dropped.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .rng import randn_per_sample


def masked_image(pixels, mask):
    """Source pixels with the hole set to 0 (mid-grey in [-1, 1]); mask is 1 inside the hole."""
    return pixels * (mask < 0.5).to(pixels.dtype)


def downsample_mask(mask, latent_hw):
    """Binary (B, 1, H, W) pixel mask -> (B, 1, h, w) latent mask by nearest interpolation."""
    return F.interpolate(mask, size=tuple(latent_hw), mode="nearest")


def unet_input(noisy_latents, mask_latents, masked_image_latents):
    """The 9-channel SDXL-inpainting input, in the order the pretrained UNet expects."""
    return torch.cat([noisy_latents, mask_latents.to(noisy_latents.dtype), masked_image_latents.to(noisy_latents.dtype)], dim=1)


def add_time_ids(original_size, crop_top_left, target_size, aesthetic_score=None, device=None):
    """SDXL micro-conditioning, (B, 6) or (B, 5) with an aesthetic score. Sizes are (h, w) per sample
    (or one (h, w) for all). Every part is built on `device` (default: original_size's), so a batch's
    sizes on the GPU never meet a target size made on the CPU. Numbers given in Python are filled in
    on the device (no copy from the host, which would wait for the GPU)."""
    if device is None:
        device = original_size.device if torch.is_tensor(original_size) else None
    original_size = _on(original_size, device).reshape(-1, 2)
    b, device = original_size.shape[0], original_size.device
    crop_top_left = _on(crop_top_left, device).reshape(-1, 2).expand(b, 2)
    if aesthetic_score is not None:
        last = torch.full((b, 1), float(aesthetic_score), device=device)
    else:
        last = _on(target_size, device).reshape(-1, 2).expand(b, 2)
    return torch.cat([original_size, crop_top_left, last], dim=1)


def _on(value, device):
    """float32 on `device`: a tensor moved (a batch's is on the device already), Python numbers filled in."""
    if torch.is_tensor(value):
        return value.to(device, torch.float32)
    flat = torch.tensor(value, dtype=torch.float32).reshape(-1).tolist()
    return torch.stack([torch.full((), v, device=device) for v in flat]) if flat else torch.zeros(0, device=device)


@dataclass
class PromptCondition:
    """Prompt embeddings computed once, plus what add_time_ids needs to know about the UNet."""

    prompt_embeds: torch.Tensor  # (1, 77, 2048) for SDXL
    pooled_prompt_embeds: torch.Tensor  # (1, 1280)
    requires_aesthetics_score: bool = False
    aesthetic_score: float = 6.0

    def to(self, device, dtype):
        return PromptCondition(self.prompt_embeds.to(device, dtype), self.pooled_prompt_embeds.to(device, dtype),
                               self.requires_aesthetics_score, self.aesthetic_score)

    def unet_kwargs(self, original_size, crop_top_left, target_size):
        """encoder_hidden_states and added_cond_kwargs for a batch (size from original_size)."""
        ids = add_time_ids(original_size, crop_top_left, target_size,
                           self.aesthetic_score if self.requires_aesthetics_score else None, device=self.prompt_embeds.device)
        b = ids.shape[0]
        return {
            "encoder_hidden_states": self.prompt_embeds.expand(b, -1, -1),
            "added_cond_kwargs": {"text_embeds": self.pooled_prompt_embeds.expand(b, -1),
                                  "time_ids": ids.to(self.prompt_embeds.dtype)},
        }


@torch.no_grad()
def encode_prompt_once(pipe, prompt="", device="cpu"):
    """Run the pipeline's own SDXL prompt encoder once (penultimate states of both encoders, pooled
    output of the second), so training and inference see identical embeddings."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return PromptCondition(embeds.float().cpu(), pooled.float().cpu(),
                           bool(getattr(pipe.config, "requires_aesthetics_score", False)))


@torch.no_grad()
def encode_prompt_pair(pipe, prompt="", negative_prompt="", device="cpu"):
    """(condition, unconditional) for classifier-free guidance, as the SDXL pipeline builds them:
    an empty negative prompt gives zero embeddings when the model sets force_zeros_for_empty_prompt."""
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                         do_classifier_free_guidance=True,
                                                         negative_prompt=negative_prompt or None)
    aes = bool(getattr(pipe.config, "requires_aesthetics_score", False))
    return (PromptCondition(embeds.float().cpu(), pooled.float().cpu(), aes),
            PromptCondition(neg.float().cpu(), neg_pooled.float().cpu(), aes))


VAE_ENCODE_CHUNK = 4  # images per VAE encode: the fp32 SDXL VAE needs ~2.5 GiB of temporaries per 1024 px image


@torch.no_grad()
def vae_latent_params(vae, pixels, chunk=VAE_ENCODE_CHUNK):
    """VAE posterior parameters (mean and logvar stacked on channels, unscaled) for [-1, 1] pixels,
    encoded `chunk` images at a time, so a batch of 16 at 1024 px does not hold 40 GB of temporaries."""
    return torch.cat([vae.encode(pixels[i:i + chunk].to(vae.device, vae.dtype)).latent_dist.parameters.float()
                      for i in range(0, len(pixels), chunk)])


def _scale(z, vae_config):
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (z - shift) * vae_config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents, chunk=VAE_ENCODE_CHUNK):
    """Scaled latents (what the UNet denoises) -> pixels in [-1, 1], decoded in the VAE's dtype,
    `chunk` at a time."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents / vae.config.scaling_factor + shift
    return torch.cat([vae.decode(z[i:i + chunk].to(vae.device, vae.dtype)).sample.float().clamp(-1, 1)
                      for i in range(0, len(z), chunk)])


def posterior_mean_latents(params, vae_config):
    """The posterior mean, shifted and scaled: deterministic latents of an image (for scoring)."""
    return _scale(params.chunk(2, dim=1)[0], vae_config)


def sample_latents(params, vae_config, generators=None):
    """Draw from the posterior given by vae_latent_params and apply the VAE's shift and scaling.
    `generators`: None (global RNG) or one torch.Generator per sample."""
    mean, logvar = params.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    if generators is None:
        eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
    else:
        eps = randn_per_sample(generators, mean.shape[1:], mean.device, mean.dtype)
    return _scale(mean + std * eps, vae_config)


@torch.no_grad()
def batch_latent_params(vae, batch, keys):
    """Posterior params of each image in `keys` ("masked" = the masked source) plus the latent-size
    mask: {"params:<key>": ..., "mask_latent": ...}, all on the VAE's device whatever the batch's. Used
    live in the training step and by the latent cache, so the two paths cannot drift apart."""
    out = {}
    for k in keys:
        pixels = masked_image(batch["source"], batch["mask"]) if k == "masked" else batch[k]
        out[f"params:{k}"] = vae_latent_params(vae, pixels)
    first = out[f"params:{keys[0]}"]
    out["mask_latent"] = downsample_mask(batch["mask"].to(first.device).float(), first.shape[-2:])
    return out


def noised_inputs(noise_scheduler, vae, condition, batch, resolution, seed, key="GT"):
    """The training input of one denoising step for batch[key]'s image: its latents (drawn from the
    VAE posterior) noised at a random timestep, as the 9-channel UNet input; the timesteps, the target
    (noise, or velocity for v-prediction) and the UNet's conditioning. Noise, timestep and latent draws
    come from per-sample generators, so a sample gets the same ones on any number of ranks."""
    from .errors import UserError
    from .rng import randint_per_sample, sample_generators

    if "params:masked" not in batch:  # pixels: encode now (with --cache_latents they come from disk)
        batch = {**batch, **batch_latent_params(vae, batch, [key, "masked"])}
    gens = sample_generators(batch, seed)
    latents = sample_latents(batch[f"params:{key}"], vae.config, gens)
    masked_latents = sample_latents(batch["params:masked"], vae.config, gens)
    noise = randn_per_sample(gens, latents.shape[1:], latents.device)
    t = randint_per_sample(gens, noise_scheduler.config.num_train_timesteps, latents.device)
    x = unet_input(noise_scheduler.add_noise(latents, noise, t), batch["mask_latent"], masked_latents)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    else:
        raise UserError(f"prediction type {noise_scheduler.config.prediction_type!r} is not supported (epsilon or v_prediction)")
    kw = condition.unet_kwargs(batch["original_size"], batch["crop_top_left"], (resolution, resolution))
    return x.to(condition.prompt_embeds.dtype), t, target, kw
