#!/usr/bin/env python
"""Online RL for the RORem remover (DDPO, Black et al. 2023, image-conditioned): REINFORCE, PPO or GRPO
on a LoRA, with the discriminator and other rewards.

    accelerate launch --config_file configs/accelerate_8gpu.yaml train_RORem_ddpo.py --config configs/ddpo_config.yaml \
        --pretrained_unet path/to/RORem_unet --meta_path inputs/meta.json --discriminator_path path/to/disc \
        --reward discriminator=1,preserve=0.5 --algorithm ppo --output_dir experiment/RORem_DDPO

Each epoch: (1) sample --sample_batches_per_epoch batches of --sample_batch_size inputs per process
(GRPO: each input --group_size times) with stochastic DDIM (eta > 0), recording latents and
log-probs (pipelines/rl_sampler.py); the start is the source noised to --strength * T (pure noise at
1.0), so only int(steps * strength) steps are denoised and trained. Rewards are computed in a
worker thread while the next batch samples. (2) Advantages: per-input running statistics keyed by
the content of (source, mask) (reinforce, ppo) or within each input's group across all processes
(grpo), clipped to +-adv_clip_max. (3) --num_inner_epochs passes over the samples: for a random
--timestep_fraction of the steps of each trajectory, re-evaluate the log-prob of the recorded step
under the current LoRA and take the REINFORCE or PPO-clipped loss (+ --kl_coef x the per-step KL to
the LoRA-off reference), accumulating gradients over the steps. myutils/rl_utils.py has the math.
Held-out evaluation every --eval_epochs: deterministic DDIM from fixed noises on fixed inputs, each
reward component, and the KL to the starting model along the way; grids of start vs current.
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
from myutils.rl_utils import (PerInputStatTracker, clip_advantages, ddim_step_mean_std, gaussian_kl, gaussian_log_prob,
                              group_advantages, ppo_loss, reinforce_loss)
from myutils.rng import sample_generators
from myutils.sdxl_inpaint import batch_latent_params, decode_latents, posterior_mean_latents
from pipelines.rl_sampler import denoising_timesteps, predict, rl_scheduler, sample_with_logprob


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tu.add_common_args(parser, meta_kind="input")
    g = parser.add_argument_group("online RL")
    g.add_argument("--algorithm", choices=["reinforce", "ppo", "grpo"], default="ppo")
    g.add_argument("--reward", default="discriminator=1", help="name=weight,...: discriminator, preserve, gt, jpeg")
    g.add_argument("--discriminator_path", "--RORem_discriminator", default=None)
    g.add_argument("--sample_steps", type=int, default=50, help="DDIM steps of the sampler")
    g.add_argument("--strength", type=float, default=1.0, help="start from the source noised to strength * T")
    g.add_argument("--eta", type=float, default=1.0, help="DDIM stochasticity (> 0: a log-prob exists)")
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
    if args.eta <= 0:
        raise UserError("--eta must be > 0: a deterministic DDIM step has no variance, hence no log-prob to train")
    if "discriminator" in args.rewards and not args.discriminator_path:
        raise UserError("--reward discriminator needs --discriminator_path")
    if args.algorithm == "grpo" and args.group_size < 2:
        raise UserError("--algorithm grpo compares samples of the same input: --group_size must be at least 2")
    per_epoch = args.sample_batch_size * args.sample_batches_per_epoch * args.group_size
    if per_epoch % args.train_batch_size:
        raise UserError(f"--train_batch_size {args.train_batch_size} must divide the {per_epoch} samples per epoch per process "
                        "(sample_batch_size x sample_batches_per_epoch x group_size)")
    train_batches = args.num_inner_epochs * per_epoch // args.train_batch_size
    if train_batches % args.gradient_accumulation_steps:
        raise UserError(f"--gradient_accumulation_steps {args.gradient_accumulation_steps} must divide the {train_batches} training "
                        "batches of an epoch (num_inner_epochs x samples per epoch / train_batch_size): updates never span epochs")
    return args


def compute_rewards(args, reward_model, vae, final_latents, batch):
    """{component: (B,) tensor} and the weighted total, for final latents of a batch (no paste-back:
    preservation judges the raw output outside the mask)."""
    out = {}
    if "discriminator" in args.rewards:
        out["discriminator"] = reward_model.score_latents(batch["source_latents"], batch["mask_latent"], final_latents,
                                                          batch["original_size"], batch["crop_top_left"]).float().cpu()
    if any(n in args.rewards for n in ("preserve", "gt", "jpeg")):
        pixels = decode_latents(vae, final_latents).cpu()
        if "preserve" in args.rewards:
            out["preserve"] = preservation_reward(pixels, batch["source"].cpu(), batch["mask"].cpu())
        if "gt" in args.rewards:
            out["gt"] = gt_reward(pixels, batch["GT"].cpu(), batch["mask"].cpu())
        if "jpeg" in args.rewards:
            out["jpeg"] = jpeg_reward(pixels)
    total = sum(w * out[n] for n, w in args.rewards.items())
    return out, total


def expand_batch(batch, comps, args, group_size):
    """The batch repeated group_size times per input (sample j of input i is keyed i * K + j for
    its noise), with the conditioning latents and the content keys of the inputs."""
    b = {k: v.repeat_interleave(group_size, 0) if torch.is_tensor(v) else v for k, v in batch.items()}
    b["noise_index"] = (batch["index"].repeat_interleave(group_size) * group_size
                        + torch.arange(group_size, device=batch["index"].device).repeat(len(batch["index"])))
    params = batch_latent_params(comps.vae, b, ["masked", "source"])
    b["masked_latents"] = posterior_mean_latents(params["params:masked"], comps.vae.config)
    b["source_latents"] = posterior_mean_latents(params["params:source"], comps.vae.config)
    b["mask_latent"] = params["mask_latent"]
    return b


def content_ids(entries, indices, cache):
    """60-bit integer ids of the inputs' content (gatherable across processes), hashed once per input."""
    for i in indices.tolist():
        if i not in cache:
            cache[i] = int(content_key(entries[i].paths["source"], entries[i].paths["mask"])[:15], 16)
    return torch.tensor([cache[i] for i in indices.tolist()])


