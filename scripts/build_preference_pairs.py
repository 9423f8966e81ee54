#!/usr/bin/env python
"""Build Diffusion-DPO preference pairs: natural pairs from scored annotations, and generated pairs
where those are too few (K candidates per input from the remover, judged by the discriminator, or
where the inputs have a GT, by their masked error against it).

    # natural pairs only: every score-1 result against score-0 results of the same source and mask
    python scripts/build_preference_pairs.py --scored_meta_path annotations/meta.json --output_dir pairs/

    # generate for the inputs without a natural pair: 8 candidates each, best against worst
    accelerate launch --config_file configs/accelerate_8gpu.yaml scripts/build_preference_pairs.py \
        --scored_meta_path annotations/meta.json --meta_path inputs/meta.json \
        --RORem_unet path/to/RORem_unet --RORem_discriminator path/to/disc --num_candidates 8 \
        --min_margin 0.1 --output_dir pairs/

    # inputs with a GT (e.g. RORem's triplets): judge the candidates by masked MSE against it
    python scripts/build_preference_pairs.py --meta_path triplets/meta.json --judge gt \
        --RORem_unet path/to/RORem_unet --num_candidates 8 --output_dir pairs_gt/

Writes <output_dir>/meta.json (the pair format train_RORem_dpo.py reads, with both scores) and,
when generating, <output_dir>/candidates/ (every candidate image) and <output_dir>/candidates.json
(every candidate as a scored triplet, score = the judge's verdict at --threshold, the raw score kept
as discriminator_score or masked_mse: train_RORem.py can fine-tune on the accepted ones, the
discriminator-filtered SFT baseline). Candidate k of input i uses seed --seed + i * K + k; with several
--guidance_scales / --inference_steps the K candidates are split into equal blocks, one per setting.
Resumable: an input's record (<output_dir>/records/<i>.json) is written once its candidates are
scored, and inputs with a record are skipped. Under accelerate each process takes every n-th input.
"""
import argparse
import itertools
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from myutils import made_by  # noqa: E402
from myutils.args import NONNEGATIVE_REAL, POSITIVE, integer, real  # noqa: E402
from myutils.data import Entry, check_entries, read_meta  # noqa: E402
from myutils.errors import UserError, output_folder, run_cli  # noqa: E402
from myutils.img_util import binarize_mask, content_key, load_image, load_mask  # noqa: E402
from myutils.metrics import masked_mse  # noqa: E402
from myutils.models import resolve_device_dtype  # noqa: E402
from pipelines.inpaint import add_remover_args, check_remover_args, load_remover, remove_objects  # noqa: E402


def _similar(a, b, threshold):
    """The stated similarity rule: the same binarised mask and a mean absolute difference of the
    sources (in [0, 1] units) at most `threshold`, e.g. the same photo re-encoded or lightly edited."""
    ma, mb = binarize_mask(load_mask(a["mask"])), binarize_mask(load_mask(b["mask"]))
    if ma.shape != mb.shape or not torch.equal(ma, mb):
        return False
    sa, sb = (np.asarray(load_image(p["source"]), dtype=np.float64) / 255 for p in (a, b))
    return sa.shape == sb.shape and float(np.abs(sa - sb).mean()) <= threshold


