#!/usr/bin/env python
"""Evaluate object removers on a test set and compare them in one table.

    python evaluate_RORem.py --meta_path test/meta.json --pretrained_model diffusers/stable-diffusion-xl-1.0-inpainting-0.1 \
        --system "RORem=unet:path/to/RORem_unet" --system "RORem+DPO=lora:experiment/RORem_DPO" \
        --system "RORem-4S=lcm:experiment/RORem_LCM" --system "other=results:path/to/their_results" \
        --base_unet path/to/RORem_unet --discriminator_path path/to/disc \
        --inception_weights weights/pt_inception-2015-12-05-6726825d.pth \
        --lpips_backbone_weights weights/alexnet-owt-7be5be79.pth --clip_weights weights/open_clip_ViT-B-32.bin \
        --output_dir eval/RORem

--meta_path: (source, mask, GT) triplets, RORem's test-set layout. --system NAME=KIND:PATH[,key=value...]:
  base        the pipeline's own UNet (no PATH)          unet:DIR  a remover UNet (diffusers folder)
  lora:DIR    a LoRA (DPO, RL, ...) on --base_unet       lcm:DIR   a 4-step LCM LoRA on --base_unet (LCMScheduler)
  results:DIR precomputed results: a meta.json from inference_RORem.py (matched by source) or <index:05d>.png
  options: steps=N, strength=S, guidance=G, scheduler=lcm|default (defaults: --inference_steps/--strength/
  --guidance_scale; lcm: 4 steps, strength 1, LCMScheduler)
Each generating system removes every object with seed --seed + i for entry i, --batch_size at a time,
and keeps each result as <output_dir>/results/<name>/<i:05d>.png, so a rerun continues where it
stopped. Metrics, each against GT at the input's own size unless said: masked MSE and masked PSNR
(the hole); LPIPS inside and outside the hole (AlexNet maps); CLIP image similarity; FID of all results
against all GTs (pytorch-fid's Inception); the discriminator's mean score and success rate (score >=
--success_threshold), at --resolution x --resolution; seconds per image, UNet calls per image and peak
memory; the discriminator's pairwise win rate between systems (same inputs, same seeds) with a 95%
interval. A metric without a weights file uses its library's standard weights, fetched and cached
by the library (--no-fetch_weights, or HF_HUB_OFFLINE=1, keeps the run offline); a metric whose
weights are neither given nor fetchable is reported as unavailable, with the reason and the argument
that enables it; --stand_in_weights (tests) uses random-weight networks instead and marks those numbers.
Writes results.md, results.csv, results.json, win_rates.md, grids/grid_XX.png and index.html.
"""
import argparse
import csv
import html
import json
import os
import resource
import time
from types import SimpleNamespace

import numpy as np
import torch
from tqdm.auto import tqdm

from myutils import eval_models as em
from myutils import made_by
from myutils.args import NONNEGATIVE, NONNEGATIVE_REAL, POSITIVE, SCORE, SEED, real, resolution
from myutils.data import check_entries, read_meta
from myutils.errors import UserError, output_folder, run_cli
from myutils.img_util import image_grid, load_image, load_mask, pil_to_tensor
from myutils.metrics import frechet_distance, masked_means, masked_mse, masked_psnr, win_rate
from myutils.models import DEFAULT_MODEL, resolve_device_dtype

KINDS = ("base", "unet", "lora", "lcm", "results")
METRIC_WEIGHTS = {"fid": "--inception_weights", "lpips": "--lpips_backbone_weights", "clip": "--clip_weights",
                  "discriminator": "--discriminator_path"}


