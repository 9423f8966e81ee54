#!/usr/bin/env python
"""Plan a real-scale run before renting GPUs: per-GPU memory and FLOPs per training step of each
training script's shipped configuration, with the real SDXL-inpainting UNet built on the meta device
from configs/real/ (nothing is downloaded or allocated).

    python scripts/plan_memory.py                                   # every script, 512 and 1024 px, Markdown table
    python scripts/plan_memory.py --scripts train_RORem_dpo.py --resolutions 1024 --batch_size 4

For each script the arguments come from its own parser with its config (configs/*.yaml), so LoRA vs
full, batch size, mixed precision, gradient checkpointing and LoRA rank are what a run would use;
--batch_size overrides the per-GPU batch. Memory per GPU: weights, gradients and AdamW states (by
precision; full fine-tunes also under DeepSpeed ZeRO-2 over --num_gpus), the other models a script
holds (VAE in fp32; the discriminator as reward; a frozen reference/teacher copy only for full
fine-tunes: a LoRA's reference is the same UNet with adapters off), and activations saved for backward,
measured per sample with saved-tensor hooks with and without gradient checkpointing (the recompute
peak of one block during backward is not included). FLOPs (PyTorch's FLOP counter): every UNet pass
of one optimizer step per GPU (training passes forward + backward, reference/teacher passes forward
only) plus the VAE encodes when latents are not cached. Verdict: whether the total fits
--gpu_memory_gb, and steps per hour at --utilisation of --peak_tflops.
"""
import argparse
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from myutils.errors import UserError, run_cli  # noqa: E402

# per batch element: UNet passes with backward, forward-only passes, VAE encodes (uncached);
# `what` names the passes for the table
SCRIPTS = {
    "train_RORem.py": {"config": "train_RORem.yaml", "train": 1, "frozen": 0, "encodes": 2, "what": "1 fwd+bwd"},
    "train_RORem_discriminator.py": {"config": "train_RORem_discriminator.yaml", "train": 1, "frozen": 0, "encodes": 2,
                                     "what": "1 encoder fwd+bwd", "discriminator": True},
    "train_RORem_dpo.py": {"config": "dpo_config.yaml", "train": 2, "frozen": 2, "encodes": 3, "what": "2 fwd+bwd, 2 reference fwd",
                           "reference": True},
    "train_RORem_lcm.py": {"config": "lcm_config.yaml", "train": 1, "frozen": 3, "encodes": 2,
                           "what": "1 fwd+bwd, 2 teacher fwd (CFG), 1 target fwd", "reference": True},
    "train_RORem_ddpo.py": {"config": "ddpo_config.yaml", "train": None, "frozen": None, "encodes": 0,
                            "what": "per epoch: sampling fwd + trained steps fwd+bwd", "reward": True},
}


def script_args(name, batch_size=None):
    """The script's own arguments from its config (required paths filled with placeholders)."""
    module = importlib.import_module(name[:-3])
    argv = ["--config", os.path.join(ROOT, "configs", SCRIPTS[name]["config"]), "--output_dir", "plan", "--meta_path", "m.json"]
    if name == "train_RORem_dpo.py":
        argv = ["--config", os.path.join(ROOT, "configs", SCRIPTS[name]["config"]), "--output_dir", "plan", "--preference_data", "p.json"]
    if name == "train_RORem_ddpo.py":
        argv += ["--discriminator_path", "d"]
    args = module.parse_args(argv)
    if batch_size:
        args.train_batch_size = batch_size
    return args


def gb(x):
    return x / 2 ** 30


