#!/usr/bin/env python
"""Train the RORem discriminator (the reward model) on scored triplets.

    accelerate launch --multi_gpu --num_processes 8 train_RORem_discriminator.py \
        --config configs/train_RORem_discriminator.yaml --meta_path scored/meta.json --output_dir experiment/disc

Entries are {"source", "mask", "GT": the edited result, "score": 0/1 or in [0, 1]}. The model is the
SDXL-inpainting UNet's encoder half with RORem's head (model/unet_sdxl_discriminator.py); its input is
cat([edited latents, mask, UNMASKED source latents]) at t = 0 with the empty prompt. Trainable: the
head + a rank --rank LoRA (default, as RORem), or everything with --train_full. Loss: MSE of the
softplus score against the label (RORem), or --loss bce on the logit (the score is then a sigmoid).
A held-out split reports accuracy at 0.5 and ROC AUC. Output: RORem's layout,
pytorch_lora_weights.safetensors (or discriminator.safetensors) + cls_pred_branch.pt.
"""
import argparse
import random

import numpy as np
import torch
import torch.nn.functional as F

from model.unet_sdxl_discriminator import UNetSDXLDiscriminator
from myutils.args import POSITIVE, SCORE, real
from myutils.data import RemovalDataset, stack_samples, to_device
from myutils.discriminator_files import add_discriminator_lora, load_discriminator_weights, save_discriminator
from myutils.errors import run_cli
from myutils.metrics import accuracy_at, roc_auc
from myutils.rng import sample_generators
from myutils.sdxl_inpaint import batch_latent_params, posterior_mean_latents, sample_latents, unet_input
from training import checkpoint, config, loop, prepare


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config.add_common_args(parser, meta_kind="scored", lora=False)
    g = parser.add_argument_group("discriminator")
    g.add_argument("--rank", type=POSITIVE, default=4, help="LoRA rank on to_q, to_k, to_v, to_out.0")
    g.add_argument("--train_full", action=argparse.BooleanOptionalAction, default=False, help="train the whole encoder and head instead of LoRA + head")
    g.add_argument("--loss", choices=["mse", "bce"], default="mse", help="mse on softplus scores (RORem) or bce on logits")
    g.add_argument("--val_meta_path", nargs="+", default=None, help="held-out scored entries")
    g.add_argument("--val_fraction", type=real(minimum=0, below=1), default=0.1, help="without --val_meta_path: share of sources held out")
    g.add_argument("--threshold", type=SCORE, default=0.5, help="score threshold for the accuracy")
    args = config.parse_args(parser, argv)
    return args


def split_by_source(entries, fraction, seed):
    """Hold out a fraction of the distinct source images (with all their results), so no input is
    seen in training and evaluation both."""
    sources = sorted({e.paths["source"] for e in entries})
    random.Random(seed).shuffle(sources)
    held = set(sources[:round(len(sources) * fraction)])
    return [e for e in entries if e.paths["source"] not in held], [e for e in entries if e.paths["source"] in held]


def describe(name, entries):
    pos = sum(e.score >= 0.5 for e in entries)
    return f"{name}: {len(entries)} samples, {pos} positive ({pos / max(1, len(entries)):.0%}), {len(entries) - pos} negative"


def discriminator_input(comps, batch, resolution, generators=None):
    """(9-channel input, conditioning) from a batch: posterior samples when training (generators),
    posterior means when evaluating."""
    if "params:source" not in batch:
        batch = {**batch, **batch_latent_params(comps.vae, batch, ["GT", "source"])}
    latents = {k: (sample_latents(batch[f"params:{k}"], comps.vae.config, generators) if generators
                   else posterior_mean_latents(batch[f"params:{k}"], comps.vae.config)) for k in ("GT", "source")}
    x = unet_input(latents["GT"], batch["mask_latent"], latents["source"]).to(comps.condition.prompt_embeds.dtype)
    kw = comps.condition.unet_kwargs(batch["original_size"], batch["crop_top_left"], (resolution, resolution))
    return x, kw


def build_discriminator(args, comps, dtype):
    """The discriminator on comps.unet's encoder half (the up path is released), built where the UNet
    was loaded: the whole model trainable (--train_full), or RORem's LoRA + head in fp32 over a frozen
    base in the compute dtype."""
    disc = UNetSDXLDiscriminator.from_unet(comps.unet, "sigmoid" if args.loss == "bce" else "softplus")
    comps.unet = None
    if args.train_full:
        disc.requires_grad_(True)
    else:
        disc.requires_grad_(False)
        disc.to(dtype=dtype)  # before the LoRA exists: a cast now cannot touch adapter weights
        add_discriminator_lora(disc, args.rank)
        disc.cls_pred_branch.requires_grad_(True)
        for p in disc.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable weights in fp32
    return disc