def meta_to_preference_dataset_format(meta_paths, out_path, max_pairs_per_input=None, pair_similar=False,
                                      similar_threshold=0.02, seed=0):
    """Turn scored annotations into Diffusion-DPO pairs and write them as a pair meta.json.

    Every result scored 1 (>= 0.5) is paired with results scored 0 (< 0.5) of the SAME input (same
    source and mask by content, see content_key); `max_pairs_per_input` keeps a random subset per
    input. With `pair_similar`, an input that has only good or only bad results borrows the missing
    side from a similar input (same mask, sources within `similar_threshold`, see _similar); the pair
    keeps its own source and mask. Returns a report: inputs with pairs, inputs without, pair count.
    """
    rng = random.Random(seed)
    groups = {}
    for e in read_meta(meta_paths, "scored"):
        key = content_key(e.paths["source"], e.paths["mask"])
        g = groups.setdefault(key, {"source": e.paths["source"], "mask": e.paths["mask"], "good": [], "bad": []})
        g["good" if e.score >= 0.5 else "bad"].append((e.paths["GT"], e.score))
    pairs, with_pairs, without = [], 0, 0
    for key, g in groups.items():
        good, bad = g["good"], g["bad"]
        if pair_similar and not (good and bad):
            for other_key, other in groups.items():
                if other_key != key and _similar(g, other, similar_threshold):
                    good, bad = good or other["good"], bad or other["bad"]
                    if good and bad:
                        break
        combos = [(p, r) for p in good for r in bad]
        rng.shuffle(combos)
        combos = combos[:max_pairs_per_input] if max_pairs_per_input else combos
        with_pairs, without = with_pairs + bool(combos), without + (not combos)
        pairs += [{"source": g["source"], "mask": g["mask"], "preferred": p, "rejected": r,
                   "preferred_score": ps, "rejected_score": rs} for (p, ps), (r, rs) in combos]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(pairs, f, indent=1)
    return {"inputs": len(groups), "inputs_with_pairs": with_pairs, "inputs_without_pairs": without, "pairs": len(pairs)}


JUDGES = ("discriminator", "gt")
DEFAULT_MARGIN = {"discriminator": 0.1, "gt": 0.005}
DEFAULT_THRESHOLD = {"discriminator": 0.5, "gt": -0.02}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", required=True)
    g = p.add_argument_group("natural pairs (from scored annotations)")
    g.add_argument("--scored_meta_path", nargs="+", default=None, help="scored meta.json file(s): {source, mask, GT, score}")
    g.add_argument("--max_pairs_per_input", type=POSITIVE, default=None)
    g.add_argument("--pair_similar", action="store_true", help="borrow the missing side from a similar input (same mask, "
                   "sources within --similar_threshold mean squared difference)")
    g.add_argument("--similar_threshold", type=NONNEGATIVE_REAL, default=0.02)
    g = p.add_argument_group("generated pairs (remover candidates judged by the discriminator or against GT)")
    g.add_argument("--meta_path", nargs="+", default=None, help="input meta.json file(s) of {source, mask} to generate for")
    g.add_argument("--generate_for", choices=["unpaired", "all"], default="unpaired",
                   help="with --scored_meta_path: generate only for inputs without a natural pair, or for all")
    g.add_argument("--judge", choices=JUDGES, default="discriminator",
                   help="what scores a candidate: the discriminator's score, or gt: minus its MSE against the input's GT "
                        "inside the mask ([-1, 1] pixel units; the input meta.json needs GT), a known-answer preference")
    g.add_argument("--RORem_discriminator", default=None, help="discriminator folder (pytorch_lora_weights + cls_pred_branch.pt)")
    g.add_argument("--num_candidates", type=integer(2), default=8, help="K candidates per input")
    g.add_argument("--guidance_scales", type=NONNEGATIVE_REAL, nargs="+", default=None, help="several: candidates split among them")
    g.add_argument("--steps_options", type=POSITIVE, nargs="+", default=None, help="several step counts: candidates split among them")
    g.add_argument("--min_margin", type=real(), default=None,
                   help="pair best with worst only if their scores differ by more (default: 0.1 for the discriminator, "
                        "0.005 for gt)")
    g.add_argument("--threshold", type=real(), default=None,
                   help="a candidate's verdict in candidates.json: score >= this (default: 0.5 for the discriminator; "
                        "-0.02 for gt, i.e. masked MSE <= 0.02)")
    add_remover_args(p)
    args = p.parse_args(argv)
    if not (args.scored_meta_path or args.meta_path):
        raise UserError("give --scored_meta_path (natural pairs), --meta_path (generated pairs), or both")
    if args.meta_path:
        check_remover_args(args)
        if args.judge == "discriminator" and not args.RORem_discriminator:
            raise UserError("--meta_path generates candidates, which need --RORem_discriminator to judge them (or --judge gt)")
    if args.judge == "discriminator" and args.threshold is not None and not 0 <= args.threshold <= 1:
        raise UserError(f"--threshold: a discriminator verdict threshold is on its labels' scale, [0, 1], got {args.threshold}")
    args.min_margin = DEFAULT_MARGIN[args.judge] if args.min_margin is None else args.min_margin
    args.threshold = DEFAULT_THRESHOLD[args.judge] if args.threshold is None else args.threshold
    return args


