#!/usr/bin/env python
"""Direct reward fine-tuning of the RORem remover through a differentiable reward: DRaFT-K, ReFL and
AlignProp, on a LoRA, with the discriminator (read on latents), the GT error and preservation.

    accelerate launch --config_file configs/accelerate_8gpu.yaml train_RORem_draft.py --config configs/draft_config.yaml \
        --pretrained_unet path/to/RORem_unet --meta_path data/meta.json --discriminator_path path/to/disc \
        --method draft --draft_k 1 --reward discriminator=1,preserve=0.5 --output_dir experiment/RORem_DRaFT
    ... --config configs/draft_lcm_config.yaml --student_lora path/to/RORem_LCM_lora    # the 4-step student

With --student_lora (a 4-step LCM LoRA: train_RORem_lcm.py's, or RORem's release) the LoRA trained
is the student's own, from where it is, sampled as inference_RORem_4S.py samples it (multistep LCM,
each step's noise drawn from the per-sample generators); the start is that LoRA as loaded, and the
result is a LoRA of the same shape, for inference_RORem_4S.py. With 4 steps, backpropagating through
all of them (alignprop) is cheap.

RORem's reward model is a UNet encoder on latents: differentiable and cheap, so the policy can be
trained by the reward's gradient itself instead of a policy-gradient estimate. Per step, each input is
removed by deterministic DDIM (eta 0) from its own noise (seeded by seed, epoch and input index) and
the loss is minus the weighted reward of the result, plus --reg_coef x the squared drift of the UNet's
output from the start (LoRA off) at the differentiated steps, the guard against reward hacking:
- draft (Clark et al. 2023, DRaFT-K): the whole chain, gradients through the last --draft_k steps only;
- alignprop (Prabhudesai et al. 2023): gradients through every step, each UNet call recomputed in the
  backward pass (memory of one call, not of the chain);
- refl (Xu et al. 2023, ReFL): the chain without gradients down to a random step among the last
  --refl_last, then one step with gradients to the predicted x0 (the same step for every sample of
  a global step: a batch shares its UNet call).
Rewards (myutils/reward_utils.py latent_rewards): discriminator, gt (minus the masked error against
GT's latents: a known answer) and preserve (minus the change outside the mask), all on latents.
Validation every --validation_steps on held-out triplets (deterministic DDIM from fixed noises, the
same for policy and start): each reward component and, beside the reward, the masked MSE against GT
in pixels, so a reward that rises while the GT error grows (reward hacking) shows; a grid of source,
mask, start, policy and GT.
"""
import argparse

import torch

from myutils.args import NONNEGATIVE, NONNEGATIVE_REAL, POSITIVE, real
from myutils.data import stack_samples, to_device
from myutils.errors import UserError, run_cli
from myutils.models import load_unet_weights, save_unet
from myutils.reward_utils import TRAINING_FLAGS, gt_reward, latent_rewards, load_reward_model, parse_reward_spec
from myutils.rng import sample_generators
from myutils.sdxl_inpaint import batch_latent_params, posterior_mean_latents
from pipelines.rl_sampler import SDXLInpaintSampler, sample_with_grad
from training import adapters, checkpoint, config, loop, prepare, validation

