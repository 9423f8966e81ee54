"""Samplers for online RL that record every latent and each step's log-prob.

A sampler holds the frozen parts of a model family (VAE, prompt embeddings, scheduler) and knows
the Gaussian of each denoising step; the trainable network (UNet or flow transformer) is passed in,
so a LoRA policy and its LoRA-off reference share one base. Same methods for both families:
    condition(batch) -> batch + conditioning tensors     start(cond, generators) -> first latents
    distribution(model, x, j, cond, deterministic) -> (mean, scale) of step j (scale None: deterministic),
        = step(output(model, x, j, cond), j, x, deterministic)
    decode(latents) -> pixels in [-1, 1]                   timesteps, num_train_steps
    step_length(j) -> |dt| of a flow step (1 for DDIM), for the KL's unit (rl_utils.kl_in_unit)
SDXLInpaintSampler here (stochastic DDIM, DESIGN.md section 7; or multistep LCM for a 4-step student);
FlowFillSampler in pipelines/flow_inpaint.py (the marginal-preserving SDE, section 8).
"""
import torch

from myutils.lcm_utils import lcm_denoised, lcm_step_mean_std
from myutils.rl_utils import ddim_step_mean_std, gaussian_log_prob
from myutils.rng import randn_per_sample
from myutils.sdxl_inpaint import batch_latent_params, decode_latents, posterior_mean_latents, unet_input