@torch.no_grad()
def evaluate(unet, comps, args, samples, sched, reward_model):
    """Held-out evaluation on fixed inputs from fixed noises: the deterministic DDIM sampler (eta 0;
    eval_reward*, and the mean per-step KL at --eta between the policy and the start, LoRA off, along
    its path), and the stochastic sampler that training optimises (eta = --eta, fixed per-sample
    seeds; eval_sde_reward*)."""
    b = expand_batch({k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(comps.vae.device) for k in samples[0]}, comps, args, 1)
    kw = comps.condition.unet_kwargs(b["original_size"], b["crop_top_left"], (args.resolution, args.resolution))
    gens = sample_generators({"epoch": [10_000] * len(samples), "index": b["index"]}, args.seed, "cpu")
    latents = torch.stack([torch.randn(b["source_latents"].shape[1:], generator=g) for g in gens]).to(b["source_latents"].device)
    timesteps = denoising_timesteps(sched, args.strength)
    if args.strength < 1:
        latents = sched.add_noise(b["source_latents"].float(), latents, timesteps[:1].repeat(len(latents)))
    kls = []
    for t in timesteps:
        out = predict(unet, latents, t, b["mask_latent"], b["masked_latents"], kw)
        with tu.adapters_disabled(unet):
            ref = predict(unet, latents, t, b["mask_latent"], b["masked_latents"], kw)
        mean, std = ddim_step_mean_std(sched, out, t, latents, args.eta)
        ref_mean, _ = ddim_step_mean_std(sched, ref, t, latents, args.eta)
        kls.append(gaussian_kl(mean, ref_mean, std).mean().item())
        latents = sched.step(out, t, latents, eta=0.0).prev_sample
    parts, total = compute_rewards(args, reward_model, comps.vae, latents, b)
    metrics = {f"eval_reward_{k}": v.mean().item() for k, v in parts.items()}
    metrics.update(eval_reward=total.mean().item(), eval_kl_to_start=float(np.mean(kls)))
    gens = sample_generators({"epoch": [10_001] * len(samples), "index": b["index"]}, args.seed, "cpu")
    sde = sample_with_logprob(unet, sched, b["source_latents"], b["mask_latent"], b["masked_latents"], kw, args.strength, args.eta, gens)
    sde_parts, sde_total = compute_rewards(args, reward_model, comps.vae, sde["latents"][:, -1], b)
    metrics.update({f"eval_sde_reward_{k}": v.mean().item() for k, v in sde_parts.items()}, eval_sde_reward=sde_total.mean().item())
    per_sample = [{"reward": float(r), **{k: float(v[i]) for k, v in parts.items()}} for i, r in enumerate(total.tolist())]
    return metrics, decode_latents(comps.vae, latents).cpu(), per_sample


