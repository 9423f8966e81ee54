#!/usr/bin/env python
"""LCM-LoRA distillation of the RORem remover into a 4-step student, optionally reward-weighted.

    accelerate launch --config_file configs/accelerate_8gpu.yaml train_RORem_lcm.py --config configs/lcm_config.yaml \
        --pretrained_teacher_unet path/to/RORem_unet --meta_path data/meta.json --output_dir experiment/RORem_LCM

Per step (myutils/lcm_utils.py, DESIGN.md section 6): noise the GT latents to a DDIM-solver timestep
t_n; the student (the UNet with its LoRA, empty prompt) predicts the consistency output there; the
teacher (the same UNet with the LoRA off) runs classifier-free guidance between --teacher_prompt and
--teacher_negative_prompt with w ~ U[--w_min, --w_max] and one DDIM step to t_n - T/N; the target is
the student's own output at that point, without gradient (or the EMA of the LoRA with
--use_ema_target). Loss: l2 or pseudo-Huber. The LoRA lands in <output_dir>/pytorch_lora_weights.safetensors;
load it with pipe.load_lora_weights and an LCMScheduler (inference_RORem_4S.py).

Reward weighting (train_RORem_lcm_rewarded.py sets its defaults): with --discriminator_path, each
sample's loss is weighted by the discriminator's score of --reward_source: `data` (the training GT,
scored once before training and cached), `teacher` (the teacher's guided x0 at the sampled step, on
latents) or `student` (the student's prediction); or, with no discriminator, `labels`: each training
entry's own "score" in its meta.json (an annotator's verdict); --weighting filter / softmax / percentile
(myutils/reward_utils.reward_weights), with an optional curriculum from permissive to strict; --weighting
none: no weights (the discriminator then only judges validation, or guides).

Reward-guided distillation (RG-LCD, Li et al. 2024): --reward_guidance discriminator=1 (or gt, preserve;
name=weight) subtracts the weighted reward of the student's one-step prediction (the consistency output
at the sampled step, on latents, myutils/reward_utils.latent_rewards) from the LCM loss, so the
reward's gradient enters the distillation itself: loss = LCM loss - sum_r beta_r R_r(model_pred).
"""
import argparse
import json
import os

import torch

from myutils.args import FRACTION, NONNEGATIVE, NONNEGATIVE_REAL, POSITIVE, POSITIVE_REAL, SCORE, real
from myutils.errors import UserError, run_cli
from myutils.lcm_utils import DDIMSolver, consistency_step, per_sample_lcm_loss, sample_guidance_scale
from myutils.models import load_unet_weights, save_unet
from myutils.reward_utils import (ScoreMemory, TRAINING_FLAGS, WEIGHTINGS, latent_rewards, load_reference, load_reward_model,
                                  parse_reward_spec, reward_weights, score_entries, weight_stats)
from myutils.rng import randint_per_sample, randn_per_sample, sample_generators
from myutils.schedules import value_at
from myutils.transfer import to_gpu_async
from myutils.sdxl_inpaint import batch_latent_params, posterior_mean_latents, sample_latents, unet_input
from training import adapters, checkpoint, config, loop, prepare, validation

QUALITY_PROMPT = "4K, high quality, masterpiece, Highly detailed, Sharp focus, Professional, photorealistic, realistic"
NEGATIVE_PROMPT = "low quality, worst, bad proportions, blurry, extra finger, Deformed, disfigured, unclear background"
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


REWARD_SOURCES = ("data", "labels", "teacher", "student")
GUIDANCE_REWARDS = ("discriminator", "gt", "preserve")  # differentiable on latents