REWARDS = ("discriminator", "gt", "preserve")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config.add_common_args(parser, meta_kind="triplet")
    g = parser.add_argument_group("direct reward fine-tuning")
    g.add_argument("--method", choices=["draft", "alignprop", "refl"], default="draft")
    g.add_argument("--draft_k", type=POSITIVE, default=1, help="draft: the last K steps carry gradients")
    g.add_argument("--refl_last", type=POSITIVE, default=None, help="refl: the random step is among the last N (default: a quarter)")
    g.add_argument("--reward", default="discriminator=1", help="name=weight,...: discriminator, gt, preserve (on latents)")
    g.add_argument("--reg_coef", type=NONNEGATIVE_REAL, default=0.0,
                   help="penalty on the squared drift of the UNet's output from the start's at the differentiated steps")
    g.add_argument("--discriminator_path", "--RORem_discriminator", default=None)
    g.add_argument("--student_lora", default=None,
                   help="a 4-step LCM LoRA to train on (sampled with LCM steps; its own rank and layers: --lora_* are not used)")
    g.add_argument("--sample_steps", type=POSITIVE, default=20, help="DDIM steps of the chain")
    g.add_argument("--strength", type=real(above=0, maximum=1), default=1.0, help="start from the source noised to strength * T")
    g.add_argument("--eval_samples", type=NONNEGATIVE, default=16, help="held-out inputs of the validation")
    parser.set_defaults(use_lora=True, learning_rate=1e-4, validation_steps=0)
    args = config.parse_args(parser, argv)
    args.rewards = parse_reward_spec(args.reward)
    unknown = set(args.rewards) - set(REWARDS)
    if unknown:
        raise UserError(f"--reward {args.reward}: {', '.join(sorted(unknown))} cannot be differentiated here; use {', '.join(REWARDS)}")
    if "discriminator" in args.rewards and not args.discriminator_path:
        raise UserError("--reward discriminator needs --discriminator_path")
    if not args.use_lora:
        raise UserError("train_RORem_draft.py trains a LoRA (the start is the same UNet with its adapters off, or the "
                        "--student_lora as loaded): keep --use_lora")
    given = [k for k in ("lora_rank", "lora_alpha", "lora_target_modules") if getattr(args, k) != parser.get_default(k)]
    if args.student_lora and given:  # the student's file sets them; taking the flag silently would be a lie
        raise UserError(f"--{given[0]} with --student_lora: the student LoRA keeps its own rank, alpha and layers; drop --{given[0]}")
    steps = int(args.sample_steps * args.strength)
    if steps == 0:
        raise UserError(f"--strength {args.strength} with --sample_steps {args.sample_steps} denoises no step")
    if args.method == "draft" and args.draft_k > steps:
        raise UserError(f"--draft_k {args.draft_k} is more than the {steps} steps the chain denoises (--sample_steps x --strength)")
    return args


def conditioned(sampler, batch, gt=True):
    """The sampler's conditioning, plus GT's latents (the gt reward's target) when gt is asked for."""
    cond = sampler.condition(batch)
    if gt:  # one more VAE encode per batch: only for the gt reward
        with torch.no_grad():
            cond["GT_latents"] = posterior_mean_latents(batch_latent_params(sampler.vae, batch, ["GT"])["params:GT"], sampler.vae.config)
    return cond


