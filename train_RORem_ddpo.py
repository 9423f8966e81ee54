#!/usr/bin/env python
"""Online RL for the RORem remover (DDPO, Black et al. 2023, image-conditioned): REINFORCE, PPO, GRPO or
pairwise preference (D3PO-style) on a LoRA, with the discriminator and other rewards; for the SDXL
inpainting UNet or a FLUX-Fill flow-matching model (chosen by --pretrained_model_name_or_path).

    accelerate launch --config_file configs/accelerate_8gpu.yaml train_RORem_ddpo.py --config configs/ddpo_config.yaml \
        --pretrained_unet path/to/RORem_unet --meta_path inputs/meta.json --discriminator_path path/to/disc \
        --reward discriminator=1,preserve=0.5 --algorithm ppo --output_dir experiment/RORem_DDPO

    accelerate launch ... train_RORem_ddpo.py --config configs/flow_grpo_config.yaml \
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-Fill-dev --meta_path inputs/meta.json \
        --discriminator_path path/to/disc --discriminator_base_model path/to/sdxl-inpainting --output_dir experiment/flow_GRPO

Each epoch: (1) sample --sample_batches_per_epoch batches of --sample_batch_size inputs per process
(GRPO, pairwise: each input --group_size times), recording latents and log-probs
(pipelines/rl_sampler.py): SDXL with stochastic DDIM (eta > 0); a flow model with the SDE that keeps
the ODE's marginals (--noise_level; pipelines/flow_inpaint.py), its last step deterministic and not
trained. The start is the source noised to --strength (pure noise at 1.0), so only int(steps *
strength) steps are denoised. Rewards are computed in a worker thread while the next batch samples.
(2) Advantages: per-input running statistics keyed by the content of (source, mask) (reinforce,
ppo), within each input's group across all processes (grpo), or +-1 labels of the two samples of a
pair, which share their start (pairwise). Clipped to +-adv_clip_max. (3) --num_inner_epochs passes
over the samples: for a random --timestep_fraction of the trainable steps of each trajectory,
re-evaluate the log-prob of the recorded step under the current LoRA and take the REINFORCE,
PPO-clipped or pairwise loss (+ --kl_coef x the per-step KL to the LoRA-off reference), accumulating
gradients over the steps. myutils/rl_utils.py has the math. Held-out evaluation every --eval_epochs:
the deterministic sampler (DDIM eta 0 / the flow ODE) from fixed noises on fixed inputs, each reward
component, the KL to the starting model along the way, and the stochastic sampler's reward; grids
of start vs current.
"""
import argparse
import concurrent.futures
import json
import math
import os

import numpy as np
import torch

from myutils import train_util as tu
from myutils.data import RemovalDataset
from myutils.errors import UserError, run_cli
from myutils.img_util import content_key, tensor_to_pil
from myutils.reward_utils import (gt_reward, jpeg_reward, load_reward_model, parse_reward_spec, preservation_reward)
from myutils.rl_utils import (PerInputStatTracker, clip_advantages, gaussian_kl, gaussian_log_prob, group_advantages, pair_preferences,
                              pairwise_preference_loss, ppo_loss, reinforce_loss)