def add_lcm_args(parser):
    config.add_common_args(parser, meta_kind="triplet", unet_aliases=("--pretrained_teacher_unet",))
    g = parser.add_argument_group("LCM distillation")
    g.add_argument("--num_ddim_timesteps", type=POSITIVE, default=50, help="N: the solver's timesteps")
    g.add_argument("--w_min", type=NONNEGATIVE_REAL, default=3.0, help="teacher guidance w ~ U[w_min, w_max]; x0 = c + w (c - u)")
    g.add_argument("--w_max", type=NONNEGATIVE_REAL, default=15.0)
    g.add_argument("--teacher_prompt", default=QUALITY_PROMPT, help="the teacher's conditional prompt (RORem's)")
    g.add_argument("--teacher_negative_prompt", default=NEGATIVE_PROMPT, help="the teacher's unconditional prompt")
    g.add_argument("--loss_type", choices=["l2", "huber"], default="l2")
    g.add_argument("--huber_c", type=POSITIVE_REAL, default=0.001)
    g.add_argument("--use_ema_target", action=argparse.BooleanOptionalAction, default=False,
                   help="the target uses an EMA of the LoRA instead of the current LoRA")
    g.add_argument("--ema_decay", type=FRACTION, default=0.95)
    g.add_argument("--validation_lcm_steps", type=POSITIVE, default=4)
    g.add_argument("--validation_lcm_strength", type=real(above=0, maximum=1), default=1.0,
                   help="the student's strength in validation: 1.0, as inference_RORem_4S.py ships it (at 0.99 the LCM scheduler "
                        "runs 3 of 4 steps from a partly noised source)")
    g.add_argument("--win_rate_samples", type=NONNEGATIVE, default=64,
                   help="held-out inputs on which student (LCM steps) and teacher (--validation_inference_steps) are compared")
    g = parser.add_argument_group("reward weighting (with --discriminator_path, or --reward_source labels)")
    g.add_argument("--discriminator_path", "--RORem_discriminator", default=None)
    g.add_argument("--reward_source", choices=REWARD_SOURCES, default="data",
                   help="the discriminator's score of the training GT (data), of the teacher's or the student's x0; or "
                        "labels: each training entry's own score in meta.json, no discriminator")
    g.add_argument("--weighting", choices=WEIGHTINGS, default="softmax")
    g.add_argument("--reward_threshold", type=SCORE, default=0.5, help="filter: keep scores >= threshold")
    g.add_argument("--reward_temperature", type=POSITIVE_REAL, default=0.5, help="softmax: weights softmax(score / temperature)")
    g.add_argument("--reward_reference", default=None, help="percentile: reference scores (reward_utils.save_reference)")
    g.add_argument("--curriculum", choices=["none", "threshold", "temperature"], default="none",
                   help="move the threshold (or temperature) from --curriculum_start to its final value")
    g.add_argument("--curriculum_start", type=NONNEGATIVE_REAL, default=None, help="default: 0 for threshold, 10 for temperature")
    g.add_argument("--curriculum_steps", type=POSITIVE, default=None, help="default: all of training")
    g.add_argument("--score_every", type=POSITIVE, default=1, help="teacher/student sources: rescore a sample at most every N steps")
    g = parser.add_argument_group("reward-guided distillation (RG-LCD)")
    g.add_argument("--reward_guidance", default=None,
                   help="name=weight,... of discriminator, gt, preserve: minus the weighted reward of the student's one-step "
                        "prediction is added to the loss")
    parser.set_defaults(use_lora=True, lora_rank=64, lora_target_modules=LCM_LORA_TARGETS, learning_rate=1e-4,
                        max_grad_norm=1.0, validation_steps=0)


def parse_args(argv=None, rewarded=False):
    """rewarded: train_RORem_lcm_rewarded.py's entry point, which requires --discriminator_path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_lcm_args(parser)
    args = config.parse_args(parser, argv)
    if rewarded and not args.discriminator_path and args.reward_source != "labels":
        raise UserError("--discriminator_path is required (the discriminator folder whose scores weight the loss), "
                        "or --reward_source labels (the scores in the training meta.json)")
    if not args.use_lora:
        raise UserError("LCM distillation trains a LoRA: the teacher is the same UNet with the LoRA off (drop --no-use_lora)")
    if args.validation_steps and int(args.validation_lcm_steps * args.validation_lcm_strength) < 1:
        raise UserError(f"--validation_lcm_steps {args.validation_lcm_steps} at --validation_lcm_strength "
                        f"{args.validation_lcm_strength} runs no denoising step")
    args.guidance_rewards = parse_reward_spec(args.reward_guidance, "--reward_guidance") if args.reward_guidance else {}
    unknown = set(args.guidance_rewards) - set(GUIDANCE_REWARDS)
    if unknown:
        raise UserError(f"--reward_guidance {args.reward_guidance}: {', '.join(sorted(unknown))} cannot be differentiated here; "
                        f"use {', '.join(GUIDANCE_REWARDS)}")
    if "discriminator" in args.guidance_rewards and not args.discriminator_path:
        raise UserError("--reward_guidance discriminator needs --discriminator_path")
    if args.w_min > args.w_max:
        raise UserError(f"--w_min {args.w_min} is above --w_max {args.w_max}")
    if args.weighting == "percentile" and args.reward_reference and not os.path.isfile(args.reward_reference):
        raise UserError(f"--reward_reference {args.reward_reference}: file not found")
    return args


def weighting_params(args, step, max_steps):
    """(threshold, temperature) at this step, following the curriculum."""
    threshold, temperature = args.reward_threshold, args.reward_temperature
    span = args.curriculum_steps or max_steps
    if args.curriculum == "threshold":
        threshold = value_at(step, span, 0.0 if args.curriculum_start is None else args.curriculum_start, threshold, "linear")
    elif args.curriculum == "temperature":
        temperature = value_at(step, span, 10.0 if args.curriculum_start is None else args.curriculum_start, temperature, "linear")
    return threshold, temperature


def label_scores(entries):
    """Each training entry's own score (read as scored entries, so every one has a score in [0, 1]):
    the weights' source with --reward_source labels."""
    return torch.tensor([e.score for e in entries])


