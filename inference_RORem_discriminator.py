#!/usr/bin/env python
"""Score object removals with the RORem discriminator.

    python inference_RORem_discriminator.py --RORem_discriminator path/to/disc \
        --image_path source.png --mask_path mask.png --edited_path result.png
    python inference_RORem_discriminator.py --RORem_discriminator path/to/disc \
        --meta_path results/meta.json --output_path scores.csv --scored_meta_path scored/meta.json

Single mode prints the score and the verdict (success if score >= --threshold). Batch mode reads
{"source", "mask", "GT": edited result} entries, writes every score to --output_path (.json or .csv)
and, with --scored_meta_path, the same entries with "score" = the verdict (0/1, or the raw score
clamped to [0, 1] with --raw_scores): RORem's automatic annotation (stage 3). Entries that already
carry a human "score" are compared with the discriminator (agreement and ROC AUC).
"""
import argparse
import csv
import json
import os

from myutils.args import POSITIVE, SCORE, resolution
from myutils.data import Entry, check_entries, read_meta
from myutils.errors import UserError, output_file, run_cli
from myutils.metrics import accuracy_at, roc_auc
from myutils.models import DEFAULT_MODEL, resolve_device_dtype
from myutils.reward_utils import load_reward_model, score_entries


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained_model", default=DEFAULT_MODEL, help="SDXL-inpainting folder or hub id")
    p.add_argument("--RORem_discriminator", required=True, help="folder with pytorch_lora_weights.safetensors + cls_pred_branch.pt")
    p.add_argument("--image_path", default=None, help="the source image (object present)")
    p.add_argument("--mask_path", default=None)
    p.add_argument("--edited_path", default=None, help="the removal result to judge")
    p.add_argument("--meta_path", nargs="+", default=None, help="meta.json file(s) of {source, mask, GT=edited} entries")
    p.add_argument("--output_path", default="scores.json", help="batch mode: .json or .csv")
    p.add_argument("--scored_meta_path", default=None, help="batch mode: write the entries with discriminator scores")
    p.add_argument("--raw_scores", action="store_true", help="scored meta gets clamp(score, 0, 1) instead of the 0/1 verdict")
    p.add_argument("--threshold", type=SCORE, default=0.5)
    p.add_argument("--conditioning", choices=["auto", "rorem", "per_sample"], default="auto",
                   help="auto: what the discriminator was trained with (RORem's release: fixed time ids (512, 512, 0, 0, 512, 512) "
                        "and add_noise at t = 0; ours: each image's own size and crop)")
    p.add_argument("--resolution", type=resolution, default=512)
    p.add_argument("--batch_size", type=POSITIVE, default=8)
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    single = [args.image_path, args.mask_path, args.edited_path]
    if bool(args.meta_path) == any(single):
        raise UserError("give either --meta_path, or --image_path with --mask_path and --edited_path")
    if not args.meta_path and not all(single):
        raise UserError("--image_path, --mask_path and --edited_path go together")
    if not args.output_path.endswith((".json", ".csv")):
        raise UserError(f"--output_path {args.output_path}: must end in .json or .csv")
    if args.scored_meta_path and not args.scored_meta_path.endswith(".json"):
        raise UserError(f"--scored_meta_path {args.scored_meta_path}: must end in .json")
    inputs = {os.path.realpath(m): m for m in args.meta_path or []}
    for flag in ("output_path", "scored_meta_path"):
        path = getattr(args, flag)
        if path and os.path.realpath(path) in inputs:
            raise UserError(f"--{flag} {path} is the input --meta_path {inputs[os.path.realpath(path)]}: it would be replaced; "
                            "write to another file")
        if path and (args.meta_path or flag == "scored_meta_path"):
            output_file(path, f"--{flag}")  # now, not after the scoring
    if args.scored_meta_path and os.path.realpath(args.scored_meta_path) == os.path.realpath(args.output_path):
        raise UserError(f"--output_path and --scored_meta_path are the same file ({args.output_path})")
    return args


def human_score(extra):
    """The people's score of an entry, if any: its "score", unless the entry is our own earlier output
    (it has "discriminator_score"), whose "score" is the discriminator's verdict and whose people's
    score was kept as "human_score"."""
    if "discriminator_score" in extra:
        return extra.get("human_score")
    return extra.get("score", extra.get("human_score"))


def main(argv=None):
    args = parse_args(argv)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if args.meta_path:
        entries = read_meta(args.meta_path, "triplet")
    else:
        entries = [Entry("--image_path/--mask_path/--edited_path", 0,
                         {"source": args.image_path, "mask": args.mask_path, "GT": args.edited_path})]
    for warning in check_entries(entries, progress=len(entries) > 200):
        print(f"warning: {warning}")
    reward = load_reward_model(args.pretrained_model, args.RORem_discriminator, args.resolution, device, dtype,
                               conditioning=args.conditioning)
    scores = score_entries(reward, entries, args.resolution, args.batch_size)
    if not args.meta_path:
        verdict = "success" if scores[0] >= args.threshold else "failure"
        print(f"score {scores[0]:.4f} -> {verdict} (threshold {args.threshold})")
        return scores
    rows = [{"meta": e.meta, "index": e.index, "source": e.paths["source"], "mask": e.paths["mask"], "edited": e.paths["GT"],
             "score": s, "verdict": int(s >= args.threshold), "human_score": human_score(e.extra)}
            for e, s in zip(entries, scores)]
    os.makedirs(os.path.dirname(os.path.abspath(args.output_path)), exist_ok=True)
    if args.output_path.endswith(".csv"):
        with open(args.output_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        with open(args.output_path, "w") as f:
            json.dump(rows, f, indent=1)
    passed = sum(r["verdict"] for r in rows)
    print(f"{len(rows)} results scored: {passed} pass ({passed / len(rows):.0%}) at threshold {args.threshold}; "
          f"mean score {sum(scores) / len(scores):.4f} -> {args.output_path}")
    human = [(r["score"], r["human_score"]) for r in rows if isinstance(r["human_score"], (int, float))]
    if human:
        s, y = zip(*human)
        auc = roc_auc(s, y)
        print(f"agreement with the {len(human)} existing scores: {accuracy_at(s, y, args.threshold):.1%}"
              + (f", ROC AUC {auc:.3f}" if auc is not None else ""))
    if args.scored_meta_path:
        out_dir = os.path.dirname(os.path.abspath(args.scored_meta_path))
        os.makedirs(out_dir, exist_ok=True)
        kept = ("score", "human_score", "discriminator_score")  # rewritten below; the people's score is never replaced
        scored = [{**{k: v for k, v in e.extra.items() if k not in kept},
                   **({"human_score": human_score(e.extra)} if human_score(e.extra) is not None else {}),
                   "source": e.paths["source"], "mask": e.paths["mask"], "GT": e.paths["GT"],
                   "score": min(1.0, max(0.0, s)) if args.raw_scores else int(s >= args.threshold), "discriminator_score": s}
                  for e, s in zip(entries, scores)]
        with open(args.scored_meta_path, "w") as f:
            json.dump(scored, f, indent=1)
        print(f"scored meta: {args.scored_meta_path}")
    return scores


if __name__ == "__main__":
    run_cli(main)
