#!/usr/bin/env python
"""The research plan's reward-weighted distillation sweep (phase 3.4): hard filtering at several
thresholds and soft weighting at several temperatures against plain LCM, all 4-step students
compared with the many-step teacher in one table.

    python scripts/sweep_lcm.py --output_root experiment/lcm_sweep --thresholds 0.3 0.5 0.7 --temperatures 0.1 0.5 1.0 \
        --launch "accelerate launch --config_file configs/accelerate_8gpu.yaml" -- \
        --config configs/lcm_rewarded_config.yaml --pretrained_teacher_unet path/to/RORem_unet --meta_path data/meta.json \
        --validation_meta_path data/heldout.json --discriminator_path path/to/disc --validation_steps 1000

Everything after `--` goes to every run of train_RORem_lcm.py; give --discriminator_path (the plain
run uses it only to score validation, with --weighting none) and --validation_steps. Rows: the
teacher (--validation_inference_steps steps, guidance 1), plain LCM, filter_<threshold>,
softmax_<temperature>; columns: UNet calls per image, the discriminator's win rate against the
teacher on the same held-out inputs and seeds [95% CI], mean score, masked-region MSE against GT.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from myutils.args import POSITIVE_REAL, SCORE  # noqa: E402
from myutils.sweep import fmt, interval, parse_sweep_args, run_all, sweep_parser, write_tables  # noqa: E402


def parse_args(argv=None):
    p = sweep_parser(__doc__.split("\n")[0])
    p.add_argument("--thresholds", type=SCORE, nargs="*", default=[0.3, 0.5, 0.7])
    p.add_argument("--temperatures", type=POSITIVE_REAL, nargs="*", default=[0.1, 0.5, 1.0])
    return parse_sweep_args(p, argv)


def sweep_runs(args):
    runs = [("plain", ["--weighting", "none"])]
    runs += [(f"filter_{t:g}", ["--weighting", "filter", "--reward_threshold", f"{t:g}"]) for t in args.thresholds]
    runs += [(f"softmax_{t:g}", ["--weighting", "softmax", "--reward_temperature", f"{t:g}"]) for t in args.temperatures]
    return runs


def results_row(final):
    m, a = final["metrics"] or {}, final["args"]
    weighting = {"none": "plain LCM", "filter": f"filter, score >= {a['reward_threshold']:g}",
                 "softmax": f"softmax, T = {a['reward_temperature']:g}"}.get(a["weighting"], a["weighting"])
    return {"run": final["name"], "weighting": weighting, "source": a["reward_source"] if a["weighting"] != "none" else "-",
            "steps": a["max_train_steps"], "seed": a["seed"],
            "unet_calls": int(a["validation_lcm_steps"] * a.get("validation_lcm_strength", 1.0)),  # diffusers runs int(steps * strength)
            "win_rate": m.get("val_win_rate"), "win_rate_low": m.get("val_win_rate_low"), "win_rate_high": m.get("val_win_rate_high"),
            "score": m.get("val_score"), "masked_mse": m.get("val_masked_mse"),
            "teacher_score": m.get("val_reference_score"), "teacher_masked_mse": m.get("val_reference_masked_mse"),
            "teacher_calls": int(a["validation_inference_steps"] * a["validation_strength"])}


def main(argv=None):
    args = parse_args(argv)
    finals = run_all(args, "train_RORem_lcm.py", sweep_runs(args))
    if not finals:
        return []
    rows = [results_row(f) for f in finals]
    first = rows[0]
    rows.insert(0, {"run": "teacher", "weighting": "many-step teacher", "source": "-", "steps": "-", "seed": "-",
                    "unet_calls": first["teacher_calls"], "win_rate": 0.5 if first["teacher_score"] is not None else None,
                    "score": first["teacher_score"], "masked_mse": first["teacher_masked_mse"]})
    write_tables(args.output_root, rows,
                 ["run", "weighting", "score source", "train steps", "UNet calls / image", "win rate vs teacher [95% CI]",
                  "mean score", "masked MSE"],
                 lambda r: [r["run"], r["weighting"], r["source"], str(r["steps"]), str(r["unet_calls"]), interval(r),
                            fmt(r["score"]), fmt(r["masked_mse"], 4)])
    return rows


if __name__ == "__main__":
    main()
