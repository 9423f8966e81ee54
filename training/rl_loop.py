"""The online-RL loop shared by train_RORem_ddpo.py and train_RORem_morl.py: rewards, sampling an
epoch of trajectories, the held-out evaluation, the policy-gradient pass over the recorded steps and
an epoch's samples in a mid-epoch checkpoint. Not here: the arguments (config.py), pairs labelled by
hand (rl_pairs.py), the math (myutils/rl_utils.py), the samplers (pipelines/)."""
import math
import os

import torch

from myutils.data import stack_samples, to_device
from myutils.errors import UserError
from myutils.img_util import content_key
from myutils.reward_utils import gt_reward, jpeg_reward, preservation_reward
from myutils.rl_utils import gaussian_kl, gaussian_log_prob, kl_in_unit, pairwise_preference_loss, ppo_loss, reinforce_loss
from myutils.rng import sample_generators
from myutils.transfer import to_gpu_async

from . import adapters, checkpoint, prepare, validation


def train_timesteps(args):
    """How many recorded steps of each trajectory a training batch uses (the flow sampler's last
    step is never trained)."""
    trainable = int(args.sample_steps * args.strength) - (args.family == "flow")
    return max(1, math.ceil(trainable * args.timestep_fraction))


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
    from pipelines.flow_inpaint import FlowFillSampler
    from pipelines.rl_sampler import SDXLInpaintSampler

    if args.family == "flow":
        sampler = FlowFillSampler(args.pretrained_model_name_or_path, accelerator.device, dtype, args.sample_steps, args.strength,
                                  args.resolution, args.noise_level, args.naive_sde, args.prompt, args.flow_guidance,
                                  args.max_sequence_length, args.variant, args.revision)
        if args.gradient_checkpointing:
            sampler.model.enable_gradient_checkpointing()
        return sampler
    comps = prepare.Components(args, accelerator, dtype, guidance_prompts=(args.prompt, args.negative_prompt))
    sampler = SDXLInpaintSampler(comps, args.sample_steps, args.strength, args.eta, args.resolution, args.guidance_scale)
    if len(sampler.timesteps) == 0:
        raise UserError(f"--strength {args.strength} with --sample_steps {args.sample_steps} denoises no step")
    return sampler


def load_reward(args, accelerator, dtype):
    """The discriminator as reward (None without --discriminator_path), on the SDXL-inpainting model
    it was built on (--discriminator_base_model, default the model being trained)."""
    from myutils.reward_utils import load_reward_model

    if not args.discriminator_path:
        return None
    return load_reward_model(args.discriminator_base_model or args.pretrained_model_name_or_path, args.discriminator_path,
                             args.resolution, accelerator.device, dtype, args.variant,
                             flags=("--discriminator_base_model" if args.discriminator_base_model else "--pretrained_model_name_or_path",
                                    "--discriminator_path"))


