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
pair, which share their start (pairwise; or labels given by hand: --export_pairs writes an epoch's pairs and exits, --pair_labels
trains one epoch on them once labelled). Clipped to +-adv_clip_max. (3) --num_inner_epochs passes
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

import torch

from myutils.errors import UserError, run_cli
from myutils.img_util import tensor_to_pil
from myutils.models import load_unet_weights, save_unet
from myutils.rl_utils import PerInputStatTracker, clip_advantages, group_advantages, pair_preferences
from training import adapters, checkpoint, config, loop, prepare, rl_loop, rl_pairs, validation


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config.add_common_args(parser, meta_kind="input")
    config.add_rl_args(parser)
    parser.set_defaults(use_lora=True, learning_rate=3e-4, train_batch_size=4, num_train_epochs=100, validation_steps=0,
                        checkpointing_steps=0)
    args = config.parse_args(parser, argv)
    config.check_rl_args(args, "train_RORem_ddpo.py")
    return args


def main(argv=None):
    args = parse_args(argv)
    user_accumulation = args.gradient_accumulation_steps
    args.gradient_accumulation_steps = user_accumulation * rl_loop.train_timesteps(args)  # accumulate over the trained steps too
    accelerator = prepare.make_accelerator(args)
    kind = "triplet" if "gt" in args.rewards else "input"
    entries, val_entries = prepare.load_train_and_validation(args, kind, accelerator)
    dtype = prepare.weight_dtype(accelerator)
    sampler = rl_loop.load_sampler(args, accelerator, dtype)
    unet = sampler.model
    params = adapters.add_lora(unet, args, dtype)
    reward_model = rl_loop.load_reward(args, accelerator, dtype)
    loader, steps_per_epoch = rl_loop.sampling_loader(args, entries, kind, accelerator, user_accumulation)
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch) if args.max_train_steps else args.num_train_epochs
    optimizer = prepare.make_optimizer(args, params, accelerator)
    lr_scheduler = prepare.make_lr_scheduler(args, optimizer, num_epochs * steps_per_epoch, accelerator)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    raw = accelerator.unwrap_model(unet)
    tracker = PerInputStatTracker(args.stat_buffer_size, args.stat_min_count)
    accelerator.register_for_checkpointing(tracker)
    save = lambda m, d: save_unet(m, d, lora=True)  # noqa: E731
    checkpoint.register_hooks(accelerator, save, lambda m, d: load_unet_weights(m, d, lora=True))
    prepare.init_trackers(accelerator, args, "train_RORem_ddpo")
    eval_samples = validation.validation_samples(args, val_entries, kind, args.eval_samples)  # every rank evaluates a share
    history, id_cache = {}, {}

    def run_eval(epoch, step):
        if not eval_samples:
            return
        raw.eval()
        metrics, images, per_sample = rl_loop.evaluate(raw, sampler, args, eval_samples, reward_model, accelerator=accelerator)
        raw.train()
        if not accelerator.is_main_process:
            return
        history.setdefault("start", metrics)
        history["final"] = metrics
        history.setdefault("evals", []).append({"epoch": epoch, "step": step, **metrics, "per_sample": per_sample})
        validation.log_validation(accelerator, {**metrics, "eval_epoch": epoch}, step)
        if "images" not in history:
            history["images"] = images
        n = args.num_validation_images
        source, mask = validation.input_rows(eval_samples[:n])
        path = validation.save_validation_grid(accelerator, args, [source, mask, [tensor_to_pil(x) for x in history["images"][:n]],
                                                           [tensor_to_pil(x) for x in images[:n]]], step)
        with open(path.replace(".png", ".json"), "w") as f:  # each column's rewards, start and current
            json.dump({"rows": ["source", "mask", "start", "current"], "start": history["evals"][0]["per_sample"][:n],
                       "current": per_sample[:n]}, f, indent=1)

    global_step = checkpoint.resume(accelerator, args, "train_RORem_ddpo.py", "remover")
    first_epoch = global_step // steps_per_epoch
    stream = prepare.epoch_batches(loader, rl_loop.first_sampled_epoch(global_step, steps_per_epoch) * args.sample_batches_per_epoch,
                              1, 10 ** 9)
    run = loop.TrainingRun(accelerator, args, None, num_epochs * steps_per_epoch, num_epochs, global_step)
    if global_step == 0 and not args.export_pairs:
        run_eval(0, 0)
    last_epoch = first_epoch + 1 if args.pair_labels else num_epochs  # labelled pairs: one epoch per labelling round
    if args.pair_labels and first_epoch >= num_epochs:
        raise UserError(f"--pair_labels: {args.output_dir} has already trained all {num_epochs} epochs (--num_train_epochs)")
    # ended on every way out (a failure too): no reward thread outlives the run
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # rewards overlap the next batch's sampling
        for epoch in range(first_epoch, last_epoch):
            raw.eval()
            start_step = epoch * steps_per_epoch
            if run.global_step > start_step:  # resumed inside this epoch: its samples and advantages as they were
                batches, advantages, logs = rl_loop.load_epoch_samples(args, accelerator, start_step)
            else:
                if args.pair_labels:  # 1-2. an exported epoch and its labels instead of sampling
                    batches, all_rewards, adv = rl_pairs.load_labelled_pairs(args, accelerator, run.global_step)
                    components = {}
                else:
                    # 1. sample trajectories with the current policy, no grad
                    batches, rewards, components = rl_loop.collect_samples(args, sampler, raw, stream, pool, reward_model,
                                                                           accelerator.device)
                    all_rewards = accelerator.gather(rewards.to(accelerator.device)).cpu().numpy()
                    if args.export_pairs:  # to be labelled by hand, then trained on with --pair_labels
                        rl_pairs.export_pairs(args, accelerator, sampler, entries, batches, all_rewards, run.global_step)
                        break
                    # 2. advantages over what every process sampled
                    ids = torch.cat([rl_loop.content_ids(entries, b["index"].cpu(), id_cache) for b in batches])
                    all_ids = accelerator.gather(ids.to(accelerator.device)).cpu().tolist()
                    if args.algorithm == "grpo":
                        adv = group_advantages(all_rewards, all_ids, args.adv_std)
                    elif args.algorithm == "pairwise":
                        adv = pair_preferences(all_rewards)
                    else:
                        adv = tracker.update(all_ids, all_rewards)
                adv = clip_advantages(adv, args.adv_clip_max)
                n_local = sum(len(b["index"]) for b in batches)
                mine = slice(accelerator.process_index * n_local, (accelerator.process_index + 1) * n_local)
                advantages = torch.tensor(adv[mine], dtype=torch.float32, device=accelerator.device)
                logs = {"reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std()), "epoch": epoch,
                        **rl_loop.reward_logs(accelerator, components, run.global_step + 1)}

            # 3. train on random subsets of each trajectory's trainable steps
            rl_loop.policy_update(args, accelerator, run, unet, sampler, batches, advantages, optimizer, lr_scheduler, params,
                                  args.seed * 7919 + epoch, logs, start_step)
            # 4. checkpoint and evaluate at epoch ends
            if (args.checkpointing_epochs and (epoch + 1) % args.checkpointing_epochs == 0) or args.pair_labels:
                checkpoint.save_checkpoint(accelerator, args, run.global_step)  # labelled rounds: the next export resumes it
            if (args.eval_epochs and (epoch + 1) % args.eval_epochs == 0) or epoch + 1 == last_epoch:
                run_eval(epoch + 1, run.global_step)
    run.finish()
    if args.export_pairs:
        accelerator.end_training()
        return None
    final = None
    if accelerator.is_main_process and "start" in history:
        final = {**{f"start_{k}": v for k, v in history["start"].items()}, **history["final"]}
        with open(os.path.join(args.output_dir, "reward_history.json"), "w") as f:
            json.dump({k: v for k, v in history.items() if k != "images"}, f, indent=1)
    checkpoint.save_final(accelerator, args, unet, save, metrics=final)
    return final


if __name__ == "__main__":
    run_cli(main)