def plan(args):
    from diffusers.utils import logging as dlogging

    from myutils import planner as pl

    dlogging.set_verbosity_error()  # casting meta models to fp16 warns once per model
    unet_cfg, vae_cfg = args.unet_config, args.vae_config
    n_unet, n_unet_tensors = pl.count(pl.meta_unet(unet_cfg).parameters())
    n_disc, n_disc_tensors = pl.count(pl.meta_discriminator(unet_cfg).parameters())
    vae = pl.meta_vae(vae_cfg)
    n_vae, _ = pl.count(vae.parameters())
    rows, measured = [], {}

    def measure(res, lora_rank, backward, checkpointing, precision, discriminator=False):
        key = (res, lora_rank, backward, checkpointing, precision, discriminator)
        if key not in measured:
            unet = pl.meta_unet(unet_cfg, pl.DTYPES[precision])
            d = pl.meta_discriminator(unet_cfg, pl.DTYPES[precision], unet) if discriminator else None
            if lora_rank:
                pl.add_meta_lora(d if d is not None else unet, lora_rank)
            measured[key] = pl.measure_unet(unet, res, 1, backward, checkpointing, discriminator=d)
        return measured[key]

    for name in args.scripts:
        spec, sa = SCRIPTS[name], script_args(name, args.batch_size)
        precision = sa.mixed_precision if sa.mixed_precision in ("fp16", "bf16") else "fp32"
        lora = not sa.train_full if hasattr(sa, "train_full") else bool(getattr(sa, "use_lora", False))
        rank = getattr(sa, "lora_rank", None) or getattr(sa, "rank", 4)
        is_disc = spec.get("discriminator", False)
        base, base_tensors = (n_disc, n_disc_tensors) if is_disc else (n_unet, n_unet_tensors)
        if lora:  # the LoRA's parameters (+ the discriminator's head, which trains in full)
            model = pl.meta_discriminator(unet_cfg) if is_disc else pl.meta_unet(unet_cfg)
            head = [p for n, p in model.named_parameters() if n.startswith("cls_pred")] if is_disc else []
            lora_params = pl.count(pl.add_meta_lora(model, rank) + head)
        for res in args.resolutions:
            modes = [("LoRA r%d" % rank, False)] if lora else [("full, DDP", False), (f"full, ZeRO-2 x{args.num_gpus}", True)]
            for mode, zero2 in modes:
                if lora:
                    state = pl.training_state_bytes(lora_params[0], lora_params[1], base, precision, "lora")
                else:
                    state = pl.training_state_bytes(base, base_tensors, 0, precision, "full", zero2, args.num_gpus)
                b = sa.train_batch_size
                other = n_vae * 4  # the VAE stays fp32
                if spec.get("reference") and not lora:
                    other += n_unet * pl.DTYPE_BYTES[precision]  # a frozen copy (reference, teacher)
                if spec.get("reward"):
                    other += n_disc * pl.DTYPE_BYTES[precision]
                train_plain = measure(res, rank if lora else 0, True, False, precision, is_disc)
                train_ckpt = measure(res, rank if lora else 0, True, True, precision, is_disc)
                ckpt = bool(getattr(sa, "gradient_checkpointing", False))
                train = train_ckpt if ckpt else train_plain  # checkpointing recomputes the forward: more FLOPs
                fwd = measure(res, 0, False, False, precision)["forward_flops"]
                if name == "train_RORem_ddpo.py":
                    samples = sa.sample_batch_size * sa.sample_batches_per_epoch * sa.group_size
                    trained = max(1, int(int(sa.sample_steps * sa.strength) * sa.timestep_fraction))
                    steps = sa.num_inner_epochs * samples // b // sa.gradient_accumulation_steps
                    cfg = 2 if sa.guidance_scale > 1 else 1
                    flops = (samples * int(sa.sample_steps * sa.strength) * cfg * fwd + samples * trained * train["step_flops"]) / steps
                    micro = b
                else:
                    enc = 0 if getattr(sa, "cache_latents", False) else spec["encodes"] * pl.vae_encode_flops(vae, res)
                    flops = b * sa.gradient_accumulation_steps * (spec["train"] * train["step_flops"] + spec["frozen"] * fwd + enc)
                    micro = b * spec["train"]
                act, act_ckpt = micro * train_plain["saved_bytes"], micro * train_ckpt["saved_bytes"]
                total = sum(state.values()) + other + (act_ckpt if ckpt else act)
                seconds = flops / (args.peak_tflops * 1e12 * args.utilisation)
                rows.append({"script": name, "res": res, "mode": mode, "batch": b, "passes": spec["what"], **{k: gb(v) for k, v in state.items()},
                             "other": gb(other), "act": gb(act), "act_ckpt": gb(act_ckpt), "ckpt": ckpt, "total": gb(total),
                             "fits": total <= args.gpu_memory_gb * 2 ** 30, "tflop": flops / 1e12, "steps_per_hour": 3600 / seconds})
    return rows, {"unet": n_unet, "discriminator": n_disc, "vae": n_vae}


def table(rows, args, counts):
    lines = [f"Per GPU, {args.gpu_memory_gb:g} GB budget, steps/hour at {args.utilisation:.0%} of {args.peak_tflops:g} TFLOPS "
             f"(UNet {counts['unet'] / 1e9:.3f}B parameters, discriminator {counts['discriminator'] / 1e9:.3f}B, VAE "
             f"{counts['vae'] / 1e6:.1f}M). Memory in GiB; activations without / with gradient checkpointing, the total uses the "
             "config's choice (marked *).", "",
             "| script | px | mode | batch/GPU | weights | grads | AdamW | other models | activations | total | fits | TFLOP/step | steps/h |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        act = f"{r['act']:.1f}{'' if r['ckpt'] else '*'} / {r['act_ckpt']:.1f}{'*' if r['ckpt'] else ''}"
        lines.append(f"| {r['script']} | {r['res']} | {r['mode']} | {r['batch']} | {r['weights']:.1f} | {r['gradients']:.2f} | "
                     f"{r['optimizer']:.2f} | {r['other']:.1f} | {act} | {r['total']:.1f} | {'yes' if r['fits'] else '**no**'} | "
                     f"{r['tflop']:.1f} | {r['steps_per_hour']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    p.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--batch_size", type=int, default=None, help="per-GPU batch (default: each config's)")
    p.add_argument("--num_gpus", type=int, default=8)
    p.add_argument("--gpu_memory_gb", type=float, default=80.0)
    p.add_argument("--peak_tflops", type=float, default=312.0, help="A100 dense fp16/bf16")
    p.add_argument("--utilisation", type=float, default=0.4, help="fraction of peak a step achieves")
    p.add_argument("--output", default=None, help="also write the table to this Markdown file")
    p.add_argument("--unet_config", default=os.path.join(ROOT, "configs", "real", "sdxl_inpaint_unet.json"))
    p.add_argument("--vae_config", default=os.path.join(ROOT, "configs", "real", "sdxl_vae.json"))
    args = p.parse_args(argv)
    if any(r % 64 for r in args.resolutions):
        raise UserError(f"--resolutions {args.resolutions}: each must be a multiple of 64")
    for flag in ("unet_config", "vae_config"):
        if not os.path.isfile(getattr(args, flag)):
            raise UserError(f"--{flag} {getattr(args, flag)}: file not found")
    rows, counts = plan(args)
    text = table(rows, args, counts)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return rows, counts


if __name__ == "__main__":
    run_cli(main)
