"""FLUX.1-Fill-style flow-matching inpainting for online RL (DESIGN.md section 8).

The conventions are diffusers' FluxFillPipeline's: latents are (latent - shift_factor) * scaling_factor,
packed into 2x2 patches (B, h/2 * w/2, 4C); the transformer sees [packed noisy latents, packed
masked-image latents, the mask packed as 8x8 pixel blocks] on the channel axis, timestep sigma
(t / 1000), the distilled guidance embedding, the T5 sequence and the pooled CLIP embedding;
sigmas linspace(1, 1/N, N) shifted by mu(image tokens). The prompt is encoded once and the text
encoders are dropped. Images are encoded with the posterior mean (no sampling noise in the condition).
"""
import json
import os

import numpy as np
import torch

from myutils.errors import UserError
from myutils.rl_utils import flowmatch_step_mean_std
from myutils.rng import randn_per_sample
from myutils.sdxl_inpaint import decode_latents, masked_image, vae_latent_params
from myutils.transfer import constant_on

FLOW_PIPELINES = ("FluxFillPipeline",)


def model_family(name):
    """"flow" for a FLUX-Fill folder (model_index.json names FluxFillPipeline) or a hub id that
    names one, else "sdxl"."""
    index = os.path.join(name, "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return "flow" if json.load(f).get("_class_name") in FLOW_PIPELINES else "sdxl"
    return "flow" if "flux" in name.lower() and "fill" in name.lower() else "sdxl"


def pack(latents):
    """(B, C, h, w) -> (B, h/2 * w/2, 4C), FluxFillPipeline._pack_latents."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(latents, h, w):
    """Inverse of pack for latent size (h, w)."""
    b, _, c4 = latents.shape
    return latents.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def pack_mask(mask, factor):
    """A pixel mask (B, 1, H, W) -> (B, h/2 * w/2, 4 factor^2): each latent pixel's factor x factor
    block of mask pixels on channels, then packed (FluxFillPipeline.prepare_mask_latents)."""
    b, _, hh, ww = mask.shape
    h, w = hh // factor, ww // factor
    m = mask[:, 0].reshape(b, h, factor, w, factor).permute(0, 2, 4, 1, 3).reshape(b, factor * factor, h, w)
    return pack(m)


class FlowFillSampler:
    """The Flow-GRPO sampler for a FLUX-Fill model: the SDE step (flowmatch_step_mean_std) for
    training, the Euler ODE when deterministic; the last (sharpest) step is always the ODE step and
    is not trained (num_train_steps = steps - 1)."""

    family = "flow"

    def __init__(self, pretrained, device, dtype, num_steps, strength, resolution, noise_level=0.7, naive=False, prompt="",
                 guidance=30.0, max_sequence_length=512, variant=None, revision=None):
        from diffusers import FluxFillPipeline, FluxTransformer2DModel
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        from transformers import CLIPTextModel, T5EncoderModel

        try:
            # the big parts load straight onto this rank's device: FLUX.1-Fill's 12B transformer and T5-XXL
            # staged in host memory by each of 8 ranks took about 380 GB per node; read this way the files'
            # pages are shared by the ranks in the page cache and each rank stages one tensor at a time
            where = dict(pretrained_model_name_or_path=pretrained, torch_dtype=dtype, variant=variant, revision=revision,
                         device_map={"": str(device)})
            parts = dict(transformer=FluxTransformer2DModel.from_pretrained(subfolder="transformer", **where),
                         text_encoder=CLIPTextModel.from_pretrained(subfolder="text_encoder", **where),
                         text_encoder_2=T5EncoderModel.from_pretrained(subfolder="text_encoder_2", **where))
            pipe = FluxFillPipeline.from_pretrained(pretrained, torch_dtype=dtype, variant=variant, revision=revision, **parts)
        except (OSError, ValueError) as err:
            raise UserError(f"--pretrained_model_name_or_path {pretrained}: cannot load a FLUX-Fill pipeline ({str(err).splitlines()[0]})")
        self.factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        if resolution % (2 * self.factor):
            raise UserError(f"--resolution {resolution} must be a multiple of {2 * self.factor} for this flow model (VAE factor "
                            f"{self.factor}, 2x2 packing)")
        with torch.no_grad():
            self.prompt_embeds, self.pooled, self.text_ids = pipe.encode_prompt(prompt, prompt, device=device,
                                                                                max_sequence_length=max_sequence_length)
        # LoRA adapters are added to the transformer on its device; accelerator.prepare wraps it there
        self.model, self.vae = pipe.transformer, pipe.vae.to(device, torch.float32)
        self.vae.requires_grad_(False)
        self.scheduler = pipe.scheduler
        self.h = self.w = resolution // self.factor
        tokens = (self.h // 2) * (self.w // 2)
        cfg = self.scheduler.config
        mu = calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu, device="cpu")
        init = min(int(num_steps * strength), num_steps)
        first = num_steps - init  # the schedule's bookkeeping as Python numbers: no device sync to read a step's sigma
        self.timesteps, self.step_indices = self.scheduler.timesteps.tolist()[first:], list(range(first, num_steps))
        sigmas = self.scheduler.sigmas.tolist()
        self.start_sigma, self.dts = sigmas[first], [sigmas[i] - sigmas[i + 1] for i in self.step_indices]
        if len(self.timesteps) < 2:
            raise UserError(f"--strength {strength} with --sample_steps {num_steps} leaves {len(self.timesteps)} flow step(s): at "
                            "least 2 are needed (the last step is never trained)")
        self.num_train_steps = len(self.timesteps) - 1
        self.img_ids = FluxFillPipeline._prepare_latent_image_ids(1, self.h // 2, self.w // 2, device, dtype)
        self.guidance = torch.tensor([guidance], dtype=torch.float32) if self.model.config.guidance_embeds else None
        self.strength, self.noise_level, self.naive, self.dtype = strength, noise_level, naive, dtype
        del pipe, parts  # the text encoders are not needed after the prompt is encoded

    def _encode(self, pixels):
        shift = self.vae.config.shift_factor or 0.0
        z = vae_latent_params(self.vae, pixels).chunk(2, dim=1)[0]  # the posterior mean, encoded in bounded chunks
        return pack((z - shift) * self.vae.config.scaling_factor)

    @torch.no_grad()
    def condition(self, batch):
        masked = self._encode(masked_image(batch["source"], batch["mask"]))
        fill = torch.cat([masked, pack_mask(batch["mask"].float().to(masked.device), self.factor)], dim=-1)
        return {**batch, "fill_condition": fill, "source_latents": self._encode(batch["source"])}

    def start(self, cond, generators):
        noise = randn_per_sample(generators, cond["source_latents"].shape[1:], cond["source_latents"].device)
        if self.strength >= 1:
            return noise
        sigma = self.start_sigma
        return sigma * noise + (1 - sigma) * cond["source_latents"].float()  # scheduler.scale_noise

    def output(self, model, x, j, cond):
        b = x.shape[0]
        guidance = constant_on(self.guidance, x.device).expand(b) if self.guidance is not None else None
        return model(hidden_states=torch.cat([x, cond["fill_condition"]], dim=-1).to(self.dtype),  # the timestep: filled in on the device
                     timestep=(torch.full((b,), float(self.timesteps[j]), device=x.device) / 1000).to(self.dtype), guidance=guidance,
                     pooled_projections=self.pooled.expand(b, -1), encoder_hidden_states=self.prompt_embeds.expand(b, -1, -1),
                     txt_ids=self.text_ids, img_ids=self.img_ids, return_dict=False)[0].float()

    def step_length(self, j):
        """|dt| of step j: sigma_j - sigma_{j+1}."""
        return self.dts[j]

    def step(self, v, j, x, deterministic=False):
        noise_level = 0.0 if deterministic else self.noise_level
        mean, scale, _ = flowmatch_step_mean_std(self.scheduler, v, self.timesteps[j], x, noise_level, self.naive,
                                                 step_index=self.step_indices[j])
        return mean, (None if deterministic else scale)

    def distribution(self, model, x, j, cond, deterministic=False):
        return self.step(self.output(model, x, j, cond), j, x, deterministic)

    @torch.no_grad()
    def decode(self, latents):
        return decode_latents(self.vae, unpack(latents.float(), self.h, self.w))  # decode_latents applies shift and scale