def data_scores(args, accelerator, reward, entries):
    """The discriminator's score of every training GT, computed once (split over ranks) and cached
    in <output_dir>/data_scores.json."""
    from accelerate.utils import gather_object

    path = os.path.join(args.output_dir, "data_scores.json")
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if len(cached) == len(entries):
            return torch.tensor(cached)
    mine = list(range(accelerator.process_index, len(entries), accelerator.num_processes))
    scores = score_entries(reward, [entries[i] for i in mine], args.resolution, args.train_batch_size)
    merged = dict(gather_object(list(zip(mine, scores))))
    result = [merged[i] for i in range(len(entries))]
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f)
    return torch.tensor(result)


def distillation_tensors(unet, accelerator, comps, batch, args, solver, ema, keys):
    """(student prediction, LCM target, teacher's guided x0, batch with latent parameters) for one
    batch: latents, noise, solver index and guidance w per sample from (seed, epoch, index)."""
    vae, dtype = comps.vae, comps.condition.prompt_embeds.dtype
    if "params:GT" not in batch:
        batch = {**batch, **batch_latent_params(vae, batch, list(keys))}
    gens = sample_generators(batch, args.seed)
    latents = sample_latents(batch["params:GT"], vae.config, gens)
    masked = sample_latents(batch["params:masked"], vae.config, gens)
    noise = randn_per_sample(gens, latents.shape[1:], latents.device)
    index = randint_per_sample(gens, args.num_ddim_timesteps, latents.device)
    w = sample_guidance_scale(gens, args.w_min, args.w_max, latents.device)
    size = (batch["original_size"], batch["crop_top_left"], (args.resolution, args.resolution))
    raw = accelerator.unwrap_model(unet)
    lora = [p for p in raw.parameters() if p.requires_grad]

    def call(model, condition, x, t):
        return model(unet_input(x, batch["mask_latent"], masked).to(dtype), t, **condition.unet_kwargs(*size)).sample

    def teacher(x, t):  # the base model: the LoRA off
        with adapters.disabled(raw):
            cond = call(raw, comps.guidance[0], x, t)
            if args.w_max == 0:  # w = 0 everywhere: the unconditional branch would be multiplied by 0
                return cond, cond
            return cond, call(raw, comps.guidance[1], x, t)

    def target_net(x, t):  # the student itself, or its EMA
        if ema is None:
            return call(raw, comps.condition, x, t)
        ema.store(lora)
        ema.copy_to(lora)
        try:
            return call(raw, comps.condition, x, t)
        finally:
            ema.restore(lora)

    model_pred, target, teacher_x0 = consistency_step(
        lambda x, t: call(unet, comps.condition, x, t), teacher, target_net, latents, noise, index, w, solver,
        comps.noise_scheduler.alphas_cumprod, comps.noise_scheduler.config.prediction_type)
    return model_pred, target, teacher_x0, batch


