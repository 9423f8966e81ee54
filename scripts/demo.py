#!/usr/bin/env python
"""The main job on the toy world, on a CPU: make data and tiny models, train a remover, and compare
it with its untrained start and a classical baseline on held-out samples.

    python scripts/demo.py --work_dir .demo          (what `make demo` runs)

Each stage is skipped when its output exists, so a second run only re-evaluates; delete a stage's
folder under --work_dir to redo it. Numbers are masked-region MSE in [-1, 1] pixel space against GT
on held-out inputs, same seeds for every system (lower is better).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(args):
    print("+ " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)


def stage(name, output, fn):
    if os.path.exists(output):
        print(f"[{name}] {output} exists, skipped")
        return
    start = time.time()
    fn()
    print(f"[{name}] done in {time.time() - start:.0f} s")


def remove_objects(model_dir, unet_dir, sources, masks, steps, seed):
    """Run a remover (the pipeline's own UNet, or the one in unet_dir) on every input with fixed
    seeds, 16 at a time; return the results pasted into their sources."""
    import torch
    from diffusers import UNet2DConditionModel

    from myutils.img_util import paste_back
    from myutils.models import load_inpaint_pipeline
    from myutils.sdxl_inpaint import encode_prompt_once
    from pipelines.inpaint import inpaint

    pipe = load_inpaint_pipeline(model_dir, unet=UNet2DConditionModel.from_pretrained(unet_dir) if unet_dir else None)
    cond = encode_prompt_once(pipe, "")
    pipe.set_progress_bar_config(disable=True)
    results = []
    for i in range(0, len(sources), 16):
        with torch.no_grad():
            out = inpaint(pipe, cond, sources[i:i + 16], masks[i:i + 16], sources[0].size[0], steps=steps,
                          strength=1.0, seed=seed + i)
        results += [paste_back(r, s, m) for r, s, m in zip(out, sources[i:i + 16], masks[i:i + 16])]
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work_dir", default=".demo")
    p.add_argument("--train_samples", type=int, default=2000)
    p.add_argument("--heldout_samples", type=int, default=64)
    p.add_argument("--vae_steps", type=int, default=1200)
    p.add_argument("--remover_steps", type=int, default=900, help="at batch 32: about 4 minutes on 2 cores")
    p.add_argument("--eval_steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    w = os.path.abspath(args.work_dir)
    train_meta, held_meta = f"{w}/data/train/meta.json", f"{w}/data/heldout/meta.json"
    model_dir, remover_dir = f"{w}/models/toy_sdxl_inpaint", f"{w}/remover"
    start = time.time()

    stage("data", held_meta, lambda: (
        run(["scripts/make_toy_dataset.py", "--out", f"{w}/data/train", "--num", str(args.train_samples), "--seed", "0"]),
        run(["scripts/make_toy_dataset.py", "--out", f"{w}/data/heldout", "--num", str(args.heldout_samples), "--seed", "1"])))
    stage("tiny models", f"{model_dir}/model_index.json", lambda: run([
        "scripts/make_tiny_models.py", "--out", model_dir, "--prediction_type", "v_prediction",
        "--vae_train_meta", train_meta, "--vae_steps", str(args.vae_steps), "--seed", str(args.seed)]))
    stage("remover", f"{remover_dir}/unet/config.json", lambda: run([
        "train_RORem.py", "--config", "configs/toy_RORem.yaml", "--pretrained_model_name_or_path", model_dir,
        "--meta_path", train_meta, "--validation_meta_path", held_meta, "--output_dir", remover_dir,
        "--max_train_steps", str(args.remover_steps), "--seed", str(args.seed)]))

    import numpy as np

    from myutils.data import read_meta
    from myutils.img_util import image_grid, load_image, load_mask
    from myutils.metrics import border_fill, masked_mse

    print(f"[evaluate] {args.heldout_samples} held-out inputs, {args.eval_steps}-step sampling from noise, seed {args.seed}")
    entries = read_meta(held_meta, "triplet")
    sources = [load_image(e.paths["source"]) for e in entries]
    masks = [load_mask(e.paths["mask"]) for e in entries]
    gts = [load_image(e.paths["GT"]) for e in entries]
    fills = [border_fill(s, m) for s, m in zip(sources, masks)]
    systems = {"border fill (classical)": [masked_mse(f, g, m) for f, g, m in zip(fills, gts, masks)]}
    grids = {}
    for name, unet_dir in [("untrained remover", None), ("trained remover", f"{remover_dir}/unet")]:
        grids[name] = remove_objects(model_dir, unet_dir, sources, masks, args.eval_steps, args.seed)
        systems[name] = [masked_mse(r, g, m) for r, g, m in zip(grids[name], gts, masks)]

    n = 8
    grid = image_grid(sources[:n] + [m.convert("RGB") for m in masks[:n]] + grids["untrained remover"][:n]
                      + grids["trained remover"][:n] + fills[:n] + gts[:n], rows=6, cols=n)
    grid = grid.resize((grid.width * 4, grid.height * 4), 0)
    os.makedirs(f"{w}/report", exist_ok=True)
    grid.save(f"{w}/report/before_after.png")
    rows = [(k, float(np.mean(v)), float(np.std(v) / np.sqrt(len(v)))) for k, v in systems.items()]
    table = ["| system | masked MSE (lower is better) | std. error |", "|---|---|---|"]
    table += [f"| {k} | {m:.4f} | {s:.4f} |" for k, m, s in rows]
    report = "\n".join([
        "# Toy-world demo: supervised remover", "",
        f"{args.heldout_samples} held-out toy inputs, {args.eval_steps}-step sampling from noise with seeds "
        f"{args.seed}..{args.seed + args.heldout_samples - 1}; result pasted into the source; MSE over the mask "
        "in [-1, 1] pixel space against GT.", "", *table, "",
        "![rows: source, mask, untrained, trained, border fill, GT](before_after.png)", "",
        f"Validation grids during training: `{remover_dir}/validation/`; curves: "
        f"`tensorboard --logdir {remover_dir}/logs`.", ""])
    with open(f"{w}/report/README.md", "w") as f:
        f.write(report)
    with open(f"{w}/report/results.json", "w") as f:
        json.dump({k: {"masked_mse": m, "stderr": s} for k, m, s in rows}, f, indent=1)
    print("\n" + "\n".join(table))
    print(f"\nreport: {w}/report/README.md   grid: {w}/report/before_after.png   ({time.time() - start:.0f} s)")
    untrained, trained = systems["untrained remover"], systems["trained remover"]
    if np.mean(trained) >= np.mean(untrained):
        sys.exit("the trained remover did not beat the untrained one: something is wrong")


if __name__ == "__main__":
    main()