from myutils.rng import sample_generators
from pipelines.flow_inpaint import FlowFillSampler, model_family
from pipelines.rl_sampler import SDXLInpaintSampler, sample_trajectory


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tu.add_common_args(parser, meta_kind="input")
    g = parser.add_argument_group("online RL")
    g.add_argument("--algorithm", choices=["reinforce", "ppo", "grpo", "pairwise"], default="ppo")
    g.add_argument("--reward", default="discriminator=1", help="name=weight,...: discriminator, preserve, gt, jpeg")
    g.add_argument("--discriminator_path", "--RORem_discriminator", default=None)
    g.add_argument("--discriminator_base_model", default=None,
                   help="the SDXL-inpainting model the discriminator was built on (default: --pretrained_model_name_or_path)")
    g.add_argument("--sample_steps", type=int, default=50, help="DDIM steps of the sampler")
    g.add_argument("--strength", type=float, default=1.0, help="start from the source noised to strength * T")
    g.add_argument("--eta", type=float, default=1.0, help="DDIM stochasticity (> 0: a log-prob exists)")
    g.add_argument("--noise_level", type=float, default=0.7, help="flow models: the SDE's noise level (> 0)")
    g.add_argument("--naive_sde", action="store_true", help="flow models: Euler step + noise instead of the SDE (changes marginals)")
    g.add_argument("--flow_guidance", type=float, default=30.0, help="flow models: the distilled guidance embedding (FLUX-Fill: 30)")
    g.add_argument("--max_sequence_length", type=int, default=512, help="flow models: T5 prompt length")
    g.add_argument("--beta", type=float, default=0.1, help="pairwise: scale of the log-ratio margin in -log sigmoid(beta * margin)")
    g.add_argument("--guidance_scale", type=float, default=1.0)
    g.add_argument("--negative_prompt", default="")
    g.add_argument("--sample_batch_size", type=int, default=8, help="inputs per sampling batch per process")
    g.add_argument("--sample_batches_per_epoch", type=int, default=4)
    g.add_argument("--group_size", type=int, default=1, help="samples per input in a batch (grpo: at least 2)")
    g.add_argument("--num_inner_epochs", type=int, default=1)
    g.add_argument("--timestep_fraction", type=float, default=1.0)
    g.add_argument("--clip_range", type=float, default=1e-4)
    g.add_argument("--adv_clip_max", type=float, default=5.0)
    g.add_argument("--kl_coef", type=float, default=0.0, help="penalty on the per-step KL to the reference (LoRA off)")
    g.add_argument("--stat_buffer_size", type=int, default=32)
    g.add_argument("--stat_min_count", type=int, default=16)
    g.add_argument("--eval_epochs", type=int, default=0, help="held-out evaluation every N epochs (0: only at start and end)")
    g.add_argument("--eval_samples", type=int, default=16)
    g.add_argument("--checkpointing_epochs", type=int, default=1)
    parser.set_defaults(use_lora=True, learning_rate=3e-4, train_batch_size=4, num_train_epochs=100, validation_steps=0,
                        checkpointing_steps=0)
    args = tu.parse_args(parser, argv)
    args.rewards = parse_reward_spec(args.reward)
    if not args.use_lora:
        raise UserError("train_RORem_ddpo.py trains a LoRA (the reference is the LoRA-off model): drop --no-use_lora")
    args.family = model_family(args.pretrained_model_name_or_path)
    if args.family == "sdxl" and args.eta <= 0:
        raise UserError("--eta must be > 0: a deterministic DDIM step has no variance, hence no log-prob to train")
    if args.family == "flow" and args.noise_level <= 0:
        raise UserError("--noise_level must be > 0: the flow ODE step has no variance, hence no log-prob to train")
    if args.family == "flow" and args.pretrained_unet:
        raise UserError("--pretrained_unet is for SDXL-inpainting models; a flow model's transformer comes from its own folder")
    if "discriminator" in args.rewards and not args.discriminator_path:
        raise UserError("--reward discriminator needs --discriminator_path")
    if args.algorithm == "grpo" and args.group_size < 2:
        raise UserError("--algorithm grpo compares samples of the same input: --group_size must be at least 2")
    if args.algorithm == "pairwise" and (args.group_size != 2 or args.train_batch_size % 2):
        raise UserError("--algorithm pairwise trains on pairs from the same start: --group_size must be 2 and --train_batch_size even")
    per_epoch = args.sample_batch_size * args.sample_batches_per_epoch * args.group_size
    if per_epoch % args.train_batch_size:
        raise UserError(f"--train_batch_size {args.train_batch_size} must divide the {per_epoch} samples per epoch per process "
                        "(sample_batch_size x sample_batches_per_epoch x group_size)")
    train_batches = args.num_inner_epochs * per_epoch // args.train_batch_size
    if train_batches % args.gradient_accumulation_steps:
        raise UserError(f"--gradient_accumulation_steps {args.gradient_accumulation_steps} must divide the {train_batches} training "
                        "batches of an epoch (num_inner_epochs x samples per epoch / train_batch_size): updates never span epochs")
    return args


def compute_rewards(args, reward_model, sampler, final_latents, batch):
    """{component: (B,) tensor} and the weighted total, for final latents of a batch (no paste-back:
    preservation judges the raw output outside the mask). The discriminator reads SDXL latents
    directly; a flow model's results are decoded and re-encoded by the discriminator's VAE."""
    out, pixels = {}, None
    if sampler.family != "sdxl" or any(n in args.rewards for n in ("preserve", "gt", "jpeg")):
        pixels = sampler.decode(final_latents)
    if "discriminator" in args.rewards:
        if sampler.family == "sdxl":
            scores = reward_model.score_latents(batch["source_latents"], batch["mask_latent"], final_latents, batch["original_size"],
                                                batch["crop_top_left"])
        else:
            scores = reward_model.score_pixels(batch["source"], batch["mask"], pixels, batch["original_size"], batch["crop_top_left"])
        out["discriminator"] = scores.float().cpu()
    if "preserve" in args.rewards:
        out["preserve"] = preservation_reward(pixels.cpu(), batch["source"].cpu(), batch["mask"].cpu())
    if "gt" in args.rewards:
        out["gt"] = gt_reward(pixels.cpu(), batch["GT"].cpu(), batch["mask"].cpu())
    if "jpeg" in args.rewards:
        out["jpeg"] = jpeg_reward(pixels.cpu())
    total = sum(w * out[n] for n, w in args.rewards.items())
    return out, total


