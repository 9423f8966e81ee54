#!/usr/bin/env python
"""Does the data loader keep a GPU fed? Samples/s of the training loader against samples/s one
training step consumes, at 512 and 1024 px, on inputs stored like RORem's (JPEG source and result,
PNG mask).

    .venv/bin/python bench/bench_data.py              # about a minute on 2 CPU cores

Decoding and cropping run in the loader's worker processes (prepare.make_dataloader). Measured
here: the loader's samples/s with 0 workers (decoding in the training process) and with 1 and 2
workers (this machine's cores). What a step consumes comes from the planner (scripts/plan_memory.py:
train_RORem.py's shipped config, its FLOPs at --utilisation of --peak_tflops), not from a GPU. The
ratio loader / consumption is printed as measured (1 worker) and for the default of a GPU rank
(min(8, cores per rank - 1) workers, each one core: the 1-worker rate times the workers, which the
2-worker row checks for linearity). Above 1 the GPU waits on nothing; below 1 it starves.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def write_rorem_like(folder, num, size, fmt="jpg", seed=0):
    """num (source, mask.png, result) triplets of size x size, source and result as JPEG (quality 95)
    or PNG: textured backgrounds with grain (a 1024 px JPEG of about 0.5-0.9 MB, as photos), an
    ellipse object, an RGB mask as RORem stores them."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size] / size
    rows = []
    for i in range(num):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        texture = sum(np.sin(2 * np.pi * rng.uniform(2, 40) * (np.cos(a) * x + np.sin(a) * y)) for a in rng.uniform(0, np.pi, 4))
        bg = c0 + (c1 - c0) * ((x + y) / 2)[..., None] + 12 * texture[..., None]
        bg = np.clip(bg + rng.normal(0, 10, bg.shape), 0, 255)
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.25)
        hole = ((x - cx) ** 2 + (y - cy) ** 2) < r ** 2
        src = bg.copy()
        src[hole] = rng.uniform(0, 255, 3)
        names = {"source": f"{i:05d}.{fmt}", "mask": f"mask_{i:05d}.png", "GT": f"{i:05d}_gt.{fmt}"}
        Image.fromarray(src.astype(np.uint8)).save(os.path.join(folder, names["source"]), quality=95)
        Image.fromarray(bg.astype(np.uint8)).save(os.path.join(folder, names["GT"]), quality=95)
        Image.fromarray((np.repeat(hole[..., None], 3, 2) * 255).astype(np.uint8)).save(os.path.join(folder, names["mask"]))
        rows.append(names)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(rows, f)
    return os.path.join(folder, "meta.json")


def loader_rate(meta, resolution, workers, batch, batches):
    """Samples/s of make_dataloader's loader over `batches` batches (after one to start the workers)."""
    import torch

    from training import prepare
    from myutils.data import RemovalDataset, read_meta

    args = argparse.Namespace(train_batch_size=batch, seed=0, dataloader_num_workers=workers, dataloader_prefetch_factor=4)
    acc = argparse.Namespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    dataset = RemovalDataset(read_meta(meta, "triplet"), "triplet", resolution, random_flip=True)
    loader = prepare.make_dataloader(args, dataset, acc)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - start)
    del it, loader
    return rate


def consumption(resolutions, peak_tflops, utilisation):
    """Samples/s one GPU's training step takes in, per resolution: train_RORem.py's shipped config
    (batch, full fine-tune, checkpointing) priced by the planner."""
    import plan_memory

    rows, _ = plan_memory.plan(plan_memory.plan_args(scripts=["train_RORem.py"], resolutions=resolutions, peak_tflops=peak_tflops,
                                                     peak_tflops_fp32=peak_tflops / 2, utilisation=utilisation))
    return {r["res"]: r["batch"] * r["steps_per_hour"] / 3600 for r in rows if r["mode"] == "full, DDP"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--formats", nargs="+", choices=["jpg", "png"], default=["jpg", "png"], help="of source and result")
    p.add_argument("--samples", type=int, default=48, help="synthetic triplets per resolution")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--batches", type=int, default=4, help="batches timed per setting")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rank_workers", type=int, default=8, help="the default workers of a GPU rank with 9+ cores")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="H100/H200 dense bf16")
    p.add_argument("--utilisation", type=float, default=0.4)
    args = p.parse_args(argv)
    need = args.batch_size * (args.batches + 1)
    if args.samples < need:
        raise SystemExit(f"--samples {args.samples}: need at least batch_size x (batches + 1) = {need}")
    eats = consumption(args.resolutions, args.peak_tflops, args.utilisation)
    print(f"one GPU step consumes (train_RORem.py config, planner at {args.utilisation:.0%} of {args.peak_tflops:g} TFLOPS): "
          + ", ".join(f"{r} px {eats[r]:.1f} samples/s" for r in args.resolutions))
    lines = ["| px | files | loader samples/s: " + " | ".join(f"{w} workers" for w in args.workers)
             + f" | GPU step takes | ratio, 1 worker | ratio, {args.rank_workers} workers (default) |",
             "|---" * (len(args.workers) + 5) + "|"]
    with tempfile.TemporaryDirectory() as work:
        for res in args.resolutions:
            for fmt in args.formats:
                meta = write_rorem_like(os.path.join(work, f"{res}{fmt}"), args.samples, res, fmt)
                kb = os.path.getsize(os.path.join(work, f"{res}{fmt}", f"00000.{fmt}")) / 1000
                rates = {w: loader_rate(meta, res, w, args.batch_size, args.batches) for w in args.workers}
                one = rates.get(1, rates[max(args.workers)] / max(1, max(args.workers)))
                lines.append(f"| {res} | {fmt} ({kb:.0f} kB) | " + " | ".join(f"{rates[w]:.1f}" for w in args.workers)
                             + f" | {eats[res]:.1f} | {one / eats[res]:.2f} | {one * args.rank_workers / eats[res]:.2f} |")
                print(f"{res} px {fmt}: " + ", ".join(f"{w} workers {rates[w]:.1f}/s" for w in args.workers)
                      + (f"; 2 workers / 1 worker = {rates[2] / rates[1]:.2f}" if 1 in rates and 2 in rates else ""), flush=True)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
