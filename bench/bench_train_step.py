#!/usr/bin/env python
"""Where a supervised training step spends its time, with and without --cache_latents.

    .venv/bin/python bench/bench_train_step.py            # about 2 minutes on 2 CPU cores

Runs train_RORem's own step (data loader, VAE encode, conditioning, UNet forward/backward, AdamW)
on tiny random-init components at several latent sizes, timing each phase. Prints ratios from one
run, since absolute times on a shared machine are noise: the cached/uncached step time, and the
share of the step spent outside the UNet forward and backward.
"""
import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_RORem  # noqa: E402
from myutils import sdxl_inpaint  # noqa: E402
from myutils.data import read_meta  # noqa: E402
from toy_world.data import write_toy_dataset  # noqa: E402
from toy_world.models import tiny_pipeline  # noqa: E402
from training import prepare  # noqa: E402


class Timer:
    def __init__(self):
        self.total = defaultdict(float)

    def wrap(self, name, fn):
        def timed(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            self.total[name] += time.perf_counter() - start
            return out
        return timed


def bench(latent, cache, steps, batch, work):
    res = latent * 2  # the tiny VAE has a factor-2 latent
    meta = os.path.join(work, f"data{res}", "meta.json")
    if not os.path.exists(meta):
        write_toy_dataset(os.path.dirname(meta), num=batch * 4, resolution=res, seed=0)
    model = os.path.join(work, "model")
    if not os.path.exists(model):
        tiny_pipeline("epsilon", tmp_dir=os.path.join(work, "tok")).save_pretrained(model)
    out = os.path.join(work, f"run{res}{'c' if cache else ''}")
    argv = ["--pretrained_model_name_or_path", model, "--meta_path", meta, "--output_dir", out, "--resolution", str(res),
            "--train_batch_size", str(batch), "--report_to", "none", "--skip_data_check", "--max_train_steps", str(steps)]
    args = train_RORem.parse_args(argv + (["--cache_latents"] if cache else []))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = prepare.make_accelerator(args)
    comps = prepare.Components(args, acc, torch.float32)
    unet = comps.unet
    unet.requires_grad_(True).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    loader = prepare.make_dataloader(args, prepare.make_train_dataset(args, read_meta(args.meta_path, "triplet"), "triplet", acc,
                                                            comps.vae, cache_keys=("GT", "masked")), acc)
    opt = torch.optim.AdamW(params, lr=1e-5)
    t = Timer()
    unet.forward = t.wrap("unet forward", unet.forward)
    real_encode = sdxl_inpaint.batch_latent_params  # what the training step's noised_inputs calls
    sdxl_inpaint.batch_latent_params = t.wrap("VAE encode", real_encode)
    warmup, measured = 3, 0
    batches = iter(prepare.epoch_batches(loader, 0, 1, 1000))
    try:
        for i in range(warmup + steps):
            if i == warmup:
                t.total.clear()
                start = time.perf_counter()
            t0 = time.perf_counter()
            _, b = next(batches)
            b = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in b.items()}
            t.total["data"] += time.perf_counter() - t0
            loss = train_RORem.diffusion_loss(unet, comps, b, res, 0)
            t0 = time.perf_counter()
            loss.backward()
            t.total["backward"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            t.total["optimizer"] += time.perf_counter() - t0
            measured += i >= warmup
        wall = time.perf_counter() - start
    finally:
        sdxl_inpaint.batch_latent_params = real_encode
    per_step = wall / measured
    unet_share = (t.total["unet forward"] + t.total["backward"]) / wall
    return per_step, unet_share, {k: v / wall for k, v in t.total.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latent_sizes", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch_size", type=int, default=8)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for latent in args.latent_sizes:
            plain = bench(latent, False, args.steps, args.batch_size, work)
            cached = bench(latent, True, args.steps, args.batch_size, work)
            rows.append((latent, plain, cached))
            print(f"latent {latent}x{latent}: done", file=sys.stderr)
    print(f"\nbatch {args.batch_size}, {args.steps} measured steps each, tiny UNet (1.0M) and VAE (factor 2), CPU "
          f"threads {torch.get_num_threads()}\n")
    print("| latent | image | cached / uncached step time | outside UNet fwd+bwd: uncached | cached |")
    print("|---|---|---|---|---|")
    for latent, (t0, u0, _), (t1, u1, _) in rows:
        print(f"| {latent}x{latent} | {latent * 2}px | {t1 / t0:.2f} | {1 - u0:.0%} | {1 - u1:.0%} |")
    print("\nShare of step time by phase (uncached / cached); 'rest' = conditioning, noise, loss, Python:\n")
    print("| latent | data loading | VAE encode | optimizer + clipping | rest | UNet forward | UNet backward |")
    print("|---|---|---|---|---|---|---|")
    for latent, (_, u0, p0), (_, u1, p1) in rows:
        rest = [1 - sum(p.values()) for p in (p0, p1)]
        cells = [f"{p0.get(k, 0):.0%} / {p1.get(k, 0):.0%}" for k in ("data", "VAE encode", "optimizer")]
        cells.append(f"{rest[0]:.0%} / {rest[1]:.0%}")
        cells += [f"{p0.get(k, 0):.0%} / {p1.get(k, 0):.0%}" for k in ("unet forward", "backward")]
        print(f"| {latent}x{latent} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
