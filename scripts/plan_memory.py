#!/usr/bin/env python
"""Plan a real-scale run before renting GPUs: per-GPU memory and FLOPs per training step of each
training script's shipped configuration, with the real SDXL-inpainting UNet (and FLUX.1-Fill's
transformer for Flow-GRPO) built on the meta device from configs/real/ (nothing is downloaded or
allocated).

    python scripts/plan_memory.py                                   # every script, 512 and 1024 px, Markdown table
    python scripts/plan_memory.py --scripts train_RORem_dpo.py --resolutions 1024 --batch_size 4

For each script the arguments come from its own parser with its config (configs/*.yaml), so LoRA vs
full, batch size, mixed precision, gradient checkpointing, EMA and LoRA rank are what a run would
use; --batch_size overrides the per-GPU batch. Memory per GPU (myutils/planner.py): weights,
gradients (in DDP's buckets) and AdamW states by precision (full fine-tunes also under DeepSpeed
ZeRO-2 over --num_gpus, with its reduce bucket), the other models a script holds (VAE in fp32; the
discriminator as reward; a frozen reference/teacher copy only for full fine-tunes: a LoRA's reference
is the same UNet with adapters off; EMA weights), and the peak of a step, measured at the script's
batch on the meta model with flash attention's memory: the larger of what forward + backward allocate
(+ autocast's weight copies), AdamW's update temporaries, and what runs beside the step (VAE encoding
in chunks; RL sampling and evaluation forwards). FLOPs (PyTorch's FLOP counter): every UNet pass of one
optimizer step per GPU (training passes forward + backward, reference/teacher passes forward only; RL:
sampling, trained steps and the KL reference) at --peak_tflops, plus the VAE encodes of uncached latents
at --peak_tflops_fp32. Verdict: whether the total fits --gpu_memory_gb, and steps per hour at
--utilisation.
"""
import argparse
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from myutils.args import POSITIVE, POSITIVE_REAL, integer, real  # noqa: E402
from myutils.errors import UserError, output_file, run_cli  # noqa: E402

# per batch element: UNet passes with backward, forward-only passes, VAE encodes (uncached);
# `what` names the passes for the table; `script` the training script when the key is not its name
SCRIPTS = {
    "train_RORem.py": {"config": "train_RORem.yaml", "train": 1, "frozen": 0, "encodes": 2, "what": "1 fwd+bwd"},
    "train_RORem_discriminator.py": {"config": "train_RORem_discriminator.yaml", "train": 1, "frozen": 0, "encodes": 2,
                                     "what": "1 encoder fwd+bwd", "discriminator": True},
    "train_RORem_dpo.py": {"config": "dpo_config.yaml", "train": 2, "frozen": 2, "encodes": 3, "what": "2 fwd+bwd, 2 reference fwd",
                           "reference": True},
    "train_RORem_kto.py": {"config": "kto_config.yaml", "train": 1, "frozen": 1, "encodes": 2, "what": "1 fwd+bwd, 1 reference fwd",
                           "reference": True},
    "train_RORem_lcm.py": {"config": "lcm_config.yaml", "train": 1, "frozen": 3, "encodes": 2,
                           "what": "1 fwd+bwd, 2 teacher fwd (CFG), 1 target fwd", "reference": True},
    "train_RORem_draft.py": {"config": "draft_config.yaml", "train": None, "frozen": None, "encodes": 2, "direct": True,
                             "what": "the chain: K fwd+bwd (their graphs held together), n - K fwd; the reward's fwd+bwd to its input",
                             "reward": True, "argv": ["--discriminator_path", "d"]},
    "draft_lcm": {"script": "train_RORem_draft.py", "label": "train_RORem_draft.py (LCM student)", "config": "draft_lcm_config.yaml",
                  "train": None, "frozen": None, "encodes": 2, "direct": True, "reward": True,
                  "what": "AlignProp through the 4 LCM steps (each call recomputed in backward); the reward's fwd+bwd to its input",
                  "argv": ["--discriminator_path", "d", "--student_lora", "s"], "lora": (64, "lcm")},
    "train_RORem_ddpo.py": {"config": "ddpo_config.yaml", "train": None, "frozen": None, "encodes": 0,
                            "what": "per epoch: sampling fwd + trained steps fwd+bwd", "reward": True},
    "flow_grpo": {"script": "train_RORem_ddpo.py", "config": "flow_grpo_config.yaml", "train": None, "frozen": None, "encodes": 0,
                  "what": "FLUX.1-Fill, per epoch: sampling fwd + trained steps fwd+bwd", "reward": True, "flux": True,
                  "argv": ["--pretrained_model_name_or_path", "black-forest-labs/FLUX.1-Fill-dev"]},
}
VAE_CHUNK = 4  # myutils/sdxl_inpaint.py VAE_ENCODE_CHUNK: images the VAE encodes or decodes at a time


