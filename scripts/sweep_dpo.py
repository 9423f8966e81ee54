#!/usr/bin/env python
"""The research plan's DPO sweep (phase 2.4): beta values, LoRA vs full fine-tune, and the SFT
baseline, one run after another, then one results table.

    python scripts/sweep_dpo.py --output_root experiment/dpo_sweep --betas 0.1 0.5 1.0 2.0 --beta_unit sum \
        --variants lora full sft --launch "accelerate launch --config_file configs/accelerate_8gpu.yaml" -- \
        --config configs/dpo_config.yaml --pretrained_unet path/to/RORem_unet --preference_data pairs/meta.json \
        --validation_meta_path pairs/heldout.json --discriminator_path path/to/disc --validation_steps 200

Everything after `--` goes to every run of train_RORem_dpo.py (give --validation_steps and a
--discriminator_path, or the table has no win rates). Runs: one per (variant, beta) for `lora` and
`full`, and one `sft` run (supervised fine-tuning on the preferred images, LoRA; with pairs whose
preferred side the discriminator chose, this is the discriminator-filtered SFT baseline). A run whose
final_metrics.json exists is skipped; an interrupted run resumes from its latest checkpoint. The
table lands in <output_root>/sweep_results.{md,csv,json}, below the starting model's row
(preference accuracy and win rate 0.5 by definition).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from myutils.args import POSITIVE_REAL  # noqa: E402
from myutils.sweep import fmt, interval, parse_sweep_args, run_all, sweep_parser, write_tables  # noqa: E402


def parse_args(argv=None):
    p = sweep_parser(__doc__.split("\n")[0])
    p.add_argument("--betas", type=POSITIVE_REAL, nargs="+", default=[0.1, 0.5, 1.0, 2.0])
    p.add_argument("--beta_unit", choices=["mean", "sum"], default="sum", help="the plan's sweep is in summed units")
    p.add_argument("--variants", nargs="+", choices=["lora", "full", "sft"], default=["lora", "full", "sft"])
    p.add_argument("--loss_type", choices=["sigmoid", "hinge", "ipo"], default="sigmoid")
    return parse_sweep_args(p, argv)


def sweep_runs(args):
    """[(name, extra arguments)] of every run."""
    runs = []
    for variant in [v for v in args.variants if v != "sft"]:
        for beta in args.betas:
            runs.append((f"{variant}_beta{beta:g}", ["--beta", f"{beta:g}", "--beta_unit", args.beta_unit, "--loss_type", args.loss_type,
                                                     "--use_lora" if variant == "lora" else "--no-use_lora"]))
    if "sft" in args.variants:
        runs.append(("sft", ["--loss_type", "sft", "--use_lora"]))
    return runs


def results_row(final):
    m, a = final["metrics"] or {}, final["args"]
    return {"run": final["name"], "loss": a["loss_type"],
            "beta": "-" if a["loss_type"] == "sft" else f"{a['beta']:g} ({a['beta_unit']})",
            "trained": "LoRA r%d" % a["lora_rank"] if a["use_lora"] else "full UNet", "steps": a["max_train_steps"], "seed": a["seed"],
            "preference_accuracy": m.get("val_preference_accuracy"), "win_rate": m.get("val_win_rate"),
            "win_rate_low": m.get("val_win_rate_low"), "win_rate_high": m.get("val_win_rate_high"),
            "score": m.get("val_score"), "reference_score": m.get("val_reference_score")}


def main(argv=None):
    args = parse_args(argv)
    finals = run_all(args, "train_RORem_dpo.py", sweep_runs(args))
    if not finals:
        return []
    rows = [results_row(f) for f in finals]
    ref_score = next((r["reference_score"] for r in rows if r["reference_score"] is not None), None)
    rows.insert(0, {"run": "start (reference)", "loss": "-", "beta": "-", "trained": "-", "steps": 0, "seed": "-",
                    "preference_accuracy": 0.5, "win_rate": 0.5 if ref_score is not None else None, "score": ref_score,
                    "reference_score": ref_score})
    write_tables(args.output_root, rows,
                 ["run", "loss", "beta", "trained", "steps", "held-out preference acc.", "win rate vs start [95% CI]",
                  "mean score (run / start)"],
                 lambda r: [r["run"], r["loss"], r["beta"], r["trained"], str(r["steps"]), fmt(r["preference_accuracy"]),
                            interval(r), f"{fmt(r['score'])} / {fmt(r['reference_score'])}"])
    return rows


if __name__ == "__main__":
    main()
