#!/usr/bin/env python
"""Supervised RORem remover: fine-tune an SDXL-inpainting UNet on (source, mask, GT) triplets.

    accelerate launch --multi_gpu --num_processes 8 train_RORem.py --config configs/train_RORem.yaml \
        --meta_path data/meta.json --output_dir experiment/RORem

Per step: encode GT and the masked source with the VAE (or read them from --cache_latents), noise
the GT latents at a random timestep, predict the noise (or v) from the 9-channel input, MSE.
Output: <output_dir>/unet (diffusers folder) or <output_dir>/pytorch_lora_weights.safetensors.
"""
import argparse

import torch.nn.functional as F

from myutils import train_util as tu
from myutils.args import FRACTION
from myutils.errors import UserError, run_cli
from myutils.rng import randint_per_sample, randn_per_sample, sample_generators
from myutils.sdxl_inpaint import batch_latent_params, sample_latents, unet_input


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tu.add_common_args(parser, meta_kind="triplet")
    g = parser.add_argument_group("remover")
    g.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=False, help="keep an EMA of the UNet weights (full fine-tune only)")
    g.add_argument("--ema_decay", type=FRACTION, default=0.9999)
    args = tu.parse_args(parser, argv)
    if args.use_ema and args.use_lora:
        raise UserError("--use_ema applies to full fine-tuning; drop it or --use_lora")
    return args


def diffusion_loss(unet, comps, batch, resolution, seed):
    """Noise the target latents, predict from the 9-channel input, MSE against noise or velocity."""
    sched, vae = comps.noise_scheduler, comps.vae
    if "params:masked" not in batch:  # pixels: encode now (with --cache_latents they come from disk)
        batch = {**batch, **batch_latent_params(vae, batch, ["GT", "masked"])}
    gens = sample_generators(batch, seed)  # per-sample: same on any number of ranks
    latents = sample_latents(batch["params:GT"], vae.config, gens)
    masked_latents = sample_latents(batch["params:masked"], vae.config, gens)
    noise = randn_per_sample(gens, latents.shape[1:], latents.device)
    t = randint_per_sample(gens, sched.config.num_train_timesteps, latents.device)
    noisy = sched.add_noise(latents, noise, t)
    dtype = comps.condition.prompt_embeds.dtype
    pred = unet(unet_input(noisy, batch["mask_latent"], masked_latents).to(dtype), t,
                **comps.condition.unet_kwargs(batch["original_size"], batch["crop_top_left"], (resolution, resolution))).sample
    if sched.config.prediction_type == "epsilon":
        target = noise
    elif sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, t)
    else:
        raise UserError(f"prediction type {sched.config.prediction_type!r} is not supported (epsilon or v_prediction)")
    return F.mse_loss(pred.float(), target.float())


def main(argv=None):
    args = parse_args(argv)
    accelerator = tu.make_accelerator(args)
    entries, val_entries = tu.load_train_and_validation(args, "triplet", accelerator)
    dtype = tu.weight_dtype(accelerator)
    comps = tu.Components(args, accelerator, dtype)
    unet = comps.unet
    if args.use_lora:
        tu.add_lora(unet, args, dtype)
    else:
        unet.requires_grad_(True)
    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unet.parameters(), decay=args.ema_decay)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]  # a list: clipping must see every param

    dataset = tu.make_train_dataset(args, entries, "triplet", accelerator, comps.vae, cache_keys=("GT", "masked"))
    unet, optimizer, lr_scheduler, loader, max_steps, num_epochs = tu.prepare_training(args, accelerator, unet, params, dataset)
    if ema is not None:
        ema.to(accelerator.device)
    tu.register_checkpoint_hooks(accelerator, lambda m, d: tu.save_unet(m, d, args.use_lora),
                                 lambda m, d: tu.load_unet_weights(m, d, args.use_lora), ema)
    tu.init_trackers(accelerator, args, "train_RORem")
    val_samples = tu.validation_samples(args, val_entries) if args.validation_steps else []

    global_step = tu.resume(accelerator, args)
    tu.logger.info("%d samples, %d steps, batch %d x %d processes x %d accumulation", len(dataset), max_steps,
                   args.train_batch_size, accelerator.num_processes, args.gradient_accumulation_steps)
    run = tu.TrainingRun(accelerator, args, loader, max_steps, num_epochs, global_step)
    for batch in run.batches():
        with accelerator.accumulate(unet):
            loss = diffusion_loss(unet, comps, batch, args.resolution, args.seed)
            if run.loss_is_finite(loss):
                accelerator.backward(loss)
            run.optimizer_step(optimizer, lr_scheduler, params, ema)
        if not run.end_of_step():
            continue
        if args.validation_steps and run.global_step % args.validation_steps == 0:
            tu.run_validation(accelerator, args, comps, unet, val_samples, run.global_step)
    run.finish()
    if args.validation_steps and run.global_step % args.validation_steps:
        tu.run_validation(accelerator, args, comps, unet, val_samples, run.global_step)
    tu.save_final(accelerator, args, unet, lambda m, d: tu.save_unet(m, d, args.use_lora), ema)
    return args.output_dir


if __name__ == "__main__":
    run_cli(main)