def expand_batch(batch, sampler, group_size):
    """The batch repeated group_size times per input (sample j of input i is keyed i * K + j for
    its noise), with the sampler's conditioning."""
    b = {k: v.repeat_interleave(group_size, 0) if torch.is_tensor(v) else v for k, v in batch.items()}
    b["noise_index"] = (batch["index"].repeat_interleave(group_size) * group_size
                        + torch.arange(group_size, device=batch["index"].device).repeat(len(batch["index"])))
    return sampler.condition(b)


def load_sampler(args, accelerator, dtype):
    """The model family's sampler (SDXL: DDIM; FLUX-Fill: the flow SDE); sampler.model is the network to train."""
    if args.family == "flow":
        sampler = FlowFillSampler(args.pretrained_model_name_or_path, accelerator.device, dtype, args.sample_steps, args.strength,
                                  args.resolution, args.noise_level, args.naive_sde, args.prompt, args.flow_guidance,
                                  args.max_sequence_length, args.variant, args.revision)
        if args.gradient_checkpointing:
            sampler.model.enable_gradient_checkpointing()
        return sampler
    comps = tu.Components(args, accelerator, dtype, guidance_prompts=(args.prompt, args.negative_prompt))
    sampler = SDXLInpaintSampler(comps, args.sample_steps, args.strength, args.eta, args.resolution, args.guidance_scale)
    if len(sampler.timesteps) == 0:
        raise UserError(f"--strength {args.strength} with --sample_steps {args.sample_steps} denoises no step")
    return sampler


def content_ids(entries, indices, cache):
    """60-bit integer ids of the inputs' content (gatherable across processes), hashed once per input."""
    for i in indices.tolist():
        if i not in cache:
            cache[i] = int(content_key(entries[i].paths["source"], entries[i].paths["mask"])[:15], 16)
    return torch.tensor([cache[i] for i in indices.tolist()])


@torch.no_grad()
def evaluate(model, sampler, args, samples, reward_model):
    """Held-out evaluation on fixed inputs from fixed noises: the deterministic sampler (DDIM eta 0 /
    the flow ODE; eval_reward*, and the mean per-step KL between the stochastic policy and the
    start, LoRA off, along its path), and the stochastic sampler that training optimises (fixed
    per-sample seeds; eval_sde_reward*)."""
    device = sampler.vae.device
    b = expand_batch({k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(device) for k in samples[0]}, sampler, 1)
    x = sampler.start(b, sample_generators({"epoch": [10_000] * len(samples), "index": b["index"]}, args.seed, "cpu"))
    kls = []
    for j in range(len(sampler.timesteps)):
        if j < sampler.num_train_steps:
            mean, scale = sampler.distribution(model, x, j, b)
            with tu.adapters_disabled(model):
                ref_mean, _ = sampler.distribution(model, x, j, b)
            kls.append(gaussian_kl(mean, ref_mean, scale).mean().item())
        x = sampler.distribution(model, x, j, b, deterministic=True)[0]
    parts, total = compute_rewards(args, reward_model, sampler, x, b)
    metrics = {f"eval_reward_{k}": v.mean().item() for k, v in parts.items()}
    metrics.update(eval_reward=total.mean().item(), eval_kl_to_start=float(np.mean(kls)))
    gens = sample_generators({"epoch": [10_001] * len(samples), "index": b["index"]}, args.seed, "cpu")
    sde = sample_trajectory(sampler, model, b, gens)
    sde_parts, sde_total = compute_rewards(args, reward_model, sampler, sde["latents"][:, -1], b)
    metrics.update({f"eval_sde_reward_{k}": v.mean().item() for k, v in sde_parts.items()}, eval_sde_reward=sde_total.mean().item())
    per_sample = [{"reward": float(r), **{k: float(v[i]) for k, v in parts.items()}} for i, r in enumerate(total.tolist())]
    return metrics, sampler.decode(x).cpu(), per_sample