def script_args(name, batch_size=None):
    """The script's own arguments from its config (required paths filled with placeholders)."""
    script = SCRIPTS[name].get("script", name)
    module = importlib.import_module(script[:-3])
    argv = ["--config", os.path.join(ROOT, "configs", SCRIPTS[name]["config"]), "--output_dir", "plan", "--meta_path", "m.json"]
    if script == "train_RORem_dpo.py":
        argv = ["--config", os.path.join(ROOT, "configs", SCRIPTS[name]["config"]), "--output_dir", "plan", "--preference_data", "p.json"]
    if script == "train_RORem_ddpo.py":
        argv += ["--discriminator_path", "d"]
    argv += SCRIPTS[name].get("argv", [])
    args = module.parse_args(argv)
    if batch_size:
        args.train_batch_size = batch_size
    return args


def gb(x):
    return x / 2 ** 30


def plan(args):
    from diffusers.utils import logging as dlogging

    from myutils import planner as pl
    from training import rl_loop

    dlogging.set_verbosity_error()  # casting meta models to fp16 warns once per model
    unet_cfg, vae_cfg = args.unet_config, args.vae_config
    n_unet, n_unet_tensors = pl.count(pl.meta_unet(unet_cfg).parameters())
    n_disc, n_disc_tensors = pl.count(pl.meta_discriminator(unet_cfg).parameters())
    vae = pl.meta_vae(vae_cfg)
    n_vae, _ = pl.count(vae.parameters())
    flux = any(SCRIPTS[n].get("flux") for n in args.scripts)
    n_flux = pl.count(pl.meta_flux(args.flux_config).parameters()) if flux else (0, 0)
    n_flux_vae = pl.count(pl.meta_vae(args.flux_vae_config).parameters())[0] if flux else 0
    rows, measured = [], {}

    def build(kind, precision, lora_rank, targets=pl.ATTENTION):
        """The trained model on the meta device (+ the UNet it is built from, for the discriminator)."""
        if kind == "flux":
            model = pl.meta_flux(args.flux_config, pl.DTYPES[precision])
            unet = None
        else:
            unet = pl.meta_unet(unet_cfg, pl.DTYPES[precision])
            model = pl.meta_discriminator(unet_cfg, pl.DTYPES[precision], unet) if kind == "discriminator" else unet
        if lora_rank:
            pl.add_meta_lora(model, lora_rank, targets)
        return model, unet

    def measure(kind, res, batch, lora_rank, backward, checkpointing, precision, targets=pl.ATTENTION, frozen=False):
        """frozen: no weight trains, the gradient goes to the input (a reward model in direct reward fine-tuning)."""
        key = (kind, res, batch, lora_rank, backward, checkpointing, precision, tuple(targets), frozen)
        if key not in measured:
            model, unet = build(kind, precision, lora_rank, targets)
            if frozen:
                model.requires_grad_(False)
            if kind == "flux":
                measured[key] = pl.measure_flux(model, res, batch, backward, checkpointing)
            else:
                measured[key] = pl.measure_unet(unet, res, batch, backward, checkpointing,
                                                discriminator=model if kind == "discriminator" else None, input_grad=frozen)
        return measured[key]

    for name in args.scripts:
        spec, sa = SCRIPTS[name], script_args(name, args.batch_size)
        precision = sa.mixed_precision if sa.mixed_precision in ("fp16", "bf16") else "fp32"
        lora = not sa.train_full if hasattr(sa, "train_full") else bool(getattr(sa, "use_lora", False))
        rank = getattr(sa, "lora_rank", None) or getattr(sa, "rank", 4)
        targets = tuple(getattr(sa, "lora_target_modules", None) or pl.ATTENTION)  # LCM: 14 kinds of layers, not 4
        if "lora" in spec:  # a LoRA file's own shape (the released 4-step LoRA: rank 64 on 14 kinds of layers)
            rank, targets = spec["lora"][0], importlib.import_module("train_RORem_lcm").LCM_LORA_TARGETS
        kind = "flux" if spec.get("flux") else "discriminator" if spec.get("discriminator") else "unet"
        base, base_tensors = {"flux": n_flux, "discriminator": (n_disc, n_disc_tensors), "unet": (n_unet, n_unet_tensors)}[kind]
        if lora:  # the LoRA's parameters (+ the discriminator's head, which trains in full)
            model = build(kind, "fp32", 0)[0]
            head = [p for n, p in model.named_parameters() if n.startswith("cls_pred")] if kind == "discriminator" else []
            lora_params = pl.count(pl.add_meta_lora(model, rank, targets) + head)
        ckpt = bool(getattr(sa, "gradient_checkpointing", False))
        ema = bool(getattr(sa, "use_ema", False))
        rl = spec["train"] is None and not spec.get("direct")
        b = sa.train_batch_size
        if spec.get("direct"):  # the UNet graphs alive at once: DRaFT-K's K; AlignProp (recomputed) and ReFL one
            n = int(sa.sample_steps * sa.strength)
            k = {"draft": sa.draft_k, "alignprop": n, "refl": 1}[sa.method]
            micro = b * (k if sa.method == "draft" else 1)
        else:
            micro = b if rl else b * spec["train"]  # DPO's preferred and rejected halves run as one batch
        vae_bytes = (n_flux_vae if kind == "flux" else n_vae) * 4  # the VAE stays fp32
        for res in args.resolutions:
            modes = [("LoRA r%d" % rank, False)] if lora else [("full, DDP", False), (f"full, ZeRO-2 x{args.num_gpus}", True)]
            for mode, zero2 in modes:
                if lora:
                    state = pl.training_state_bytes(lora_params[0], lora_params[1], base, precision, "lora")
                    trainable = lora_params[0]
                else:
                    state = pl.training_state_bytes(base, base_tensors, 0, precision, "full", zero2, args.num_gpus)
                    trainable = base
                other = vae_bytes
                if spec.get("reference") and not lora:
                    other += n_unet * pl.DTYPE_BYTES[precision]  # a frozen copy (reference, teacher)
                if spec.get("reward"):
                    other += n_disc * pl.DTYPE_BYTES[precision]
                r = rank if lora else 0
                if spec.get("direct") and lora:
                    other += trainable * 4  # the start's copy of the LoRA (the drift's and validation's reference)
                train_plain = measure(kind, res, micro, r, True, False, precision, targets)
                train_ckpt = measure(kind, res, micro, r, True, True, precision, targets)
                train = train_ckpt if ckpt else train_plain  # checkpointing recomputes the forward: more FLOPs
                vae_res = res
                if spec.get("direct"):
                    fwd = measure(kind, res, 1, r, False, False, precision, targets)["forward_flops"]
                    reward = measure("discriminator", res, b, 0, True, False, precision, frozen=True)
                    # the reward's backward runs while the UNet graphs are alive
                    train = {**train, "step_peak_bytes": max(train["step_peak_bytes"], train["activation_bytes"] + reward["step_peak_bytes"])}
                    side = max(max(measure(kind, res, n_, r, False, False, precision, targets)["step_peak_bytes"]
                                   for n_ in (b, sa.validation_batch_size)), pl.vae_encode_peak_bytes(vae, vae_res, VAE_CHUNK))
                    if sa.method == "refl":  # the random step among the last L: on average n - 1 - (L - 1) / 2 no-grad steps first
                        last = min(n, sa.refl_last or max(1, n // 4))
                        plain_steps, graphs = n - 1 - (last - 1) / 2, train["step_flops"]
                    elif sa.method == "alignprop":  # every call differentiated, and recomputed in backward
                        plain_steps, graphs = n, n * train["step_flops"]
                    else:
                        plain_steps, graphs = n - k, train["step_flops"]
                    drift = k * b * fwd if sa.reg_coef else 0
                    flops = sa.gradient_accumulation_steps * (plain_steps * b * fwd + graphs + reward["step_flops"] + drift)
                    encodes = spec["encodes"] + ("gt" in sa.rewards)
                    vae_flops = b * sa.gradient_accumulation_steps * encodes * pl.vae_encode_flops(vae, res)
                elif rl:  # sampling and evaluation run no-grad forwards of their own batch sizes; images decode in chunks
                    cfg = 2 if getattr(sa, "guidance_scale", 1.0) > 1 and kind != "flux" else 1
                    side = max(measure(kind, res, n * cfg, r, False, False, precision)["step_peak_bytes"]
                               for n in (sa.sample_batch_size * sa.group_size, sa.eval_batch_size))
                    side = max(side, pl.vae_encode_peak_bytes(vae, vae_res, VAE_CHUNK))
                    fwd = measure(kind, res, 1, 0, False, False, precision)["forward_flops"]
                    samples = sa.sample_batch_size * sa.sample_batches_per_epoch * sa.group_size
                    denoised = int(sa.sample_steps * sa.strength)
                    trained = rl_loop.train_timesteps(sa)
                    steps = sa.num_inner_epochs * samples // b // sa.gradient_accumulation_steps
                    per_sample_step = train["step_flops"] / micro + (fwd if sa.kl_coef > 0 else 0)  # + the LoRA-off reference for the KL
                    flops = (samples * denoised * cfg * fwd + samples * trained * per_sample_step) / steps
                    vae_flops = 0.0
                else:
                    fwd = measure(kind, res, 1, 0, False, False, precision)["forward_flops"]
                    cached = getattr(sa, "cache_latents", False)
                    side = 0 if cached else pl.vae_encode_peak_bytes(vae, vae_res, VAE_CHUNK)
                    vae_flops = 0 if cached else b * sa.gradient_accumulation_steps * spec["encodes"] * pl.vae_encode_flops(vae, res)
                    flops = sa.gradient_accumulation_steps * (train["step_flops"] + b * spec["frozen"] * fwd)
                peak = pl.peak_bytes(state, train["step_peak_bytes"], trainable, precision, "lora" if lora else "full", zero2,
                                     args.num_gpus, ema, other_transient=side)
                total = peak["peak"] + other
                # the UNet/transformer at the fp16/bf16 rate, the fp32 VAE at the fp32 rate
                seconds = (flops / args.peak_tflops + vae_flops / args.peak_tflops_fp32) / (1e12 * args.utilisation)
                act, act_ckpt = train_plain["activation_bytes"], train_ckpt["activation_bytes"]
                rows.append({"key": name, "script": spec.get("label", spec.get("script", name) + (" (FLUX.1-Fill)" if kind == "flux" else "")),
                             "res": res, "mode": mode, "batch": b, "passes": spec["what"], **{k: gb(v) for k, v in state.items()},
                             "other": gb(other + (trainable * 4 if ema else 0)), "act": gb(act), "act_ckpt": gb(act_ckpt), "ckpt": ckpt,
                             "transient": gb(peak["transient"]), "total": gb(total), "fits": total <= args.gpu_memory_gb * 2 ** 30,
                             "tflop": (flops + vae_flops) / 1e12, "steps_per_hour": 3600 / seconds})
    return rows, {"unet": n_unet, "discriminator": n_disc, "vae": n_vae, "flux": n_flux[0]}


def table(rows, args, counts):
    flux = f", FLUX.1-Fill transformer {counts['flux'] / 1e9:.2f}B" if counts["flux"] else ""
    lines = [f"Per GPU, {args.gpu_memory_gb:g} GB budget, steps/hour at {args.utilisation:.0%} of {args.peak_tflops:g} TFLOPS "
             f"(the fp32 VAE at {args.peak_tflops_fp32:g}; UNet {counts['unet'] / 1e9:.3f}B parameters, discriminator "
             f"{counts['discriminator'] / 1e9:.3f}B, VAE {counts['vae'] / 1e6:.1f}M{flux}). Memory in GiB. Activations: alive at "
             "the end of the forward pass without / with gradient checkpointing (the config's choice marked *). Peak of the step: "
             "the largest of what forward + backward allocate (activations, recompute; + autocast's weight copies), AdamW's "
             "update temporaries, and what runs beside the step (VAE encoding, RL sampling and evaluation). Total = weights + "
             "grads + AdamW + other models (VAE fp32, reference/teacher copies, the reward model, EMA) + that peak.", "",
             "| script | px | mode | batch/GPU | weights | grads | AdamW | other models | activations | step peak | total | fits | "
             "TFLOP/step | steps/h |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        act = f"{r['act']:.1f}{'' if r['ckpt'] else '*'} / {r['act_ckpt']:.1f}{'*' if r['ckpt'] else ''}"
        lines.append(f"| {r['script']} | {r['res']} | {r['mode']} | {r['batch']} | {r['weights']:.1f} | {r['gradients']:.2f} | "
                     f"{r['optimizer']:.2f} | {r['other']:.1f} | {act} | {r['transient']:.1f} | {r['total']:.1f} | "
                     f"{'yes' if r['fits'] else '**no**'} | {r['tflop']:.1f} | {r['steps_per_hour']:.0f} |")
    return "\n".join(lines)


def plan_args(**overrides):
    """This script's defaults with some replaced: how other tools (bench/bench_data.py,
    scripts/gpu_check.py) call plan()."""
    args = build_parser().parse_args([])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"plan_memory has no argument {key!r}")
        setattr(args, key, value)
    return args


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    p.add_argument("--resolutions", type=integer(64), nargs="+", default=[512, 1024])
    p.add_argument("--batch_size", type=POSITIVE, default=None, help="per-GPU batch (default: each config's)")
    p.add_argument("--num_gpus", type=POSITIVE, default=8)
    p.add_argument("--gpu_memory_gb", type=POSITIVE_REAL, default=80.0)
    p.add_argument("--peak_tflops", type=POSITIVE_REAL, default=312.0, help="A100 dense fp16/bf16")
    p.add_argument("--peak_tflops_fp32", type=POSITIVE_REAL, default=156.0,
                   help="the fp32 VAE's rate: A100 TF32, which PyTorch uses for fp32 convolutions by default "
                        "(torch.backends.cudnn.allow_tf32); 19.5 with it off")
    p.add_argument("--utilisation", type=real(above=0, maximum=1), default=0.4, help="fraction of peak a step achieves")
    p.add_argument("--output", default=None, help="also write the table to this Markdown file")
    p.add_argument("--unet_config", default=os.path.join(ROOT, "configs", "real", "sdxl_inpaint_unet.json"))
    p.add_argument("--vae_config", default=os.path.join(ROOT, "configs", "real", "sdxl_vae.json"))
    p.add_argument("--flux_config", default=os.path.join(ROOT, "configs", "real", "flux_fill_transformer.json"))
    p.add_argument("--flux_vae_config", default=os.path.join(ROOT, "configs", "real", "flux_vae.json"))
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if any(r % 64 for r in args.resolutions):
        raise UserError(f"--resolutions {args.resolutions}: each must be a multiple of 64")
    for flag in ("unet_config", "vae_config", "flux_config", "flux_vae_config"):
        if not os.path.isfile(getattr(args, flag)):
            raise UserError(f"--{flag} {getattr(args, flag)}: file not found")
    if args.output:
        output_file(args.output, "--output")
    rows, counts = plan(args)
    text = table(rows, args, counts)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return rows, counts


if __name__ == "__main__":
    run_cli(main)
