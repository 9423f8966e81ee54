#!/usr/bin/env python
"""Remove objects with a RORem remover: one image, a meta.json, or a folder of images and masks.

    python inference_RORem.py --RORem_unet path/to/RORem_unet --image_path in.png --mask_path mask.png --save_path out.png
    python inference_RORem.py --RORem_unet ... --meta_path test/meta.json --save_path results/
    python inference_RORem.py --RORem_unet ... --image_path photos/ --mask_path masks/ --save_path results/
    python inference_RORem.py --RORem_unet ... --image_path validation_data/ --save_path results/   # RORem's layout

Folder mode pairs each image with the mask of the same name in --mask_path, or named mask_<name>:
RORem's validation_data/ keeps 1.jpg beside mask_1.png (masks may be RGB) in one folder, which is
the default --mask_path of a folder.

Any size and aspect ratio: the image is processed with its shorter side at --resolution (aspect kept,
sides rounded to multiples of 8), the result is resized back to the original size and pasted into
the input, so pixels outside the (dilated) mask are exactly the input's. Batch modes write one
result per entry plus a meta.json of (source, mask, GT=result) triplets, ready to be scored.
"""
import argparse
import json
import os

from tqdm.auto import tqdm

from myutils import made_by
from myutils.args import NONNEGATIVE, POSITIVE
from myutils.data import Entry, check_entries, raise_problems, read_meta
from myutils.errors import UserError, output_file, output_folder, run_cli
from myutils.img_util import aspect_problem, dilate_mask, load_image, load_mask
from myutils.models import resolve_device_dtype
from pipelines.inpaint import add_remover_args, check_remover_args, count_unet_calls, load_remover, remove_objects

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
NOT_SETTINGS = ("save_path", "overwrite", "device", "meta_path", "image_path", "mask_path", "batch_size")  # not what a result is