def sample_scores(args, accelerator, reward, comps, batch, scores_of_data, memory, step, model_pred, teacher_x0):
    """(B,) discriminator scores of this batch's samples from --reward_source; teacher/student
    scores are on latents (no decode) and refreshed at most every --score_every steps."""
    index = batch["index"].cpu()
    if args.reward_source in ("data", "labels"):  # held on the device; the index goes there without a wait
        return scores_of_data[to_gpu_async(index, scores_of_data.device)]
    stale = memory.stale(index, step)
    fresh = torch.zeros(len(index), dtype=torch.float64)
    if stale.any():  # the host knows which (bookkeeping): the stale ones are picked on the device without a wait
        on = to_gpu_async(stale.nonzero().reshape(-1), model_pred.device)
        edited = (teacher_x0 if args.reward_source == "teacher" else model_pred.detach())[on]
        source = posterior_mean_latents(batch["params:source"][on], comps.vae.config)
        fresh[stale] = reward.score_latents(source, batch["mask_latent"][on], edited, batch["original_size"][on],
                                            batch["crop_top_left"][on]).double().cpu()  # the memory is the host's: one read
    got = torch.stack([index.double(), fresh, stale.double()], 1)
    if accelerator.num_processes > 1:  # every rank remembers every rank's scores, so the main process checkpoints them all
        got = accelerator.gather(to_gpu_async(got, accelerator.device)).cpu()
    was_stale = got[:, 2] > 0
    memory.update(got[:, 0].long(), got[was_stale, 1].float(), step, was_stale)
    return to_gpu_async(memory.get(index), model_pred.device)


def guidance_reward(args, reward, comps, batch, model_pred):
    """RG-LCD's term: ({component: (B,)}, weighted total (B,)) of the student's one-step prediction,
    differentiable, against this batch's source, mask and GT latents (posterior means)."""
    cond = {"mask_latent": batch["mask_latent"], "original_size": batch["original_size"], "crop_top_left": batch["crop_top_left"]}
    if "params:source" in batch:
        cond["source_latents"] = posterior_mean_latents(batch["params:source"], comps.vae.config)
    gt = posterior_mean_latents(batch["params:GT"], comps.vae.config) if "gt" in args.guidance_rewards else None
    return latent_rewards(args.guidance_rewards, reward, cond, model_pred, gt)