def sampling_loader(args, entries, kind, accelerator, user_accumulation):
    """(loader of --sample_batch_size inputs, optimizer steps per epoch)."""
    import argparse

    from myutils.data import RemovalDataset

    dataset = RemovalDataset(entries, kind, args.resolution, center_crop=not args.random_crop, random_flip=args.random_flip,
                             seed=args.seed, uint8=True)
    loader = prepare.make_dataloader(argparse.Namespace(**{**vars(args), "train_batch_size": args.sample_batch_size}), dataset, accelerator)
    samples_per_epoch = args.sample_batch_size * args.sample_batches_per_epoch * args.group_size
    return loader, args.num_inner_epochs * (samples_per_epoch // args.train_batch_size) // user_accumulation


def content_ids(entries, indices, cache):
    """60-bit integer ids of the inputs' content (gatherable across processes), hashed once per input."""
    for i in indices.tolist():
        if i not in cache:
            cache[i] = int(content_key(entries[i].paths["source"], entries[i].paths["mask"])[:15], 16)
    return torch.tensor([cache[i] for i in indices.tolist()])


@torch.no_grad()
def evaluate(model, sampler, args, samples, reward_model, full=True, accelerator=None):
    """Held-out evaluation on fixed inputs from fixed noises: the deterministic sampler (DDIM eta 0 /
    the flow ODE; eval_reward*, and the mean per-step KL between the stochastic policy and the
    start, LoRA off, along its path), and the stochastic sampler that training optimises (fixed
    per-sample seeds; eval_sde_reward*). full=False: the deterministic rewards only. Runs in chunks of
    --eval_batch_size inputs, so memory does not grow with --eval_samples; a sample's noise depends on
    its index only, so the chunk size changes nothing but rounding. With an accelerator, every rank
    (each holding all the samples) evaluates every world_size-th chunk and all get every chunk's result,
    in order: the same numbers as one process, in 1/world_size of the time the others used to wait."""
    starts = list(range(0, len(samples), args.eval_batch_size))
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    chunks = [(i, _evaluate_chunk(model, sampler, args, samples[i:i + args.eval_batch_size], reward_model, full))
              for i in starts[rank::world]]
    if world > 1:
        from accelerate.utils import gather_object

        chunks = sorted(gather_object(chunks), key=lambda c: c[0])
    chunks = [c for _, c in chunks]
    parts = {k: torch.cat([c["parts"][k] for c in chunks]) for k in chunks[0]["parts"]}
    total = torch.cat([c["total"] for c in chunks])
    metrics = {f"eval_reward_{k}": v.mean().item() for k, v in parts.items()}
    metrics["eval_reward"] = total.mean().item()
    per_sample = [{"reward": float(r), **{k: float(v[i]) for k, v in parts.items()}} for i, r in enumerate(total.tolist())]
    images = torch.cat([c["images"] for c in chunks])
    if not full:
        return metrics, images, per_sample
    metrics["eval_kl_to_start"] = torch.cat([c["kl"] for c in chunks]).mean().item()
    sde = {k: torch.cat([c["sde_parts"][k] for c in chunks]) for k in chunks[0]["sde_parts"]}
    metrics.update({f"eval_sde_reward_{k}": v.mean().item() for k, v in sde.items()},
                   eval_sde_reward=torch.cat([c["sde_total"] for c in chunks]).mean().item())
    return metrics, images, per_sample


def _evaluate_chunk(model, sampler, args, samples, reward_model, full):
    """evaluate() on one chunk: per-sample rewards (CPU), the KL per sample averaged over steps, the
    deterministic results decoded (CPU)."""
    from pipelines.rl_sampler import sample_trajectory

    device = sampler.vae.device
    b = expand_batch(to_device(stack_samples(samples), device), sampler, 1)
    x = sampler.start(b, sample_generators({"epoch": [10_000] * len(samples), "index": b["index"]}, args.seed))
    kls = []
    for j in range(len(sampler.timesteps)):
        out = sampler.output(model, x, j, b)  # one policy pass serves both the KL and the deterministic step
        if full and j < sampler.num_train_steps:
            mean, scale = sampler.step(out, j, x)
            with adapters.disabled(model):
                ref_mean, _ = sampler.distribution(model, x, j, b)
            kls.append(gaussian_kl(mean, ref_mean, scale).float().cpu())
        x = sampler.step(out, j, x, deterministic=True)[0]
    parts, total = compute_rewards(args, reward_model, sampler, x, b)
    chunk = {"parts": parts, "total": total, "images": sampler.decode(x).cpu()}
    if full:
        chunk["kl"] = torch.stack(kls, 1).mean(1)
        gens = sample_generators({"epoch": [10_001] * len(samples), "index": b["index"]}, args.seed)
        sde = sample_trajectory(sampler, model, b, gens)
        chunk["sde_parts"], chunk["sde_total"] = compute_rewards(args, reward_model, sampler, sde["latents"][:, -1], b)
    return chunk


@torch.no_grad()
def collect_samples(args, sampler, model, stream, pool, reward_model, device):
    """Sample --sample_batches_per_epoch batches (each input --group_size times) with the current
    policy, recording trajectories; rewards are computed in `pool` while the next batch samples.
    Returns (batches, total rewards (N,), {component: (N,)}) for this process."""
    from pipelines.rl_sampler import sample_trajectory

    batches, futures = [], []
    for _ in range(args.sample_batches_per_epoch):
        _, batch = next(stream)
        b = expand_batch(to_device(batch, device), sampler, args.group_size)
        gens = sample_generators({"epoch": b["epoch"], "index": b["noise_index"]}, args.seed)
        # pairwise: both samples of an input start from the same latents (own seed space), their steps differ
        starts = (sample_generators({"epoch": b["epoch"] + 2_000_000, "index": b["index"]}, args.seed)
                  if args.algorithm == "pairwise" else None)
        b.update(sample_trajectory(sampler, model, b, gens, start_generators=starts))
        futures.append(pool.submit(compute_rewards, args, reward_model, sampler, b["latents"][:, -1], b))
        batches.append(b)
    parts = [f.result() for f in futures]
    return batches, torch.cat([total for _, total in parts]), {k: torch.cat([p[k] for p, _ in parts]) for k in parts[0][0]}


def reward_logs(accelerator, components, step):
    """Mean/std of each reward component over all processes (and a histogram of each)."""
    logs = {}
    for k, v in components.items():
        all_v = accelerator.gather(v.to(accelerator.device))
        logs[f"reward_{k}_mean"], logs[f"reward_{k}_std"] = all_v.mean().item(), all_v.std(unbiased=False).item()
        validation.log_histogram(accelerator, f"reward_{k}", all_v, step)
    return logs


EPOCH_SAMPLES = "epoch_samples_{}.pt"  # in a checkpoint taken inside an epoch, one per process


def save_epoch_samples(folder, accelerator, start_step, batches, advantages, logs):
    torch.save({"start_step": start_step, "batches": batches, "advantages": advantages.cpu(), "logs": logs},
               os.path.join(folder, EPOCH_SAMPLES.format(accelerator.process_index)))


def load_epoch_samples(args, accelerator, start_step):
    """(batches, advantages, logs) of the epoch that began at optimizer step start_step, from the
    checkpoint being resumed: a run stopped inside an epoch goes on with the samples it trained on."""
    path = os.path.join(checkpoint.resume_path(args), EPOCH_SAMPLES.format(accelerator.process_index))
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; this checkpoint was taken inside an epoch and needs the epoch's samples of every process "
                        "(resume with the number of processes that wrote it)")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved["start_step"] != start_step:
        raise UserError(f"{path}: holds the epoch from step {saved['start_step']}, but the run resumes inside the one from step {start_step}")
    return [to_device(b, accelerator.device) for b in saved["batches"]], saved["advantages"].to(accelerator.device), saved["logs"]


