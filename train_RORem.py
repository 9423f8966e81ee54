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

from myutils.args import FRACTION
from myutils.errors import UserError, run_cli
from myutils.models import load_unet_weights, save_unet
from myutils.sdxl_inpaint import noised_inputs
from training import adapters, checkpoint, config, loop, prepare, validation


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config.add_common_args(parser, meta_kind="triplet")
    g = parser.add_argument_group("remover")
    g.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=False, help="keep an EMA of the UNet weights (full fine-tune only)")
    g.add_argument("--ema_decay", type=FRACTION, default=0.9999)
    args = config.parse_args(parser, argv)
    if args.use_ema and args.use_lora:
        raise UserError("--use_ema applies to full fine-tuning; drop it or --use_lora")
    return args


def diffusion_loss(unet, comps, batch, resolution, seed):
    """Noise the target latents, predict from the 9-channel input, MSE against noise or velocity."""
    x, t, target, kw = noised_inputs(comps.noise_scheduler, comps.vae, comps.condition, batch, resolution, seed)
    return F.mse_loss(unet(x, t, **kw).sample.float(), target.float())


def main(argv=None):
    args = parse_args(argv)
    accelerator = prepare.make_accelerator(args)
    entries, val_entries = prepare.load_train_and_validation(args, "triplet", accelerator)
    dtype = prepare.weight_dtype(accelerator)
    comps = prepare.Components(args, accelerator, dtype)
    unet = comps.unet
    if args.use_lora:
        adapters.add_lora(unet, args, dtype)
    else:
        unet.requires_grad_(True)
    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unet.parameters(), decay=args.ema_decay)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]  # a list: clipping must see every param

    dataset = prepare.make_train_dataset(args, entries, "triplet", accelerator, comps.vae, cache_keys=("GT", "masked"))
    unet, optimizer, lr_scheduler, loader, max_steps, num_epochs = prepare.for_training(args, accelerator, unet, params, dataset)
    if ema is not None:
        ema.to(accelerator.device)
    checkpoint.register_hooks(accelerator, lambda m, d: save_unet(m, d, args.use_lora),
                                 lambda m, d: load_unet_weights(m, d, args.use_lora), ema)
    prepare.init_trackers(accelerator, args, "train_RORem")
    val_samples = validation.validation_samples(args, val_entries) if args.validation_steps else []

    global_step = checkpoint.resume(accelerator, args, "train_RORem.py", "remover")
    prepare.logger.info("%d samples, %d steps, batch %d x %d processes x %d accumulation", len(dataset), max_steps,
                   args.train_batch_size, accelerator.num_processes, args.gradient_accumulation_steps)
    run = loop.TrainingRun(accelerator, args, loader, max_steps, num_epochs, global_step)
    for batch in run.batches():
        with accelerator.accumulate(unet):
            loss = diffusion_loss(unet, comps, batch, args.resolution, args.seed)
            if run.record_loss(loss):
                accelerator.backward(loss)
            run.optimizer_step(optimizer, lr_scheduler, params, ema)
        if not run.end_of_step():
            continue
        if args.validation_steps and run.global_step % args.validation_steps == 0:
            validation.run_validation(accelerator, args, comps, unet, val_samples, run.global_step)
    run.finish()
    if args.validation_steps and run.global_step % args.validation_steps:
        validation.run_validation(accelerator, args, comps, unet, val_samples, run.global_step)
    checkpoint.save_final(accelerator, args, unet, lambda m, d: save_unet(m, d, args.use_lora), ema)
    return args.output_dir


if __name__ == "__main__":
    run_cli(main)