def main(argv=None, rewarded=False):
    args = parse_args(argv, rewarded)
    accelerator = prepare.make_accelerator(args)
    # --reward_source labels: the training entries' own scores, so each must have one
    entries, val_entries = prepare.load_train_and_validation(args, "scored" if args.reward_source == "labels" else "triplet",
                                                             accelerator, validation_kind="triplet")
    dtype = prepare.weight_dtype(accelerator)
    comps = prepare.Components(args, accelerator, dtype, guidance_prompts=(args.teacher_prompt, args.teacher_negative_prompt))
    unet = comps.unet
    adapters.add_lora(unet, args, dtype)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    ema = None
    if args.use_ema_target:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=args.ema_decay)
    sched = comps.noise_scheduler
    if args.num_ddim_timesteps > sched.config.num_train_timesteps:
        raise UserError(f"--num_ddim_timesteps {args.num_ddim_timesteps}: at most the scheduler's {sched.config.num_train_timesteps} "
                        "training timesteps (the solver steps over them; RORem uses 50)")
    solver = DDIMSolver(sched.alphas_cumprod, sched.config.num_train_timesteps, args.num_ddim_timesteps).to(accelerator.device)

    reward = None
    if args.discriminator_path:
        reward = load_reward_model(args.pretrained_model_name_or_path, args.discriminator_path, args.resolution,
                                   accelerator.device, dtype, args.variant, flags=TRAINING_FLAGS)
    weighted = (reward is not None or args.reward_source == "labels") and args.weighting != "none"
    scores_of_data = (None if not weighted else label_scores(entries) if args.reward_source == "labels" else
                      data_scores(args, accelerator, reward, entries) if args.reward_source == "data" else None)
    if scores_of_data is not None:
        scores_of_data = scores_of_data.to(accelerator.device)  # once: every step indexes it there
    reference = load_reference(args.reward_reference) if args.reward_reference else None
    memory = ScoreMemory(args.score_every)

    needs_source = (weighted and args.reward_source in ("teacher", "student")) or {"discriminator", "preserve"} & set(args.guidance_rewards)
    keys = ("GT", "masked", "source") if needs_source else ("GT", "masked")
    dataset = prepare.make_train_dataset(args, entries, "triplet", accelerator, comps.vae, cache_keys=keys)
    unet, optimizer, lr_scheduler, loader, max_steps, num_epochs = prepare.for_training(args, accelerator, unet, params, dataset)
    if ema is not None:
        ema.to(accelerator.device)
    save = lambda m, d: save_unet(m, d, lora=True)  # noqa: E731
    checkpoint.register_hooks(accelerator, save, lambda m, d: load_unet_weights(m, d, lora=True), ema)
    accelerator.register_for_checkpointing(memory)
    name = "train_RORem_lcm_rewarded" if weighted else "train_RORem_lcm"
    prepare.init_trackers(accelerator, args, name)
    validating = args.validation_steps and accelerator.is_main_process
    count = max(args.win_rate_samples, args.num_validation_images)
    val_samples = validation.validation_samples(args, val_entries, "triplet", count) if validating else []
    teacher_cache = {}

    def validate(step):
        """The student in --validation_lcm_steps LCM steps against the teacher's many-step sampling
        (same seeds); with a discriminator, its win rate. Grid: source, mask, teacher, student, GT."""
        if not val_samples:
            return None
        from diffusers import LCMScheduler

        model = accelerator.unwrap_model(unet)
        lcm = LCMScheduler.from_config(comps.sample_scheduler_config)
        results = validation.sample_validation(accelerator, args, comps, model, val_samples, steps=args.validation_lcm_steps, scheduler=lcm,
                                       strength=args.validation_lcm_strength)

        def teacher_results():
            with adapters.disabled(model):
                return validation.sample_validation(accelerator, args, comps, model, val_samples)

        metrics = validation.compare_with_reference(accelerator, args, val_samples, results, teacher_results, step, "GT", reward, teacher_cache,
                                            mse_key="GT")
        validation.log_validation(accelerator, metrics, step)
        return metrics

    global_step, final = checkpoint.resume(accelerator, args, f"{name}.py", "lcm_student"), None
    run = loop.TrainingRun(accelerator, args, loader, max_steps, num_epochs, global_step)
    for batch in run.batches():
        with accelerator.accumulate(unet):
            model_pred, target, teacher_x0, batch = distillation_tensors(unet, accelerator, comps, batch, args, solver, ema, keys)
            losses = per_sample_lcm_loss(model_pred, target, args.loss_type, args.huber_c)
            weights, metrics = torch.ones_like(losses), {}
            if weighted:
                scores = sample_scores(args, accelerator, reward, comps, batch, scores_of_data, memory, run.global_step, model_pred,
                                       teacher_x0)
                all_scores = accelerator.gather(scores.to(accelerator.device))  # weights over the global batch
                threshold, temperature = weighting_params(args, run.global_step, max_steps)
                all_weights = reward_weights(all_scores, args.weighting, threshold, temperature, reference)
                mine = slice(accelerator.process_index * len(losses), (accelerator.process_index + 1) * len(losses))
                weights = all_weights[mine].to(losses.device)
                metrics = {"score_mean": all_scores.mean(), "score_std": all_scores.std(unbiased=False),
                           "reward_threshold": threshold, "reward_temperature": temperature, **weight_stats(all_weights)}
                if accelerator.sync_gradients and (run.global_step + 1) % args.logging_steps == 0:
                    validation.log_histogram(accelerator, "scores", all_scores, run.global_step + 1)
                run.skip_batch(all_weights.sum() == 0)  # nothing kept in the global batch: no update, counted as skipped
            if args.guidance_rewards:
                parts, total = guidance_reward(args, reward, comps, batch, model_pred)
                metrics.update({"guidance_reward": total.mean(), **{f"guidance_reward_{k}": v.mean() for k, v in parts.items()}})
            loss = (weights * losses).mean() - (total.mean() if args.guidance_rewards else 0)
            if run.record_loss(loss):
                accelerator.backward(loss)
            run.optimizer_step(optimizer, lr_scheduler, params, ema)
        if not run.end_of_step(**metrics):
            continue
        if args.validation_steps and run.global_step % args.validation_steps == 0:
            final = validate(run.global_step)
    run.finish()
    if args.validation_steps and (final is None or run.global_step % args.validation_steps):
        final = validate(run.global_step)
    checkpoint.save_final(accelerator, args, unet, save, metrics=final)
    return final


if __name__ == "__main__":
    run_cli(main)
