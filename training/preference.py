"""What the preference scripts (train_RORem_dpo.py, train_RORem_kto.py) share: the reference policy
(the LoRA model with its adapters off, or a frozen copy), the stacked input of a preference pair, and
the held-out preference accuracy both report, so the two compare in one table."""
import contextlib
import copy

import torch

from myutils.data import stack_samples, to_device
from myutils.dpo_utils import per_sample_error
from myutils.rng import randint_per_sample, randn_per_sample, sample_generators
from myutils.sdxl_inpaint import batch_latent_params, sample_latents, unet_input

from . import adapters


def pair_inputs(comps, batch, resolution, seed, timestep=None):
    """The stacked [preferred..., rejected...] UNet input, timesteps, target and conditioning, with
    the same noise and timestep for both halves of each pair (a fixed `timestep` for evaluation)."""
    sched, vae = comps.noise_scheduler, comps.vae
    if "params:masked" not in batch:
        batch = {**batch, **batch_latent_params(vae, batch, ["preferred", "rejected", "masked"])}
    gens = sample_generators(batch, seed)
    lat_w = sample_latents(batch["params:preferred"], vae.config, gens)
    lat_l = sample_latents(batch["params:rejected"], vae.config, gens)
    masked = sample_latents(batch["params:masked"], vae.config, gens)
    noise = randn_per_sample(gens, lat_w.shape[1:], lat_w.device)
    t = randint_per_sample(gens, sched.config.num_train_timesteps, lat_w.device)
    if timestep is not None:
        t = torch.full_like(t, timestep)
    latents, noise, t = torch.cat([lat_w, lat_l]), torch.cat([noise, noise]), torch.cat([t, t])
    x = unet_input(sched.add_noise(latents, noise, t), batch["mask_latent"].repeat(2, 1, 1, 1), masked.repeat(2, 1, 1, 1))
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    kw = comps.condition.unet_kwargs(batch["original_size"].repeat(2, 1), batch["crop_top_left"].repeat(2, 1), (resolution, resolution))
    return x.to(comps.condition.prompt_embeds.dtype), t, target, kw


@contextlib.contextmanager
def reference_model(unet, ref_unet):
    """The reference policy: the frozen copy, or the LoRA model with its adapters switched off."""
    if ref_unet is not None:
        yield ref_unet
    else:
        with adapters.disabled(unet):
            yield unet


@torch.no_grad()
def reference_prediction(unet, ref_unet, x, t, kw):
    with reference_model(unet, ref_unet) as ref:
        return ref(x, t, **kw).sample


EVAL_SEEDS, EVAL_TIMESTEPS = (0, 1), (100, 300, 500, 700, 900)


@torch.no_grad()
def preference_accuracy(unet, ref_unet, comps, samples, resolution, chunk=8):
    """Held-out preference accuracy: per pair, the DPO margin -((err_w - err_l) - (ref_err_w - ref_err_l))
    averaged over fixed noises and timesteps; the fraction of pairs where it is positive (ties half).
    0.5 when the policy equals the reference. `chunk` pairs at a time, each image encoded once."""
    margin = []
    for i in range(0, len(samples), chunk):
        batch = to_device(stack_samples(samples[i:i + chunk], ("source", "mask", "preferred", "rejected", "original_size",
                                                              "crop_top_left", "index", "epoch")), comps.vae.device)
        batch.update(batch_latent_params(comps.vae, batch, ["preferred", "rejected", "masked"]))  # once, for every noise
        m = torch.zeros(len(batch["index"]), device=comps.vae.device)  # summed on the device, read once per chunk
        for seed in EVAL_SEEDS:
            for timestep in EVAL_TIMESTEPS:
                x, t, target, kw = pair_inputs(comps, batch, resolution, seed, timestep)
                err = per_sample_error(unet(x, t, **kw).sample, target)
                ref = per_sample_error(reference_prediction(unet, ref_unet, x, t, kw), target)
                (w, l_), (rw, rl) = err.chunk(2), ref.chunk(2)
                m += -((w - l_) - (rw - rl))
        margin.append(m.cpu())
    margin = torch.cat(margin)
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item()


def validate_against_reference(accelerator, args, comps, unet, ref_unet, samples, reward, cache, step):
    """DPO's and KTO's validation: held-out preference accuracy, then policy and reference results
    with the same seeds (masked MSE against the preferred image, the discriminator's win rate when
    there is one, a grid of source, mask, reference, policy, preferred). `cache` keeps the reference's
    results and scores, the same at every validation. None without held-out samples."""
    from . import validation

    if not samples:
        return None
    model = accelerator.unwrap_model(unet)
    model.eval()
    metrics = {"val_preference_accuracy": preference_accuracy(model, ref_unet, comps, samples, args.resolution,
                                                              args.validation_batch_size)}
    results = validation.sample_validation(accelerator, args, comps, model, samples)

    def reference_results():
        with reference_model(model, ref_unet) as ref:
            return validation.sample_validation(accelerator, args, comps, ref, samples)

    metrics.update(validation.compare_with_reference(accelerator, args, samples, results, reference_results, step, "preferred",
                                                     reward, cache, mse_key="preferred"))
    model.train()
    validation.log_validation(accelerator, metrics, step)
    return metrics


def policy_and_reference(unet, args, dtype, device):
    """The trainable policy and the reference: with --use_lora, LoRA adapters on the UNet and no
    second UNet (the reference is the same UNet with its adapters off: reference None); for a full
    fine-tune, a frozen copy in the compute dtype. Returns (reference or None, trainable params)."""
    ref_unet = None
    if args.use_lora:
        adapters.add_lora(unet, args, dtype)
    else:
        ref_unet = copy.deepcopy(unet).requires_grad_(False).to(device, dtype).eval()
        unet.requires_grad_(True)
    unet.train()
    return ref_unet, [p for p in unet.parameters() if p.requires_grad]