def refl_step(args, step, n):
    """ReFL's step index for an optimizer step: among the last --refl_last of n, drawn from (seed, step)
    alone, so every rank and a resumed run draw the same."""
    last = min(n, args.refl_last or max(1, n // 4))
    g = torch.Generator("cpu").manual_seed(args.seed * 1_000_003 + step)
    return n - 1 - int(torch.randint(0, last, (1,), generator=g, device="cpu"))


@torch.no_grad()
def evaluate(args, sampler, model, reward, samples):
    """Held-out means of each reward (on latents) and of the masked MSE against GT (pixels), and the
    first --num_validation_images results; --validation_batch_size inputs at a time, so memory does
    not grow with --eval_samples (a sample's noise depends on its index only)."""
    from myutils.img_util import tensor_to_pil

    per_sample, images = {}, []
    for i in range(0, len(samples), args.validation_batch_size):
        b = conditioned(sampler, to_device(stack_samples(samples[i:i + args.validation_batch_size]), sampler.vae.device),
                        gt="gt" in args.rewards)
        gens = sample_generators({"epoch": [10_000] * len(b["index"]), "index": b["index"]}, args.seed)
        x, _ = sample_with_grad(sampler, model, b, gens, grad_steps=0)
        parts, total = latent_rewards(args.rewards, reward, b, x, b.get("GT_latents"))
        pixels = sampler.decode(x)
        for k, v in {"reward": total, **{f"reward_{k}": v for k, v in parts.items()},
                     "masked_mse": -gt_reward(pixels, b["GT"], b["mask"])}.items():
            per_sample.setdefault(k, []).extend(v.float().cpu().tolist())
        images += [tensor_to_pil(p) for p in pixels[:max(0, args.num_validation_images - len(images))].cpu()]
    return {k: sum(v) / len(v) for k, v in per_sample.items()}, images


def main(argv=None):
    args = parse_args(argv)
    accelerator = prepare.make_accelerator(args)
    entries, val_entries = prepare.load_train_and_validation(args, "triplet", accelerator)
    dtype = prepare.weight_dtype(accelerator)
    comps = prepare.Components(args, accelerator, dtype, guidance_prompts=(args.prompt, ""))
    unet = comps.unet
    if args.student_lora:
        params = adapters.load_trainable_lora(unet, args.student_lora, dtype, "--student_lora")
    else:
        params = adapters.add_lora(unet, args, dtype)
    sampler = SDXLInpaintSampler(comps, args.sample_steps, args.strength, 0.0, args.resolution,
                                 scheduler="lcm" if args.student_lora else "ddim")
    reward = (load_reward_model(args.pretrained_model_name_or_path, args.discriminator_path, args.resolution, accelerator.device,
                                dtype, args.variant, flags=TRAINING_FLAGS) if args.discriminator_path else None)

    dataset = prepare.make_train_dataset(args, entries, "triplet", accelerator)
    unet, optimizer, lr_scheduler, loader, max_steps, num_epochs = prepare.for_training(args, accelerator, unet, params, dataset)
    raw = accelerator.unwrap_model(unet)  # the start, on the device, before a resume: the student as loaded, or (a new
    start = adapters.called_with(raw, adapters.trainable_state(raw))  # LoRA, B = 0) exactly the UNet it was added to
    save = lambda m, d: save_unet(m, d, True)  # noqa: E731
    checkpoint.register_hooks(accelerator, save, lambda m, d: load_unet_weights(m, d, True))
    prepare.init_trackers(accelerator, args, "train_RORem_draft")
    samples = validation.validation_samples(args, val_entries, "triplet", args.eval_samples) if accelerator.is_main_process else []
    start_figures = {}

    def validate(step):
        if not samples:
            return None
        model = accelerator.unwrap_model(unet)
        if not start_figures:  # the start's held-out figures and results: the same at every validation
            start_figures["metrics"], start_figures["images"] = evaluate(args, sampler, start, reward, samples)
        metrics, images = evaluate(args, sampler, model, reward, samples)
        out = {**{f"val_{k}": v for k, v in metrics.items()}, **{f"val_start_{k}": v for k, v in start_figures["metrics"].items()}}
        source, mask, gt = validation.input_rows(samples[:args.num_validation_images], "GT")
        n = len(source)
        validation.save_validation_grid(accelerator, args, [source, mask, start_figures["images"][:n], images[:n], gt], step)
        validation.log_validation(accelerator, out, step)
        return out

    global_step, final = checkpoint.resume(accelerator, args, "train_RORem_draft.py", "lcm_student" if args.student_lora else "remover"), None
    run = loop.TrainingRun(accelerator, args, loader, max_steps, num_epochs, global_step)
    n = len(sampler.timesteps)
    for batch in run.batches():
        with accelerator.accumulate(unet):
            cond = conditioned(sampler, batch, gt="gt" in args.rewards)
            gens = sample_generators(batch, args.seed)
            grad_steps = {"draft": args.draft_k, "alignprop": n, "refl": 1}[args.method]
            j = refl_step(args, run.global_step, n) if args.method == "refl" else None
            x, steps = sample_with_grad(sampler, unet, cond, gens, grad_steps, refl_step=j, checkpointing=args.method == "alignprop")
            parts, total = latent_rewards(args.rewards, reward, cond, x, cond.get("GT_latents"))
            drift = torch.zeros((), device=x.device)
            if args.reg_coef:
                with torch.no_grad():
                    refs = [sampler.output(start, x_in.detach(), i, cond) for i, x_in, _ in steps]
                drift = torch.stack([((out - ref) ** 2).mean() for (_, _, out), ref in zip(steps, refs)]).mean()
            loss = -total.mean() + args.reg_coef * drift
            if run.record_loss(loss):
                accelerator.backward(loss)
            run.optimizer_step(optimizer, lr_scheduler, params)
        logs = {"reward": total.mean(), "drift": drift, **{f"reward_{k}": v.mean() for k, v in parts.items()}}  # read when logged
        if run.end_of_step(**logs) and args.validation_steps and run.global_step % args.validation_steps == 0:
            final = validate(run.global_step)
    run.finish()
    if args.validation_steps and (final is None or run.global_step % args.validation_steps):
        final = validate(run.global_step)
    checkpoint.save_final(accelerator, args, unet, save, metrics=final)
    return final


if __name__ == "__main__":
    run_cli(main)