def candidate_settings(args):
    """[(guidance_scale, steps)] for candidates 0..K-1: equal contiguous blocks per setting."""
    settings = list(itertools.product(args.guidance_scales or [args.guidance_scale], args.steps_options or [args.inference_steps]))
    if len(settings) > args.num_candidates:
        raise UserError(f"--num_candidates {args.num_candidates} is fewer than the {len(settings)} guidance/steps settings")
    return [settings[k * len(settings) // args.num_candidates] for k in range(args.num_candidates)]


def best_against_worst(candidates, min_margin):
    """The pair (best, worst) by score, or None when the margin is not above min_margin."""
    best = max(candidates, key=lambda c: c["score"])
    worst = min(candidates, key=lambda c: c["score"])
    return (best, worst) if best["score"] - worst["score"] > min_margin else None


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # a record is there whole or not at all


PAIRING_ONLY = ("output_dir", "device", "meta_path", "scored_meta_path", "max_pairs_per_input", "pair_similar", "similar_threshold",
                "generate_for", "min_margin", "threshold")  # what changes the pairs chosen, not the candidates


def candidate_keys(args, entries):
    """Per input: what its candidates are made from (its files, the remover, the discriminator, every
    generation setting), recorded in its record so a rerun never reuses another dataset's or model's."""
    return made_by.keys(entries, args, PAIRING_ONLY)


def check_records(args, entries, chosen, records_dir):
    """Records made from other inputs or settings (a different dataset or model in the same
    --output_dir: records are named by input index) are refused, before any work."""
    keys = candidate_keys(args, entries)
    for i in chosen:
        path = os.path.join(records_dir, f"{i:06d}.json")
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                made = json.load(f).get("made_by")
        except (OSError, ValueError):
            raise UserError(f"{path}: unreadable record; delete it to generate that input again") from None
        if made != keys[i]:
            raise UserError(f"--output_dir {args.output_dir}: {path} holds candidates made from other inputs or settings; "
                            "choose another --output_dir, or delete its records/ and candidates/ to start over")


def generate_candidates(args, entries, chosen, records_dir):
    """For each input index in `chosen` without a record yet: K candidates with fixed seeds, scored;
    one record file each."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from myutils.reward_utils import load_reward_model, score_entries

    # cpu=True where ranks have no GPU: a plain PartialState() sees the launcher's ranks only on GPUs,
    # and CPU ranks would each do every input (as Accelerator does, ACCELERATE_USE_CPU forces the CPU)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    # the split is fixed by position, not by which records exist: a rank that lists the folder after
    # another has started writing would otherwise shift its share onto inputs the other rank is doing
    keys = candidate_keys(args, entries)
    mine = [i for k, i in enumerate(chosen)
            if k % state.num_processes == state.process_index and not os.path.isfile(os.path.join(records_dir, f"{i:06d}.json"))]
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if args.device == "auto" and state.num_processes > 1:
        device = str(state.device)
    settings = candidate_settings(args)
    if mine:
        pipe, cond, uncond = load_remover(args, device, dtype)
        if args.judge == "discriminator":
            reward = load_reward_model(args.pretrained_model, args.RORem_discriminator, args.resolution, device, dtype, args.variant)
    cand_dir = os.path.abspath(os.path.join(args.output_dir, "candidates"))
    os.makedirs(cand_dir, exist_ok=True)
    for i in tqdm(mine, desc=f"candidates (rank {state.process_index})", disable=not mine):
        e = entries[i]
        image, mask = load_image(e.paths["source"]), load_mask(e.paths["mask"])
        cands, images = [], []
        for setting, block in itertools.groupby(range(args.num_candidates), key=lambda k: settings[k]):
            ks = list(block)
            run = argparse.Namespace(**{**vars(args), "guidance_scale": setting[0], "inference_steps": setting[1]})
            seed = args.seed + i * args.num_candidates + ks[0]
            for k, result in zip(ks, remove_objects(pipe, cond, uncond, [image] * len(ks), [mask] * len(ks), run, seed)):
                path = os.path.join(cand_dir, f"{i:06d}_{k:02d}.png")
                result.save(path)
                images.append(result)
                cands.append({"path": path, "seed": args.seed + i * args.num_candidates + k,
                              "guidance_scale": setting[0], "inference_steps": setting[1]})
        if args.judge == "gt":  # known answer: minus the masked error against the input's own GT
            gt = load_image(e.paths["GT"])
            scores = [-masked_mse(result, gt, mask) for result in images]
        else:
            scored = [Entry(e.meta, i, {"source": e.paths["source"], "mask": e.paths["mask"], "GT": c["path"]}) for c in cands]
            scores = score_entries(reward, scored, args.resolution, batch_size=len(scored))
        for c, s in zip(cands, scores):
            c["score"] = float(s)
        write_json(os.path.join(records_dir, f"{i:06d}.json"),
                   {"source": e.paths["source"], "mask": e.paths["mask"], "candidates": cands, "made_by": keys[i]})
    state.wait_for_everyone()
    return state.is_main_process


def main(argv=None):
    args = parse_args(argv)
    output_folder(args.output_dir, "--output_dir")
    pairs, report = [], {}
    if args.scored_meta_path:
        natural = os.path.join(args.output_dir, "natural_pairs.json")
        report["natural"] = meta_to_preference_dataset_format(args.scored_meta_path, natural, args.max_pairs_per_input,
                                                              args.pair_similar, args.similar_threshold, args.seed)
        with open(natural) as f:
            pairs += json.load(f)
        print(f"natural pairs: {report['natural']['pairs']} from {report['natural']['inputs_with_pairs']} inputs; "
              f"{report['natural']['inputs_without_pairs']} inputs have no pair")
    if args.meta_path:
        entries = read_meta(args.meta_path, "triplet" if args.judge == "gt" else "input")
        for w in check_entries(entries, progress=len(entries) > 200):
            print(f"warning: {w}")
        paired = {content_key(p["source"], p["mask"]) for p in pairs} if args.generate_for == "unpaired" else set()
        chosen = [i for i, e in enumerate(entries) if content_key(e.paths["source"], e.paths["mask"]) not in paired]
        records_dir = os.path.join(args.output_dir, "records")
        os.makedirs(records_dir, exist_ok=True)
        check_records(args, entries, chosen, records_dir)
        todo = [i for i in chosen if not os.path.isfile(os.path.join(records_dir, f"{i:06d}.json"))]
        print(f"generating for {len(chosen)} of {len(entries)} inputs ({len(chosen) - len(todo)} already done)")
        if not generate_candidates(args, entries, chosen, records_dir):
            return None  # other ranks: the main process writes the files
        records = []
        for i in chosen:
            with open(os.path.join(records_dir, f"{i:06d}.json")) as f:
                records.append(json.load(f))
        generated = [(r, best_against_worst(r["candidates"], args.min_margin)) for r in records]
        pairs += [{"source": r["source"], "mask": r["mask"], "preferred": b["path"], "rejected": w["path"],
                   "preferred_score": b["score"], "rejected_score": w["score"]} for r, bw in generated if bw for b, w in [bw]]
        raw = {"discriminator": lambda c: {"discriminator_score": c["score"]}, "gt": lambda c: {"masked_mse": -c["score"]}}[args.judge]
        candidates = [{"source": r["source"], "mask": r["mask"], "GT": c["path"], "score": int(c["score"] >= args.threshold),
                       **raw(c), "seed": c["seed"]} for r in records for c in r["candidates"]]
        write_json(os.path.join(args.output_dir, "candidates.json"), candidates)
        made = sum(bool(bw) for _, bw in generated)
        report["generated"] = {"inputs": len(records), "inputs_with_pairs": made, "inputs_below_margin": len(records) - made,
                               "pairs": made, "min_margin": args.min_margin, "candidates": len(candidates),
                               "judge": args.judge}
        print(f"generated pairs: {made} of {len(records)} inputs have a best-worst margin above {args.min_margin}")
    write_json(os.path.join(args.output_dir, "meta.json"), pairs)
    write_json(os.path.join(args.output_dir, "report.json"), report)
    print(f"{len(pairs)} pairs -> {os.path.join(args.output_dir, 'meta.json')}")
    return report


if __name__ == "__main__":
    run_cli(main)