def rl_scheduler(config, num_steps):
    """A DDIM scheduler for sampling with log-probs. set_alpha_to_one=False keeps the last step's
    variance above zero (with alpha = 1 it would be deterministic and have no log-prob)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(config, set_alpha_to_one=False, clip_sample=False)
    sched.set_timesteps(num_steps)
    return sched


def denoising_timesteps(scheduler, strength):
    """The timesteps a sample at `strength` goes through, as Python ints: the last int(N * strength) of
    the N. Plain numbers: reading one never synchronises a device, and a step's timestep tensor is
    made where the step runs."""
    n = scheduler.num_inference_steps
    init = min(int(n * strength), n)
    return scheduler.timesteps.tolist()[n - init:]


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


class SDXLInpaintSampler:
    """Stochastic DDIM (eta > 0) for the SDXL-inpainting UNet; deterministic = DDIM at eta 0. The
    start is the source noised to --strength * T (pure noise at 1), as in the inpainting pipeline.

    scheduler="lcm": multistep LCM sampling, as inference_RORem_4S.py runs a 4-step student
    (LCMScheduler's timesteps and step): each step's consistency output noised afresh to the next
    timestep (a Gaussian step: mean sqrt(a_prev) denoised, scale sqrt(1 - a_prev)), the last step's
    returned as it is; eta is ignored and `deterministic` takes the mean (LCM has no eta-0 form)."""

    family = "sdxl"

    def __init__(self, comps, num_steps, strength, eta, resolution, guidance_scale=1.0, scheduler="ddim"):
        from diffusers import LCMScheduler

        self.vae, self.model = comps.vae, comps.unet
        self.prompt, self.negative = comps.guidance
        self.lcm = scheduler == "lcm"
        if self.lcm:
            self.scheduler = LCMScheduler.from_config(comps.sample_scheduler_config)
            self.scheduler.set_timesteps(num_steps)
        else:
            self.scheduler = rl_scheduler(comps.sample_scheduler_config, num_steps)
        self.timesteps = denoising_timesteps(self.scheduler, strength)
        # every DDIM step has a variance; LCM's last step has none
        self.num_train_steps = len(self.timesteps) - 1 if self.lcm else len(self.timesteps)
        self.strength, self.eta, self.resolution, self.guidance_scale = strength, 1.0 if self.lcm else eta, resolution, guidance_scale

    @torch.no_grad()
    def condition(self, batch):
        params = batch_latent_params(self.vae, batch, ["masked", "source"])
        return {**batch, "masked_latents": posterior_mean_latents(params["params:masked"], self.vae.config),
                "source_latents": posterior_mean_latents(params["params:source"], self.vae.config), "mask_latent": params["mask_latent"]}

    def start(self, cond, generators):
        noise = randn_per_sample(generators, cond["source_latents"].shape[1:], cond["source_latents"].device)
        if self.strength >= 1:
            return noise
        t = torch.full((len(noise),), self.timesteps[0], dtype=torch.long, device=noise.device)
        return self.scheduler.add_noise(cond["source_latents"].float(), noise, t)

    def output(self, model, x, j, cond):
        size = (self.resolution, self.resolution)
        kw = self.prompt.unet_kwargs(cond["original_size"], cond["crop_top_left"], size)
        ukw = self.negative.unet_kwargs(cond["original_size"], cond["crop_top_left"], size) if self.guidance_scale > 1 else None
        return predict(model, x, self.timesteps[j], cond["mask_latent"], cond["masked_latents"], kw, self.guidance_scale, ukw)

    def step_length(self, j):
        """A DDIM step has no time step length in the flow sense (myutils/rl_utils.kl_in_unit): 1."""
        return 1.0

    def step(self, out, j, x, deterministic=False):
        t = self.timesteps[j]
        if self.lcm:
            prev = self.timesteps[j + 1] if j + 1 < len(self.timesteps) else None
            mean, scale = lcm_step_mean_std(out, t, prev, x, self.scheduler.config.prediction_type, self.scheduler.alphas_cumprod)
            return mean, None if deterministic else scale
        if deterministic:
            return self.scheduler.step(out, t, x.float(), eta=0.0).prev_sample, None
        return ddim_step_mean_std(self.scheduler, out, t, x, self.eta)

    def x0(self, out, j, x):
        """The clean latents predicted at step j (ReFL's one-step result): DDIM's x0; LCM's consistency output."""
        if self.lcm:
            return lcm_denoised(out, self.timesteps[j], x, self.scheduler.config.prediction_type, self.scheduler.alphas_cumprod)
        return self.scheduler.step(out, self.timesteps[j], x.float(), eta=0.0).pred_original_sample

    def distribution(self, model, x, j, cond, deterministic=False):
        return self.step(self.output(model, x, j, cond), j, x, deterministic)

    def decode(self, latents):
        return decode_latents(self.vae, latents)


@torch.no_grad()
def sample_trajectory(sampler, model, cond, generators, deterministic=False, start_generators=None):
    """Sample a batch and record it: {"latents": (B, S + 1, ...) from the start to the result,
    "log_probs": (B, sampler.num_train_steps)}. Steps from num_train_steps on (the flow sampler's
    last) and all steps when deterministic are taken at their mean. Per-sample generators make a
    sample independent of its batch; start_generators (default: generators) draw the start, so two
    samples can share a start and still differ in their step noise."""
    x = sampler.start(cond, start_generators or generators)
    latents, log_probs = [x.float()], []
    for j in range(len(sampler.timesteps)):
        stochastic = not deterministic and j < sampler.num_train_steps
        mean, scale = sampler.distribution(model, latents[-1], j, cond, deterministic=not stochastic)
        if stochastic:
            x = mean + scale * randn_per_sample(generators, mean.shape[1:], mean.device)
            log_probs.append(gaussian_log_prob(x, mean, scale))
        else:
            x = mean.float()
        latents.append(x)
    b = latents[0].shape[0]
    return {"latents": torch.stack(latents, 1),
            "log_probs": torch.stack(log_probs, 1) if log_probs else torch.zeros(b, 0, device=latents[0].device)}


def sample_with_grad(sampler, model, cond, generators, grad_steps, refl_step=None, checkpointing=False):
    """Direct reward fine-tuning's sample, with gradients through the last `grad_steps` steps only
    (DRaFT-K; all steps: AlignProp), the steps before them taken without a graph (the gradient is
    truncated there). The chain: deterministic DDIM for a sampler at eta 0; a stochastic sampler (LCM)
    draws each step's noise from the per-sample generators, so a sample is a fixed function of them
    and the weights. refl_step=j (ReFL): steps before j without a graph, then one step with gradients
    straight to the predicted x0 from step j. checkpointing: recompute each differentiated UNet call in
    backward (AlignProp's memory: one call's activations instead of all of them). Returns (final
    latents, [(j, x_j, output_j)] of the differentiated steps, for a drift penalty against the start)."""
    from torch.utils.checkpoint import checkpoint

    def advance(out, j, x):
        mean, scale = sampler.step(out, j, x, deterministic=sampler.eta == 0)
        return mean if scale is None else mean + scale * randn_per_sample(generators, mean.shape[1:], mean.device)

    n = len(sampler.timesteps)
    first = n - grad_steps if refl_step is None else refl_step
    x, steps = sampler.start(cond, generators), []
    with torch.no_grad():
        for j in range(first):
            x = advance(sampler.output(model, x, j, cond), j, x)
    for j in range(first, n if refl_step is None else first + 1):
        x_in = x
        if checkpointing:
            out = checkpoint(lambda v, j=j: sampler.output(model, v, j, cond), x_in, use_reentrant=False)
        else:
            out = sampler.output(model, x_in, j, cond)
        steps.append((j, x_in, out))
        x = sampler.x0(out, j, x_in) if refl_step is not None else advance(out, j, x_in)
    return x, steps
