"""The inpainting sampler for online RL: stochastic DDIM (eta > 0) that records every latent, each
step's log-prob and the timesteps, starting from the input noised to `strength` (DESIGN.md section 7)."""
import torch

from myutils.rl_utils import ddim_step_with_logprob
from myutils.rng import randn_per_sample
from myutils.sdxl_inpaint import unet_input


def rl_scheduler(config, num_steps):
    """A DDIM scheduler for sampling with log-probs. set_alpha_to_one=False keeps the last step's
    variance above zero (with alpha = 1 it would be deterministic and have no log-prob)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(config, set_alpha_to_one=False, clip_sample=False)
    sched.set_timesteps(num_steps)
    return sched


def denoising_timesteps(scheduler, strength):
    """The timesteps a sample at `strength` goes through: the last int(N * strength) of the N."""
    n = scheduler.num_inference_steps
    init = min(int(n * strength), n)
    return scheduler.timesteps[n - init:]


def predict(unet, latents, t, mask_latent, masked_latents, condition_kwargs, guidance_scale=1.0, uncond_kwargs=None):
    """The UNet's output at (latents, t), with classifier-free guidance when guidance_scale > 1."""
    dtype = condition_kwargs["encoder_hidden_states"].dtype
    x = unet_input(latents, mask_latent, masked_latents).to(dtype)
    tt = torch.full((x.shape[0],), int(t), device=x.device)
    if guidance_scale <= 1:
        return unet(x, tt, **condition_kwargs).sample.float()
    both = {"encoder_hidden_states": torch.cat([uncond_kwargs["encoder_hidden_states"], condition_kwargs["encoder_hidden_states"]]),
            "added_cond_kwargs": {k: torch.cat([uncond_kwargs["added_cond_kwargs"][k], condition_kwargs["added_cond_kwargs"][k]])
                                  for k in condition_kwargs["added_cond_kwargs"]}}
    u, c = unet(torch.cat([x, x]), torch.cat([tt, tt]), **both).sample.float().chunk(2)
    return u + guidance_scale * (c - u)


@torch.no_grad()
def sample_with_logprob(unet, scheduler, source_latents, mask_latent, masked_latents, condition_kwargs, strength, eta, generators,
                        guidance_scale=1.0, uncond_kwargs=None):
    """Sample a batch and record the trajectory. Returns {"latents": (B, S+1, C, h, w) from the start
    to the result, "log_probs": (B, S), "timesteps": (S,)}; S = int(N * strength). At strength 1 the
    start is pure noise, below it the source latents noised to the first timestep (the inpainting
    pipeline's convention). Per-sample generators make a sample independent of its batch."""
    timesteps = denoising_timesteps(scheduler, strength)
    if len(timesteps) == 0:
        raise ValueError(f"strength {strength} with {scheduler.num_inference_steps} steps denoises no step")
    noise = randn_per_sample(generators, source_latents.shape[1:], "cpu").to(source_latents.device)
    latents = noise if strength >= 1 else scheduler.add_noise(source_latents.float(), noise, timesteps[:1].repeat(len(noise)))
    trajectory, log_probs = [latents.float()], []
    for t in timesteps:
        out = predict(unet, trajectory[-1], t, mask_latent, masked_latents, condition_kwargs, guidance_scale, uncond_kwargs)
        latents, log_prob = ddim_step_with_logprob(scheduler, out, t, trajectory[-1], eta, generator=generators)
        trajectory.append(latents)
        log_probs.append(log_prob)
    return {"latents": torch.stack(trajectory, 1), "log_probs": torch.stack(log_probs, 1), "timesteps": timesteps}
