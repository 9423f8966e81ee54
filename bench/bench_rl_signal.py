#!/usr/bin/env python
"""How many samples online RL needs before its gradient says more than its noise, per reward.

    .venv/bin/python bench/bench_rl_signal.py --work_dir .demo      # after `make demo`; ~4 min on 2 cores

train_RORem_ddpo.py's own loop, with the demo's settings (configs/toy_ddpo.yaml) from the demo's
trained remover, at a learning rate of 1e-12 so the weights stay where they are: every epoch's
policy gradient (the mean of its optimizer steps' gradients, clipping off) is then an independent
estimate g_e = g + noise_e of the same gradient g. Across epochs, mean(g_i . g_j) (i != j) estimates
|g|^2 and mean|g_e|^2 - |g|^2 the noise, which shrinks as 1/samples; their ratio is the number of
samples at which one estimate's signal equals its noise (SNR 1). The demo's run draws
epochs x inputs x group size samples in all; far fewer than the SNR-1 count means its updates are
mostly noise, whatever the implementation. Printed per reward (the GT reward, the discriminator).
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_RORem_ddpo  # noqa: E402
from training import loop  # noqa: E402


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def epoch_gradients(argv, epochs):
    """(epochs, parameters) mean policy gradient of each epoch, from the loop's own optimizer steps."""
    grads, original = [], loop.TrainingRun.optimizer_step

    def step(self, optimizer, lr_scheduler, params, ema=None):
        if self.acc.sync_gradients:
            grads.append(torch.cat([p.grad.detach().flatten().double() for p in params if p.grad is not None]).cpu())
        return original(self, optimizer, lr_scheduler, params, ema)

    loop.TrainingRun.optimizer_step = step
    try:
        reset_accelerate()
        train_RORem_ddpo.main(argv)
    finally:
        loop.TrainingRun.optimizer_step = original
    g = torch.stack(grads)
    return g[: len(g) // epochs * epochs].reshape(epochs, len(g) // epochs, -1).mean(1)


def signal_and_noise(estimates, samples_each):
    """(|g|^2, its jackknife standard error over the estimates, noise variance per sample, mean
    cosine between estimates) from independent estimates of one gradient."""
    def signal_of(e):
        dots = e @ e.T
        return dots[~torch.eye(len(e), dtype=torch.bool)].mean().item()

    dots = estimates @ estimates.T
    off = ~torch.eye(len(estimates), dtype=torch.bool)
    signal = dots[off].mean().item()
    n = len(estimates)
    leave_one_out = np.array([signal_of(torch.cat([estimates[:i], estimates[i + 1:]])) for i in range(n)])
    stderr = float(np.sqrt((n - 1) / n * ((leave_one_out - leave_one_out.mean()) ** 2).sum()))
    noise = samples_each * (dots.diag().mean().item() - signal)
    norms = dots.diag().sqrt()
    cosine = (dots / (norms[:, None] * norms[None, :]))[off].mean().item()
    return signal, stderr, noise, cosine


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work_dir", default=".demo", help="a finished demo's folder (its models, remover, data, discriminator)")
    p.add_argument("--epochs", type=int, default=12, help="independent gradient estimates per reward")
    p.add_argument("--rewards", nargs="+", default=["gt=1", "discriminator=1"])
    args = p.parse_args()
    w = os.path.abspath(args.work_dir)
    if not os.path.isfile(f"{w}/rl/final_metrics.json"):
        sys.exit(f"error: {w} holds no finished demo (no rl/final_metrics.json): run `make demo` first, or give --work_dir")
    import json

    with open(f"{w}/rl/final_metrics.json") as f:
        demo = json.load(f)["args"]
    per_epoch = demo["sample_batch_size"] * demo["sample_batches_per_epoch"] * demo["group_size"]
    drawn = per_epoch * demo["num_train_epochs"]
    print(f"demo's online RL: {demo['num_train_epochs']} epochs x {per_epoch} samples = {drawn} samples")
    print("| reward | epochs | samples per estimate | signal |g|^2 (+- std. error) | noise per sample | cosine between estimates | "
          "samples for SNR 1 | demo's samples / that |")
    print("|---|---|---|---|---|---|---|---|")
    for reward in args.rewards:
        with tempfile.TemporaryDirectory() as out:
            g = epoch_gradients(["--config", os.path.join(ROOT, "configs", "toy_ddpo.yaml"),
                                 "--pretrained_model_name_or_path", f"{w}/models/toy_sdxl_inpaint", "--pretrained_unet",
                                 f"{w}/remover/unet", "--meta_path", f"{w}/data/train/meta.json", "--validation_meta_path",
                                 f"{w}/data/heldout/meta.json", "--discriminator_path", f"{w}/discriminator", "--reward", reward,
                                 "--output_dir", out, "--seed", "0", "--learning_rate", "1e-12", "--max_grad_norm", "0",
                                 "--num_train_epochs", str(args.epochs), "--eval_epochs", "0", "--eval_samples", "2",
                                 "--checkpointing_epochs", "0", "--report_to", "none"], args.epochs)
        signal, stderr, noise, cosine = signal_and_noise(g, per_epoch)
        # SNR 1 at noise / signal samples; with the signal two standard errors higher, at least this many
        low = noise / (signal + 2 * stderr) if signal + 2 * stderr > 0 else float("inf")
        needed = f"{noise / signal:.0f} (at least {low:.0f})" if signal > 0 else f"not measurable (at least {low:.0f})"
        ratio = f"{drawn * signal / noise:.3f}" if signal > 0 else "-"
        print(f"| {reward.split('=')[0]} | {args.epochs} | {per_epoch} | {signal:.2e} +- {stderr:.1e} | {noise:.2e} | {cosine:+.4f} | "
              f"{needed} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