def discriminator_loss(disc, comps, batch, args):
    x, kw = discriminator_input(comps, batch, args.resolution, sample_generators(batch, args.seed))
    logits = disc(x, 0, kw["encoder_hidden_states"], kw["added_cond_kwargs"], return_logits=True)
    if args.loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, batch["score"].float())
    return F.mse_loss(F.softplus(logits), batch["score"].float())


@torch.no_grad()
def evaluate(disc, comps, dataset, args, device):
    """Scores of every held-out sample: accuracy at --threshold and ROC AUC."""
    disc.eval()
    scores, labels = [], []
    for start in range(0, len(dataset), args.train_batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + args.train_batch_size))]
        batch = to_device(stack_samples(items), device)
        x, kw = discriminator_input(comps, batch, args.resolution)
        scores.append(disc(x, 0, kw["encoder_hidden_states"], kw["added_cond_kwargs"]).float().cpu())
        labels.append(batch["score"].float().cpu())
    disc.train()
    s, y = torch.cat(scores).numpy(), torch.cat(labels).numpy()
    return {"val_accuracy": accuracy_at(s, y, args.threshold), "val_auc": roc_auc(s, y),
            "val_score_pos": float(np.mean(s[y >= 0.5])) if (y >= 0.5).any() else None,
            "val_score_neg": float(np.mean(s[y < 0.5])) if (y < 0.5).any() else None}


def main(argv=None):
    args = parse_args(argv)
    accelerator = prepare.make_accelerator(args)
    entries = prepare.load_entries(args.meta_path, "scored", accelerator, check=not args.skip_data_check, output_dir=args.output_dir)
    if args.val_meta_path:
        val_entries = prepare.load_entries(args.val_meta_path, "scored", accelerator, what="--val_meta_path", output_dir=args.output_dir)
    else:
        entries, val_entries = split_by_source(entries, args.val_fraction, args.seed)
    prepare.logger.info(describe("train", entries))
    prepare.logger.info(describe("held out", val_entries))
    dtype = prepare.weight_dtype(accelerator)
    comps = prepare.Components(args, accelerator, dtype)
    disc = build_discriminator(args, comps, dtype).to(accelerator.device).train()
    params = [p for p in disc.parameters() if p.requires_grad]

    dataset = prepare.make_train_dataset(args, entries, "scored", accelerator, comps.vae, cache_keys=("GT", "source"))
    val_dataset = RemovalDataset(val_entries, "scored", args.resolution)
    disc, optimizer, lr_scheduler, loader, max_steps, num_epochs = prepare.for_training(args, accelerator, disc, params, dataset)
    save = lambda m, d: save_discriminator(m, d, lora=not args.train_full)  # noqa: E731
    checkpoint.register_hooks(accelerator, save, load_discriminator_weights)
    prepare.init_trackers(accelerator, args, "train_RORem_discriminator")

    last = {}

    def validate(step):
        if step in last:
            return last[step]
        if accelerator.is_main_process and len(val_dataset):
            metrics = evaluate(accelerator.unwrap_model(disc), comps, val_dataset, args, accelerator.device)
            accelerator.log({k: v for k, v in metrics.items() if v is not None}, step=step)
            prepare.logger.info("step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if v is not None))
            last[step] = metrics
            return metrics

    global_step = checkpoint.resume(accelerator, args, "train_RORem_discriminator.py", "discriminator")
    initial = validate(global_step) if global_step == 0 else None  # the untrained baseline
    run = loop.TrainingRun(accelerator, args, loader, max_steps, num_epochs, global_step)
    for batch in run.batches():
        with accelerator.accumulate(disc):
            loss = discriminator_loss(disc, comps, batch, args)
            if run.record_loss(loss):
                accelerator.backward(loss)
            run.optimizer_step(optimizer, lr_scheduler, params)
        if run.end_of_step() and args.validation_steps and run.global_step % args.validation_steps == 0:
            validate(run.global_step)
    run.finish()
    final = validate(run.global_step)
    checkpoint.save_final(accelerator, args, disc, save)
    return {"initial": initial, "final": final}


if __name__ == "__main__":
    run_cli(main)