def first_sampled_epoch(global_step, steps_per_epoch):
    """How many epochs' samples were drawn before step global_step: a run resumed inside an epoch
    reloads that epoch's samples, so its sampling stream starts at the next one."""
    return -(-global_step // steps_per_epoch)


def policy_update(args, accelerator, run, model, sampler, batches, advantages, optimizer, lr_scheduler, params, seed, logs, start_step):
    """--num_inner_epochs passes over the samples: for a random --timestep_fraction of the trainable
    steps of each trajectory, re-evaluate the recorded step's log-prob under the current LoRA and take
    the REINFORCE, PPO-clipped or pairwise loss (+ --kl_coef x the per-step KL to the LoRA-off
    reference), accumulating gradients over the steps; each micro-batch ends with run.end_of_step.
    The epoch began at optimizer step start_step: a checkpoint taken during it saves the samples, and
    a run resumed inside it skips the micro-batches already trained (drawing the same random order)."""
    done = (run.global_step - start_step) * args.gradient_accumulation_steps
    run.mid_epoch_state = lambda folder: save_epoch_samples(folder, accelerator, start_step, batches, advantages, logs)
    micro = 0
    raw = accelerator.unwrap_model(model)
    data = {k: torch.cat([b[k] for b in batches]) for k in batches[0] if torch.is_tensor(batches[0][k])}
    n_steps = train_timesteps(args)
    raw.train()
    for inner in range(args.num_inner_epochs):
        g = torch.Generator().manual_seed(seed * 101 + inner)
        if args.algorithm == "pairwise":  # shuffle pairs, keep each pair's two samples next to each other
            order = (2 * torch.randperm(len(advantages) // 2, generator=g, device=g.device)[:, None] + torch.arange(2)).reshape(-1)
        else:
            order = torch.randperm(len(advantages), generator=g, device=g.device)
        for start in range(0, len(order), args.train_batch_size):
            idx = order[start:start + args.train_batch_size]
            steps = torch.randperm(sampler.num_train_steps, generator=g, device=g.device)[:n_steps]
            on_device = to_gpu_async(idx, advantages.device)  # once, without waiting for the GPU
            cond = {k: v[on_device if v.device == advantages.device else idx] for k, v in data.items()}  # bookkeeping stays on the CPU
            adv = advantages[on_device]
            metrics = {}
            for j in steps.tolist():
                micro += 1
                if micro <= done:
                    continue
                with accelerator.accumulate(model):
                    x = cond["latents"][:, j]
                    mean, scale = sampler.distribution(model, x, j, cond)
                    log_prob = gaussian_log_prob(cond["latents"][:, j + 1], mean, scale)
                    if args.algorithm == "reinforce":
                        loss = reinforce_loss(log_prob, adv)
                    elif args.algorithm == "pairwise":
                        loss = pairwise_preference_loss(log_prob, cond["log_probs"][:, j], adv, args.beta, args.clip_range)
                    else:
                        loss, approx_kl, clip_fraction = ppo_loss(log_prob, cond["log_probs"][:, j], adv, args.clip_range)
                        metrics.update(approx_kl=approx_kl, clip_fraction=clip_fraction)  # read when logged
                    if args.kl_coef > 0:
                        with torch.no_grad(), adapters.disabled(raw):
                            ref_mean, _ = sampler.distribution(raw, x, j, cond)
                        kl = kl_in_unit(gaussian_kl(mean, ref_mean, scale).mean(), args.kl_unit, sampler.step_length(j))
                        loss = loss + args.kl_coef * kl
                        metrics["kl_to_reference"] = kl
                    if run.record_loss(loss):
                        accelerator.backward(loss)
                    run.optimizer_step(optimizer, lr_scheduler, params)
                run.end_of_step(**metrics, **logs)
    run.mid_epoch_state = None