def main(argv=None):
    args = parse_args(argv)
    train_timesteps = max(1, math.ceil(int(args.sample_steps * args.strength) * args.timestep_fraction))
    user_accumulation = args.gradient_accumulation_steps
    args.gradient_accumulation_steps = user_accumulation * train_timesteps  # accumulate over the trained steps too
    accelerator = tu.make_accelerator(args)
    kind = "triplet" if "gt" in args.rewards else "input"
    entries, val_entries = tu.load_train_and_validation(args, kind, accelerator)
    dtype = tu.weight_dtype(accelerator)
    comps = tu.Components(args, accelerator, dtype, guidance_prompts=(args.prompt, args.negative_prompt))
    unet = comps.unet
    tu.add_lora(unet, args, dtype)
    params = [p for p in unet.parameters() if p.requires_grad]
    reward_model = (load_reward_model(args.pretrained_model_name_or_path, args.discriminator_path, args.resolution, accelerator.device,
                                      dtype, args.variant) if args.discriminator_path else None)
    sched = rl_scheduler(comps.sample_scheduler_config, args.sample_steps)
    timesteps = denoising_timesteps(sched, args.strength)
    if len(timesteps) == 0:
        raise UserError(f"--strength {args.strength} with --sample_steps {args.sample_steps} denoises no step")

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
        metrics, images, per_sample = evaluate(raw, comps, args, eval_samples, sched, reward_model)
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
    kw_of = lambda b, cond: cond.unet_kwargs(b["original_size"], b["crop_top_left"], (args.resolution, args.resolution))  # noqa: E731
    for epoch in range(first_epoch, num_epochs):
        # 1. sample trajectories with the current policy, no grad
        raw.eval()
        batches, futures = [], []
        for _ in range(args.sample_batches_per_epoch):
            _, batch = next(stream)
            b = expand_batch({k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}, comps, args,
                             args.group_size)
            gens = sample_generators({"epoch": b["epoch"], "index": b["noise_index"]}, args.seed, "cpu")
            traj = sample_with_logprob(raw, sched, b["source_latents"], b["mask_latent"], b["masked_latents"], kw_of(b, comps.guidance[0]),
                                       args.strength, args.eta, gens, args.guidance_scale, kw_of(b, comps.guidance[1]))
            b.update(traj)
            futures.append(pool.submit(compute_rewards, args, reward_model, comps.vae, traj["latents"][:, -1], b))
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

        # 3. train on random subsets of each trajectory's steps
        data = {k: torch.cat([b[k] for b in batches]) for k in ("latents", "log_probs", "mask_latent", "masked_latents",
                                                                  "original_size", "crop_top_left")}
        raw.train()
        for inner in range(args.num_inner_epochs):
            g = torch.Generator().manual_seed(args.seed * 7919 + epoch * 101 + inner)
            order = torch.randperm(len(advantages), generator=g)
            for start in range(0, len(order), args.train_batch_size):
                idx = order[start:start + args.train_batch_size].to(accelerator.device)
                steps = torch.randperm(len(timesteps), generator=g)[:train_timesteps]
                kw = kw_of({k: data[k][idx] for k in ("original_size", "crop_top_left")}, comps.guidance[0])
                ukw = kw_of({k: data[k][idx] for k in ("original_size", "crop_top_left")}, comps.guidance[1])
                metrics = {}
                for j in steps.tolist():
                    with accelerator.accumulate(unet):
                        x, t = data["latents"][idx, j], timesteps[j]
                        out = predict(unet, x, t, data["mask_latent"][idx], data["masked_latents"][idx], kw, args.guidance_scale, ukw)
                        mean, std = ddim_step_mean_std(sched, out, t, x, args.eta)
                        log_prob = gaussian_log_prob(data["latents"][idx, j + 1], mean, std)
                        if args.algorithm == "reinforce":
                            loss = reinforce_loss(log_prob, advantages[idx])
                        else:
                            loss, approx_kl, clip_fraction = ppo_loss(log_prob, data["log_probs"][idx, j], advantages[idx], args.clip_range)
                            metrics.update(approx_kl=approx_kl.item(), clip_fraction=clip_fraction.item())
                        if args.kl_coef > 0:
                            with torch.no_grad(), tu.adapters_disabled(raw):
                                ref_out = predict(raw, x, t, data["mask_latent"][idx], data["masked_latents"][idx], kw,
                                                  args.guidance_scale, ukw)
                            ref_mean, _ = ddim_step_mean_std(sched, ref_out, t, x, args.eta)
                            kl = gaussian_kl(mean, ref_mean, std).mean()
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