def parse_args(argv=None, four_step=False):
    """four_step: inference_RORem_4S.py's defaults (an LCM LoRA, LCMScheduler, 4 steps, strength 1, fused)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_remover_args(p)
    if four_step:
        p.set_defaults(inference_steps=4, strength=1.0, scheduler="lcm", fuse_lora=True)
    p.add_argument("--image_path", default=None, help="an image, or a folder of images")
    p.add_argument("--mask_path", default=None, help="its mask (white = remove), or a folder of masks named like the images or "
                                                    "mask_<name> (default for a folder of images: that folder)")
    p.add_argument("--meta_path", nargs="+", default=None, help="meta.json file(s) of {source, mask} entries")
    p.add_argument("--save_path", default="result.png", help="output file (single image) or folder (batch modes)")
    p.add_argument("--dilate_size", type=NONNEGATIVE, default=0, help="grow the mask by this many pixels first")
    p.add_argument("--batch_size", type=POSITIVE, default=1)
    p.add_argument("--overwrite", action="store_true", help="redo results that already exist (one image: replace --save_path)")
    args = p.parse_args(argv)
    check_remover_args(args)
    if four_step and not args.lora_path:
        raise UserError("--RORem_LoRA is required: the 4-step LoRA from train_RORem_lcm.py (pytorch_lora_weights.safetensors or its folder)")
    if args.image_path and args.mask_path is None and os.path.isdir(args.image_path):
        args.mask_path = args.image_path  # RORem's validation_data/: images and mask_<name> files side by side
    if bool(args.meta_path) == bool(args.image_path or args.mask_path):
        raise UserError("give either --meta_path, or --image_path with --mask_path")
    if not args.meta_path and not (args.image_path and args.mask_path):
        raise UserError("--image_path and --mask_path go together")
    return args


def list_jobs(args):
    """[(source path, mask path, output path)] for the chosen mode, with every input checked first."""
    if args.meta_path:
        entries = read_meta(args.meta_path, "input")
        names = [f"{i:05d}_{os.path.splitext(os.path.basename(e.paths['source']))[0]}.png" for i, e in enumerate(entries)]
    elif os.path.isdir(args.image_path):
        if not os.path.isdir(args.mask_path):
            raise UserError(f"--image_path {args.image_path} is a folder, so --mask_path must be one too")
        masks = {os.path.splitext(f)[0]: f for f in os.listdir(args.mask_path) if f.lower().endswith(IMAGE_EXTS)}
        same_folder = os.path.realpath(args.mask_path) == os.path.realpath(args.image_path)
        images = sorted(f for f in os.listdir(args.image_path) if f.lower().endswith(IMAGE_EXTS)
                        and not (same_folder and f.startswith("mask_")))
        if not images:
            raise UserError(f"--image_path {args.image_path}: no images ({', '.join(IMAGE_EXTS)})")

        def mask_of(f):  # the same name, or RORem's mask_<name>
            stem = os.path.splitext(f)[0]
            return masks.get(f"mask_{stem}") if same_folder else masks.get(stem) or masks.get(f"mask_{stem}")

        missing = [f for f in images if not mask_of(f)]
        if missing:
            stem = os.path.splitext(missing[0])[0]
            raise UserError(f"--mask_path {args.mask_path}: no mask for {missing[0]!r} (looked for {stem}.* and mask_{stem}.*; "
                            f"{len(missing)} images without a mask)")
        entries = [Entry(args.image_path, i, {"source": os.path.join(args.image_path, f), "mask": os.path.join(args.mask_path, mask_of(f))})
                   for i, f in enumerate(images)]
        names = [os.path.splitext(f)[0] + ".png" for f in images]
    else:
        check_output_file(args.save_path, args.overwrite)
        entries = [Entry("--image_path/--mask_path", 0, {"source": args.image_path, "mask": args.mask_path})]
        warnings = check_entries(entries)
        check_aspects(entries)
        return [(entries[0].paths["source"], entries[0].paths["mask"], args.save_path)], entries, warnings
    warnings = check_entries(entries, progress=len(entries) > 200)
    check_aspects(entries)
    return [(e.paths["source"], e.paths["mask"], os.path.join(args.save_path, n)) for e, n in zip(entries, names)], entries, warnings


def check_aspects(entries):
    """Refuse, before any work, inputs too long for their width (each would run at many times --resolution)."""
    from PIL import Image

    problems = []
    for e in entries:
        with Image.open(e.paths["source"]) as img:  # the header only
            problem = aspect_problem(*img.size)
        if problem:
            problems.append(f"{e.where()}: {e.paths['source']}: {problem}")
    raise_problems(problems)


def check_output_file(path, overwrite=False):
    """One image out: an image file name in a folder this process can write to, not a folder, and not
    an existing file unless --overwrite (as the batch modes)."""
    if os.path.isdir(path):
        raise UserError(f"--save_path {path}: a folder, but one image is written to a file (e.g. {os.path.join(path, 'result.png')})")
    if os.path.lexists(path) and not overwrite:
        raise UserError(f"--save_path {path}: exists; --overwrite replaces it")
    if not path.lower().endswith(IMAGE_EXTS):
        raise UserError(f"--save_path {path}: not an image file name (end it with one of {', '.join(IMAGE_EXTS)})")
    output_file(path, "--save_path")


def check_batch_output(args, jobs, keys):
    """Before any work: the results' meta.json must not replace an input meta.json, and results already
    in --save_path are reused only if made from the same inputs with the same settings."""
    meta_out = os.path.realpath(os.path.join(args.save_path, "meta.json"))
    for m in args.meta_path or []:
        if os.path.realpath(m) == meta_out:
            raise UserError(f"--save_path {args.save_path}: its meta.json would replace the input --meta_path {m}; "
                            "write the results to another folder")
    if os.path.exists(args.save_path) and not os.path.isdir(args.save_path):
        raise UserError(f"--save_path {args.save_path}: a file, but batch modes write a folder of results")
    old = made_by.stale(args.save_path, [os.path.basename(j[2]) for j in jobs], keys)
    if old and not args.overwrite:
        raise UserError(f"--save_path {args.save_path}: {len(old)} results there were made from other inputs or settings "
                        f"(e.g. {old[0]}); pass --overwrite to replace them, or choose another folder")


def earlier_results(folder, meta):
    """The entries of a results meta.json already in `folder` from other inputs (another batch run into
    the same folder), whose result files are still there: kept, so a second run does not drop them."""
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return []
    ours = {e["GT"] for e in meta}
    return [e for e in old if isinstance(e, dict) and isinstance(e.get("GT"), str) and e["GT"] not in ours
            and os.path.isfile(os.path.join(folder, e["GT"]))]


def main(argv=None, four_step=False):
    args = parse_args(argv, four_step)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    jobs, entries, warnings = list_jobs(args)
    for w in warnings:
        print(f"warning: {w}")
    batch_mode = bool(args.meta_path) or os.path.isdir(args.image_path)
    keys = made_by.keys(entries, args, NOT_SETTINGS) if batch_mode else []
    if batch_mode:
        check_batch_output(args, jobs, keys)
        made = {} if args.overwrite else made_by.read(args.save_path)
    todo = [(i, j) for i, j in enumerate(jobs) if args.overwrite or not (batch_mode and os.path.exists(j[2]))]
    if batch_mode:
        output_folder(args.save_path, "--save_path")
        print(f"{len(jobs)} inputs, {len(jobs) - len(todo)} already done in {args.save_path}")
    pipe, cond, uncond = load_remover(args, device, dtype) if todo else (None, None, None)
    calls = count_unet_calls(pipe) if todo else [0]
    bar = tqdm(total=len(todo), desc="removing", disable=not batch_mode)
    k = 0
    while k < len(todo):
        images = [load_image(todo[k][1][0])]
        group = [todo[k]]
        while len(group) < args.batch_size and k + len(group) < len(todo):  # batch equal sizes only
            nxt = load_image(todo[k + len(group)][1][0])
            if nxt.size != images[0].size:
                break
            images.append(nxt)
            group.append(todo[k + len(group)])
        masks = [dilate_mask(load_mask(j[1]), args.dilate_size) for _, j in group]
        for (i, job), result in zip(group, remove_objects(pipe, cond, uncond, images, masks, args, args.seed + group[0][0])):
            os.makedirs(os.path.dirname(os.path.abspath(job[2])), exist_ok=True)
            result.save(job[2])
            if batch_mode:
                made[os.path.basename(job[2])] = keys[i]
        if batch_mode:
            made_by.write(args.save_path, made)
        k += len(group)
        bar.update(len(group))
    bar.close()
    if batch_mode:
        meta = [{**{("reference_GT" if k == "GT" else k): v for k, v in entries[i].extra.items()},
                 "source": os.path.abspath(s), "mask": os.path.abspath(m), "GT": os.path.basename(o)}
                for i, (s, m, o) in enumerate(jobs)]
        meta = earlier_results(args.save_path, meta) + meta
        tmp = os.path.join(args.save_path, "meta.json.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(args.save_path, "meta.json"))
        print(f"wrote {len(todo)} results and {os.path.join(args.save_path, 'meta.json')} ({len(meta)} entries)")
    else:
        print(f"wrote {args.save_path}")
    batches = -(-len(todo) // args.batch_size) if batch_mode else 1
    print(f"UNet calls: {calls[0]} for {len(todo)} images in {batches} batches "
          f"({args.inference_steps} steps at strength {args.strength}: {int(args.inference_steps * args.strength)} per batch)")
    return calls[0]


if __name__ == "__main__":
    run_cli(main)