def main(argv=None):
    args = parse_args(argv)
    trainable_steps = int(args.sample_steps * args.strength) - (args.family == "flow")  # the flow sampler's last step is not trained
    train_timesteps = max(1, math.ceil(trainable_steps * args.timestep_fraction))
    user_accumulation = args.gradient_accumulation_steps
    args.gradient_accumulation_steps = user_accumulation * train_timesteps  # accumulate over the trained steps too
    accelerator = tu.make_accelerator(args)
    kind = "triplet" if "gt" in args.rewards else "input"
    entries, val_entries = tu.load_train_and_validation(args, kind, accelerator)
    dtype = tu.weight_dtype(accelerator)
    sampler = load_sampler(args, accelerator, dtype)
    unet = sampler.model
    tu.add_lora(unet, args, dtype)
    params = [p for p in unet.parameters() if p.requires_grad]
    reward_model = (load_reward_model(args.discriminator_base_model or args.pretrained_model_name_or_path, args.discriminator_path,
                                      args.resolution, accelerator.device, dtype, args.variant) if args.discriminator_path else None)

    dataset = RemovalDataset(entries, kind, args.resolution, center_crop=not args.random_crop, random_flip=args.random_flip,
                             seed=args.seed)
    loader = tu.make_dataloader(argparse.Namespace(**{**vars(args), "train_batch_size": args.sample_batch_size}), dataset, accelerator)
    samples_per_epoch = args.sample_batch_size * args.sample_batches_per_epoch * args.group_size
    steps_per_epoch = args.num_inner_epochs * (samples_per_epoch // args.train_batch_size) // user_accumulation
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch) if args.max_train_steps else args.num_train_epochs
    optimizer = tu.make_optimizer(args, params, accelerator)
    lr_scheduler = tu.make_lr_scheduler(args, optimizer, num_epochs * steps_per_epoch, accelerator)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    raw = accelerator.unwrap_model(unet)
    tracker = PerInputStatTracker(args.stat_buffer_size, args.stat_min_count)
    accelerator.register_for_checkpointing(tracker)
    save = lambda m, d: tu.save_unet(m, d, lora=True)  # noqa: E731
    tu.register_checkpoint_hooks(accelerator, save, lambda m, d: tu.load_unet_weights(m, d, lora=True))
    tu.init_trackers(accelerator, args, "train_RORem_ddpo")
    eval_samples = tu.validation_samples(args, val_entries, kind, args.eval_samples) if accelerator.is_main_process else []
    history, id_cache = {}, {}

    def run_eval(epoch, step):
        if not eval_samples:
            return
        raw.eval()
        metrics, images, per_sample = evaluate(raw, sampler, args, eval_samples, reward_model)
        raw.train()
        history.setdefault("start", metrics)
        history["final"] = metrics
        history.setdefault("evals", []).append({"epoch": epoch, "step": step, **metrics, "per_sample": per_sample})
        tu.log_validation(accelerator, {**metrics, "eval_epoch": epoch}, step)
        if "images" not in history:
            history["images"] = images
        n = args.num_validation_images
        source, mask = tu.input_rows(eval_samples[:n])
        path = tu.save_validation_grid(accelerator, args, [source, mask, [tensor_to_pil(x) for x in history["images"][:n]],
                                                           [tensor_to_pil(x) for x in images[:n]]], step)
        with open(path.replace(".png", ".json"), "w") as f:  # each column's rewards, start and current
            json.dump({"rows": ["source", "mask", "start", "current"], "start": history["evals"][0]["per_sample"][:n],
                       "current": per_sample[:n]}, f, indent=1)

    global_step = tu.resume(accelerator, args)
    first_epoch = global_step // steps_per_epoch
    stream = tu.epoch_batches(loader, first_epoch * args.sample_batches_per_epoch, 1, 10 ** 9)
    run = tu.TrainingRun(accelerator, args, None, num_epochs * steps_per_epoch, num_epochs, global_step)
    if first_epoch == 0:
        run_eval(0, 0)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # rewards overlap the next batch's sampling
    for epoch in range(first_epoch, num_epochs):
        # 1. sample trajectories with the current policy, no grad
        raw.eval()
        batches, futures = [], []
        for _ in range(args.sample_batches_per_epoch):
            _, batch = next(stream)
            b = expand_batch({k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}, sampler,
                             args.group_size)
            gens = sample_generators({"epoch": b["epoch"], "index": b["noise_index"]}, args.seed, "cpu")
            # pairwise: both samples of an input start from the same latents (own seed space), their steps differ
            starts = (sample_generators({"epoch": b["epoch"] + 2_000_000, "index": b["index"]}, args.seed, "cpu")
                      if args.algorithm == "pairwise" else None)
            b.update(sample_trajectory(sampler, raw, b, gens, start_generators=starts))
            futures.append(pool.submit(compute_rewards, args, reward_model, sampler, b["latents"][:, -1], b))
            batches.append(b)
        parts = [f.result() for f in futures]
        rewards = torch.cat([total for _, total in parts])
        components = {k: torch.cat([p[k] for p, _ in parts]) for k in parts[0][0]}

        # 2. advantages over what every process sampled
        ids = torch.cat([content_ids(entries, b["index"].cpu(), id_cache) for b in batches])
        all_rewards = accelerator.gather(rewards.to(accelerator.device)).cpu().numpy()
        all_ids = accelerator.gather(ids.to(accelerator.device)).cpu().tolist()
        if args.algorithm == "grpo":
            adv = group_advantages(all_rewards, all_ids)
        elif args.algorithm == "pairwise":
            adv = pair_preferences(all_rewards)
        else:
            adv = tracker.update(all_ids, all_rewards)
        adv = clip_advantages(adv, args.adv_clip_max)
        mine = slice(accelerator.process_index * len(rewards), (accelerator.process_index + 1) * len(rewards))
        advantages = torch.tensor(adv[mine], dtype=torch.float32, device=accelerator.device)
        logs = {"reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std()), "epoch": epoch}
        for k, v in components.items():
            all_v = accelerator.gather(v.to(accelerator.device))
            logs[f"reward_{k}_mean"], logs[f"reward_{k}_std"] = all_v.mean().item(), all_v.std(unbiased=False).item()
            tu.log_histogram(accelerator, f"reward_{k}", all_v, run.global_step + 1)

        # 3. train on random subsets of each trajectory's trainable steps
        data = {k: torch.cat([b[k] for b in batches]) for k in batches[0] if torch.is_tensor(batches[0][k])}
        raw.train()
        for inner in range(args.num_inner_epochs):
            g = torch.Generator().manual_seed(args.seed * 7919 + epoch * 101 + inner)
            if args.algorithm == "pairwise":  # shuffle pairs, keep each pair's two samples next to each other
                order = (2 * torch.randperm(len(advantages) // 2, generator=g)[:, None] + torch.arange(2)).reshape(-1)
            else:
                order = torch.randperm(len(advantages), generator=g)
            for start in range(0, len(order), args.train_batch_size):
                idx = order[start:start + args.train_batch_size].to(accelerator.device)
                steps = torch.randperm(sampler.num_train_steps, generator=g)[:train_timesteps]
                cond = {k: v[idx] for k, v in data.items()}
                metrics = {}
                for j in steps.tolist():
                    with accelerator.accumulate(unet):
                        x = cond["latents"][:, j]
                        mean, scale = sampler.distribution(unet, x, j, cond)
                        log_prob = gaussian_log_prob(cond["latents"][:, j + 1], mean, scale)
                        if args.algorithm == "reinforce":
                            loss = reinforce_loss(log_prob, advantages[idx])
                        elif args.algorithm == "pairwise":
                            loss = pairwise_preference_loss(log_prob, cond["log_probs"][:, j], advantages[idx], args.beta, args.clip_range)
                        else:
                            loss, approx_kl, clip_fraction = ppo_loss(log_prob, cond["log_probs"][:, j], advantages[idx], args.clip_range)
                            metrics.update(approx_kl=approx_kl.item(), clip_fraction=clip_fraction.item())
                        if args.kl_coef > 0:
                            with torch.no_grad(), tu.adapters_disabled(raw):
                                ref_mean, _ = sampler.distribution(raw, x, j, cond)
                            kl = gaussian_kl(mean, ref_mean, scale).mean()
                            loss = loss + args.kl_coef * kl
                            metrics["kl_to_reference"] = kl.item()
                        if run.loss_is_finite(loss):
                            accelerator.backward(loss)
                        run.optimizer_step(optimizer, lr_scheduler, params)
                    run.end_of_step(**metrics, **logs)
        # 4. checkpoint and evaluate at epoch ends
        if args.checkpointing_epochs and (epoch + 1) % args.checkpointing_epochs == 0:
            tu.save_checkpoint(accelerator, args, run.global_step)
        if (args.eval_epochs and (epoch + 1) % args.eval_epochs == 0) or epoch + 1 == num_epochs:
            run_eval(epoch + 1, run.global_step)
    pool.shutdown()
    run.finish()
    final = None
    if accelerator.is_main_process and "start" in history:
        final = {**{f"start_{k}": v for k, v in history["start"].items()}, **history["final"]}
        with open(os.path.join(args.output_dir, "reward_history.json"), "w") as f:
            json.dump({k: v for k, v in history.items() if k != "images"}, f, indent=1)
    tu.save_final(accelerator, args, unet, save, metrics=final)
    return final


if __name__ == "__main__":
    run_cli(main)