def parse_system(spec, args):
    """NAME=KIND:PATH[,key=value...] -> dict with the sampling settings resolved."""
    name, sep, rest = spec.partition("=")
    if ":" in rest:
        kind, _, rest = rest.partition(":")
        path, *options = rest.split(",")
    else:  # base[,options]
        kind, *options = rest.split(",")
        path = ""
    if not sep or not name or kind not in KINDS:
        raise UserError(f"--system {spec!r}: expected NAME=KIND:PATH with KIND one of {', '.join(KINDS)}")
    if kind != "base" and not path:
        raise UserError(f"--system {spec!r}: {kind} needs a path")
    if path and not os.path.exists(path):
        raise UserError(f"--system {name}: {path} not found")
    lcm = kind == "lcm"
    system = {"name": name, "kind": kind, "path": path, "steps": 4 if lcm else args.inference_steps,
              "strength": 1.0 if lcm else args.strength, "guidance": args.guidance_scale, "scheduler": "lcm" if lcm else "default"}
    for option in options:
        key, _, value = option.partition("=")
        if key not in ("steps", "strength", "guidance", "scheduler"):
            raise UserError(f"--system {name}: unknown option {key!r} (steps, strength, guidance, scheduler)")
        if key == "scheduler":
            if value not in ("lcm", "default"):
                raise UserError(f"--system {name}: scheduler={value!r}, expected lcm or default")
            system[key] = value
            continue
        try:  # the same bounds as --inference_steps, --strength, --guidance_scale
            system[key] = {"steps": POSITIVE, "strength": real(above=0, maximum=1), "guidance": NONNEGATIVE_REAL}[key](value)
        except argparse.ArgumentTypeError as e:
            raise UserError(f"--system {name}: {key}={value!r}: {e}") from None
    return system


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--meta_path", nargs="+", required=True, help="test meta.json file(s) of (source, mask, GT) triplets")
    p.add_argument("--system", action="append", required=True, help="NAME=KIND:PATH[,key=value...], repeatable (see above)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--pretrained_model", default=DEFAULT_MODEL, help="SDXL-inpainting folder or hub id")
    p.add_argument("--base_unet", "--RORem_unet", default=None, help="the UNet that lora/lcm systems are applied to")
    p.add_argument("--variant", default=None)
    p.add_argument("--inference_steps", type=POSITIVE, default=50)
    p.add_argument("--strength", type=real(above=0, maximum=1), default=0.99)
    p.add_argument("--guidance_scale", type=NONNEGATIVE_REAL, default=1.0)
    p.add_argument("--resolution", type=resolution, default=512, help="processing size (shorter side), and the size metrics batch at")
    p.add_argument("--batch_size", type=POSITIVE, default=8)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--limit", type=POSITIVE, default=None, help="only the first N entries")
    p.add_argument("--discriminator_path", "--RORem_discriminator", default=None)
    p.add_argument("--success_threshold", type=SCORE, default=0.5)
    p.add_argument("--inception_weights", default=None, help=f"pytorch-fid's {em.INCEPTION_FILE} (FID)")
    p.add_argument("--fid_dims", type=int, choices=[64, 192, 768, 2048], default=2048,
                   help="Inception features for FID (2048: the standard; smaller ones are not comparable with published FIDs)")
    p.add_argument("--lpips_backbone_weights", default=None, help=f"torchvision's {em.ALEXNET_FILE} (LPIPS)")
    p.add_argument("--clip_weights", default=None, help="an open_clip checkpoint file for --clip_model (CLIP similarity)")
    p.add_argument("--clip_model", default="ViT-B-32")
    p.add_argument("--fetch_weights", action=argparse.BooleanOptionalAction, default=None,
                   help="metrics without a weights file use each library's standard weights, downloaded and cached by the "
                        "library (default: yes, unless HF_HUB_OFFLINE=1); offline, such a metric is reported unavailable")
    p.add_argument("--stand_in_weights", action="store_true",
                   help="random-weight networks for metrics without weights (tests only: such numbers mean nothing)")
    p.add_argument("--num_grid_inputs", type=NONNEGATIVE, default=16, help="inputs shown in the image grids (8 per grid)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    args = p.parse_args(argv)
    if args.fetch_weights is None:
        args.fetch_weights = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes")
    args.systems = [parse_system(s, args) for s in args.system]
    names = [s["name"] for s in args.systems]
    if len(set(names)) != len(names):
        raise UserError(f"--system names must differ: {', '.join(names)}")
    for flag in ("inception_weights", "lpips_backbone_weights", "clip_weights"):
        if getattr(args, flag) and not os.path.isfile(getattr(args, flag)):
            raise UserError(f"--{flag} {getattr(args, flag)}: file not found")
    return args


# ----------------------------------------------------------------------------- results

def result_path(args, system, i):
    return os.path.join(args.output_dir, "results", system["name"].replace("/", "_"), f"{i:05d}.png")


def generate(args, system, entries, device, dtype):
    """Results of a generating system for every entry, resumable; returns speed figures for what this
    run generated (None when every result already existed)."""
    from pipelines.inpaint import count_unet_calls, load_remover, remove_objects

    folder = os.path.dirname(result_path(args, system, 0))
    names = [os.path.basename(result_path(args, system, i)) for i in range(len(entries))]
    produced_by = SimpleNamespace(system=system, weights=system["path"], pretrained_model=args.pretrained_model, variant=args.variant,
                                  base_unet=args.base_unet, resolution=args.resolution, seed=args.seed, batch_size=args.batch_size,
                                  dtype=args.dtype)
    keys = made_by.keys(entries, produced_by)
    old = made_by.stale(folder, names, keys)
    if old:
        raise UserError(f"--output_dir {args.output_dir}: the results of --system {system['name']} there were made by other settings "
                        f"or weights, or from other inputs (e.g. {os.path.join(folder, old[0])}); choose another --output_dir or "
                        f"system name, or delete {folder}")
    todo = [i for i in range(len(entries)) if not os.path.isfile(result_path(args, system, i))]
    if not todo:
        return None
    made = made_by.read(folder)
    kind = system["kind"]
    spec = SimpleNamespace(pretrained_model=args.pretrained_model, variant=args.variant, prompt="", negative_prompt="",
                           RORem_unet=system["path"] if kind == "unet" else (args.base_unet if kind in ("lora", "lcm") else None),
                           lora_path=system["path"] if kind in ("lora", "lcm") else None, fuse_lora=kind in ("lora", "lcm"),
                           scheduler=system["scheduler"], resolution=args.resolution,
                           inference_steps=system["steps"], strength=system["strength"], guidance_scale=system["guidance"])
    pipe, cond, uncond = load_remover(spec, device, dtype)
    calls = count_unet_calls(pipe)
    os.makedirs(os.path.dirname(result_path(args, system, 0)), exist_ok=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    batches, start, done = 0, time.perf_counter(), 0
    with tqdm(total=len(todo), desc=system["name"]) as bar:
        while done < len(todo):
            first = todo[done]  # a batch: consecutive entries still to do, all of one size
            batch, images = [first], [load_image(entries[first].paths["source"])]
            while done + len(batch) < len(todo) and len(batch) < args.batch_size and todo[done + len(batch)] == batch[-1] + 1:
                image = load_image(entries[batch[-1] + 1].paths["source"])
                if image.size != images[0].size:
                    break
                batch.append(batch[-1] + 1)
                images.append(image)
            masks = [load_mask(entries[i].paths["mask"]) for i in batch]
            for i, result in zip(batch, remove_objects(pipe, cond, uncond, images, masks, spec, args.seed + first)):
                result.save(result_path(args, system, i))
                made[names[i]] = keys[i]
            made_by.write(folder, made)
            batches += 1
            done += len(batch)
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    peak = (f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB (CUDA)" if torch.cuda.is_available()
            else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB (process peak RSS)")
    del pipe
    return {"seconds_per_image": seconds / len(todo), "unet_calls_per_image": calls[0] / batches, "peak_memory": peak}


def load_results(args, system, entries):
    """PIL results in entry order: generated ones, or a results folder's."""
    if system["kind"] != "results":
        return [load_image(result_path(args, system, i)) for i in range(len(entries))]
    folder = system["path"]
    meta = os.path.join(folder, "meta.json") if os.path.isdir(folder) else folder
    if os.path.isfile(meta):
        found = read_meta(meta, "triplet")
        by_source = {os.path.realpath(e.paths["source"]): e.paths["GT"] for e in found}
        by_name = {os.path.basename(e.paths["source"]): e.paths["GT"] for e in found}
        paths = [by_source.get(os.path.realpath(e.paths["source"])) or by_name.get(os.path.basename(e.paths["source"]))
                 for e in entries]
    else:
        paths = [os.path.join(folder, f"{i:05d}.png") for i in range(len(entries))]
    missing = [i for i, p in enumerate(paths) if not p or not os.path.isfile(p)]
    if missing:
        raise UserError(f"--system {system['name']}: no result for entry {missing[0]} ({entries[missing[0]].paths['source']}) "
                        f"in {folder} ({len(missing)} missing)")
    return [load_image(p) for p in paths]


# ----------------------------------------------------------------------------- metrics

def square_batch(images, size, mode="RGB"):
    """PIL images as one (N, C, size, size) tensor in [0, 1] (metrics that batch need one size)."""
    resample = 0 if mode == "L" else 3
    return torch.stack([(pil_to_tensor(im.convert("RGB").resize((size, size), resample)) + 1) / 2 for im in images])


def compute_metrics(args, results, inputs, nets, stand_ins):
    """Per-system metric dict (absent = unavailable) and per-input values (masked MSE, discriminator
    score) for paired comparisons. PSNR is capped at 100 dB (a perfect match)."""
    sources, masks, gts = inputs
    size = args.resolution
    src11, g01, mask01 = nets["input_tensors"]
    mse = [masked_mse(r, g, k) for r, g, k in zip(results, gts, masks)]
    m = {"masked_mse": float(np.mean(mse)), "masked_mse_stderr": float(np.std(mse) / np.sqrt(len(mse))),
         "masked_psnr": float(np.mean([min(masked_psnr(r, g, k), 100.0) for r, g, k in zip(results, gts, masks)]))}
    r01 = square_batch(results, size)
    scores = None
    if nets["discriminator"] is not None:
        scores = []
        for i in range(0, len(results), args.batch_size):
            part = slice(i, i + args.batch_size)
            scores += nets["discriminator"].score_pixels(src11[part], (mask01[part] > 0.5).float(), r01[part] * 2 - 1).tolist()
        m["discriminator_score"] = float(np.mean(scores))
        m["success_rate"] = float(np.mean([s >= args.success_threshold for s in scores]))
    if nets["lpips"] is not None:
        maps = torch.cat([em.lpips_maps(nets["lpips"], r01[i:i + args.batch_size], g01[i:i + args.batch_size])
                          for i in range(0, len(results), args.batch_size)])
        inside, outside = masked_means(maps, mask01)
        m["lpips_in_mask"], m["lpips_out_of_mask"] = float(np.nanmean(inside.numpy())), float(np.nanmean(outside.numpy()))
    if nets["clip"] is not None:
        m["clip_similarity"] = float(np.mean(em.clip_similarity(nets["clip"], results, gts, args.batch_size)))
    if nets["inception"] is not None:
        feats = np.concatenate([em.inception_features(nets["inception"], r01[i:i + args.batch_size])
                                for i in range(0, len(results), args.batch_size)])
        m["fid"] = frechet_distance(feats, nets["gt_features"])
    return m, {"masked_mse": mse, "discriminator_score": scores}


COLUMNS = [("masked_mse", "masked MSE", "{:.4f}"), ("masked_psnr", "masked PSNR (dB)", "{:.2f}"),
           ("lpips_in_mask", "LPIPS in mask", "{:.4f}"), ("lpips_out_of_mask", "LPIPS outside", "{:.4f}"),
           ("clip_similarity", "CLIP sim.", "{:.4f}"), ("fid", "FID", "{:.2f}"), ("discriminator_score", "disc. score", "{:.3f}"),
           ("success_rate", "success rate", "{:.3f}"), ("seconds_per_image", "s / image", "{:.3f}"),
           ("unet_calls_per_image", "UNet calls / image", "{:g}"), ("peak_memory", "peak memory", "{}")]
NEEDS = {"lpips_in_mask": "lpips", "lpips_out_of_mask": "lpips", "clip_similarity": "clip", "fid": "fid",
         "discriminator_score": "discriminator", "success_rate": "discriminator"}


def why_unavailable(metric, reasons):
    """What to do for a metric without its network: the fetch's failure and the flag, or the flag."""
    return f"{reasons[metric]}; or give {METRIC_WEIGHTS[metric]}" if metric in reasons else METRIC_WEIGHTS[metric]


def cell(row, key, fmt, stand_ins, reasons):
    value = row.get(key)
    if value is None:
        if key in NEEDS:
            return f"unavailable ({why_unavailable(NEEDS[key], reasons)})"
        return "n/a (results reused)" if key in ("seconds_per_image", "unet_calls_per_image", "peak_memory") else "n/a"
    text = fmt.format(value)
    return text + " (random stand-in)" if NEEDS.get(key) in stand_ins else text


def write_outputs(args, rows, wins, stand_ins, reasons, inputs, results_by_system, per_input):
    out = args.output_dir
    header = ["system"] + [title for _, title, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([r["system"]] + [cell(r, k, f, stand_ins, reasons) for k, _, f in COLUMNS]) + " |" for r in rows]
    notes = [f"{len(inputs[0])} test inputs, seed {args.seed} + i for input i; metrics against GT; discriminator at "
             f"{args.resolution} px, success = score >= {args.success_threshold}."]
    if stand_ins:
        notes.append(f"**Random-weight stand-ins were used for: {', '.join(sorted(stand_ins))}. Those numbers mean nothing.**")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines + [""] + notes) + "\n")
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["system"] + [k for k, _, _ in COLUMNS])
        for r in rows:
            w.writerow([r["system"]] + [r.get(k) for k, _, _ in COLUMNS])
    unavailable = {k: why_unavailable(v, reasons) for k, v in NEEDS.items() if all(r.get(k) is None for r in rows)}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"systems": rows, "win_rates": wins, "unavailable": unavailable, "stand_ins": sorted(stand_ins),
                   "seed": args.seed, "inputs": len(inputs[0]), "per_input": per_input}, f, indent=1)
    win_lines = []
    if wins:
        win_lines = ["| A | B | win rate of A (disc.) | 95% interval |", "|---|---|---|---|"]
        win_lines += [f"| {w['a']} | {w['b']} | {w['win_rate']:.3f} | [{w['low']:.3f}, {w['high']:.3f}] |" for w in wins]
    with open(os.path.join(out, "win_rates.md"), "w") as f:
        f.write("\n".join(win_lines or ["unavailable (--discriminator_path)"]) + "\n")
    # grids: rows source, mask, GT, one per system; 8 inputs per grid
    os.makedirs(os.path.join(out, "grids"), exist_ok=True)
    sources, masks, gts = inputs
    shown = min(args.num_grid_inputs, len(sources))
    grids = []
    for g, start in enumerate(range(0, shown, 8)):
        idx = list(range(start, min(start + 8, shown)))
        size = sources[idx[0]].size
        cells = [im.resize(size) for row in (sources, [m.convert("RGB") for m in masks], gts, *results_by_system.values())
                 for im in (row[i] for i in idx)]
        grid = image_grid(cells, rows=3 + len(results_by_system), cols=len(idx))
        if grid.width < 512:
            grid = grid.resize((grid.width * (512 // grid.width), grid.height * (512 // grid.width)), 0)
        name = f"grid_{g:02d}.png"
        grid.save(os.path.join(out, "grids", name))
        grids.append(name)
    rows_label = ", ".join(["source", "mask", "GT", *results_by_system])
    with open(os.path.join(out, "index.html"), "w") as f:
        table = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in line.strip("|").split("|")) + "</tr>"
                        for line in lines if not line.startswith("|---"))
        f.write(f"<html><body><h1>Evaluation</h1><table border=1>{table}</table><p>{html.escape(' '.join(notes))}</p>"
                f"<p>Rows: {html.escape(rows_label)}</p>" + "".join(f'<img src="grids/{g}"><br>' for g in grids) + "</body></html>")
    return "\n".join(lines + [""] + notes + [""] + win_lines)


def main(argv=None):
    args = parse_args(argv)
    entries = read_meta(args.meta_path, "triplet")
    check_entries(entries)
    entries = entries[:args.limit] if args.limit else entries
    if not entries:
        raise UserError(f"--meta_path {' '.join(args.meta_path)}: no entries")
    if any(s["kind"] in ("base", "unet", "lora", "lcm") for s in args.systems):
        from myutils.models import check_model_path
        check_model_path(args.pretrained_model, "--pretrained_model")
    output_folder(args.output_dir, "--output_dir")
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    speed = {s["name"]: generate(args, s, entries, device, dtype) for s in args.systems if s["kind"] != "results"}

    inputs = ([load_image(e.paths["source"]) for e in entries], [load_mask(e.paths["mask"]) for e in entries],
              [load_image(e.paths["GT"]) for e in entries])
    stand_ins, reasons = set(), {}

    def net(key, load, make_stand_in):
        given = getattr(args, METRIC_WEIGHTS[key].lstrip("-"), None)
        try:
            loaded = load()
        except em.WeightsUnavailable as e:
            print(f"warning: {key} unavailable: {e} (give {METRIC_WEIGHTS[key]} FILE)")
            loaded, reasons[key] = None, str(e)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 (whatever a damaged or foreign file raises: the file is named)
            if not given:
                raise
            detail = (str(e).strip().splitlines() or [""])[0][:160]
            raise UserError(f"{METRIC_WEIGHTS[key]} {given}: not loadable as {key}'s weights ({e.__class__.__name__}: {detail})") from None
        if loaded is None and args.stand_in_weights:
            stand_ins.add(key)
            return make_stand_in()
        return loaded

    # the metric networks on the evaluation device, fed --batch_size images at a time
    fetch = args.fetch_weights
    nets = {"inception": net("fid", lambda: em.load_inception(args.inception_weights, dims=args.fid_dims, device=device, fetch=fetch),
                             lambda: em.load_inception(random_stand_in=True, dims=args.fid_dims, device=device)),
            "lpips": net("lpips", lambda: em.load_lpips(args.lpips_backbone_weights, device=device, fetch=fetch),
                         lambda: em.load_lpips(random_stand_in=True, device=device)),
            "clip": net("clip", lambda: em.load_clip(args.clip_model, args.clip_weights, device=device, fetch=fetch),
                        lambda: em.load_clip(args.clip_model, random_stand_in=True, device=device)),
            "discriminator": None}
    if args.discriminator_path:
        from myutils.reward_utils import load_reward_model

        nets["discriminator"] = load_reward_model(args.pretrained_model, args.discriminator_path, args.resolution, device, torch.float32,
                                                  args.variant, flags=("--pretrained_model", "--discriminator_path"))
    g01 = square_batch(inputs[2], args.resolution)  # the inputs at metric size, once for every system
    nets["input_tensors"] = (square_batch(inputs[0], args.resolution) * 2 - 1, g01, square_batch(inputs[1], args.resolution, "L")[:, :1])
    if nets["inception"] is not None:
        nets["gt_features"] = np.concatenate([em.inception_features(nets["inception"], g01[i:i + args.batch_size])
                                              for i in range(0, len(g01), args.batch_size)])
    rows, per_input, results_by_system = [], {}, {}
    for s in tqdm(args.systems, desc="metrics"):
        results = load_results(args, s, entries)
        metrics, per_input[s["name"]] = compute_metrics(args, results, inputs, nets, stand_ins)
        rows.append({"system": s["name"], "kind": s["kind"], "path": s["path"], "steps": s["steps"] if s["kind"] != "results" else None,
                     **metrics, **(speed.get(s["name"]) or {})})
        results_by_system[s["name"]] = results
    wins = []
    if nets["discriminator"] is not None:
        names = [s["name"] for s in args.systems]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                p, (lo, hi) = win_rate(per_input[a]["discriminator_score"], per_input[b]["discriminator_score"])
                wins.append({"a": a, "b": b, "win_rate": p, "low": lo, "high": hi})
    text = write_outputs(args, rows, wins, stand_ins, reasons, inputs, results_by_system, per_input)
    print(text + f"\n\nwrote {args.output_dir}/results.md, results.csv, results.json, win_rates.md, grids/, index.html")
    return {"systems": rows, "win_rates": wins, "stand_ins": sorted(stand_ins)}


if __name__ == "__main__":
    run_cli(main)
