#!/usr/bin/env python
"""The research plan's DPO sweep (phase 2.4): beta values, LoRA vs full fine-tune, and the SFT
baseline, one run after another, then one results table.

    python scripts/sweep_dpo.py --output_root experiment/dpo_sweep --betas 0.1 0.5 1.0 2.0 --beta_unit sum \
        --variants lora full sft --launch "accelerate launch --config_file configs/accelerate_8gpu.yaml" -- \
        --config configs/dpo_config.yaml --pretrained_unet path/to/RORem_unet --preference_data pairs/meta.json \
        --validation_meta_path pairs/heldout.json --discriminator_path path/to/disc --validation_steps 200

Everything after `--` goes to every run of train_RORem_dpo.py (give --validation_steps and a
--discriminator_path, or the table has no win rates). Runs: one per (variant, beta) for `lora` and
`full`, and one `sft` run (supervised fine-tuning on the preferred images, LoRA; with the config's
data this is the discriminator-filtered SFT baseline). A run whose final_metrics.json exists is
skipped; an interrupted run resumes from its latest checkpoint. The table lands in
<output_root>/sweep_results.{md,csv,json}, next to the starting model's row (preference accuracy
and win rate 0.5 by definition).
"""
import argparse
import csv
import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="arguments after -- are passed to every train_RORem_dpo.py run")
    p.add_argument("--output_root", required=True)
    p.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.5, 1.0, 2.0])
    p.add_argument("--beta_unit", choices=["mean", "sum"], default="sum", help="the plan's sweep is in summed units")
    p.add_argument("--variants", nargs="+", choices=["lora", "full", "sft"], default=["lora", "full", "sft"])
    p.add_argument("--loss_type", choices=["sigmoid", "hinge", "ipo"], default="sigmoid")
    p.add_argument("--launch", default=sys.executable, help='e.g. "accelerate launch --config_file configs/accelerate_8gpu.yaml"')
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.train_args = argv[cut + 1:]
    return args


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


def results_row(name, folder):
    with open(os.path.join(folder, "final_metrics.json")) as f:
        final = json.load(f)
    m, a = final["metrics"] or {}, final["args"]
    row = {"run": name, "loss": a["loss_type"], "beta": "-" if a["loss_type"] == "sft" else f"{a['beta']:g} ({a['beta_unit']})",
           "trained": "LoRA r%d" % a["lora_rank"] if a["use_lora"] else "full UNet", "steps": a["max_train_steps"], "seed": a["seed"],
           "preference_accuracy": m.get("val_preference_accuracy"), "win_rate": m.get("val_win_rate"),
           "win_rate_low": m.get("val_win_rate_low"), "win_rate_high": m.get("val_win_rate_high"),
           "score": m.get("val_score"), "reference_score": m.get("val_reference_score")}
    return row


def markdown_table(rows):
    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

    lines = ["| run | loss | beta | trained | steps | held-out preference acc. | win rate vs start [95% CI] | mean score (run / start) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = "" if r["win_rate_low"] is None else f" [{r['win_rate_low']:.2f}, {r['win_rate_high']:.2f}]"
        lines.append(f"| {r['run']} | {r['loss']} | {r['beta']} | {r['trained']} | {r['steps']} | {fmt(r['preference_accuracy'])} | "
                     f"{fmt(r['win_rate'])}{ci} | {fmt(r['score'])} / {fmt(r['reference_score'])} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_root, exist_ok=True)
    rows = []
    for name, extra in sweep_runs(args):
        folder = os.path.join(args.output_root, name)
        cmd = [*shlex.split(args.launch), os.path.join(ROOT, "train_RORem_dpo.py"), *args.train_args, *extra,
               "--output_dir", folder, "--resume_from_checkpoint", "latest"]
        if args.dry_run:
            print(shlex.join(cmd))
            continue
        if os.path.isfile(os.path.join(folder, "final_metrics.json")):
            print(f"[{name}] done before, skipped")
        else:
            print(f"[{name}] " + shlex.join(cmd), flush=True)
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                sys.exit(f"error: sweep run {name} failed (its log is above; rerun the sweep to resume it)")
        rows.append(results_row(name, folder))
    if args.dry_run:
        return []
    ref_score = next((r["reference_score"] for r in rows if r["reference_score"] is not None), None)
    rows.insert(0, {**{k: "-" for k in rows[0]}, "run": "start (reference)", "preference_accuracy": 0.5, "win_rate": 0.5 if ref_score is not None else None,
                    "win_rate_low": None, "win_rate_high": None, "score": ref_score, "reference_score": ref_score})
    table = markdown_table(rows)
    with open(os.path.join(args.output_root, "sweep_results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.output_root, "sweep_results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.output_root, "sweep_results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n" + table)
    return rows


if __name__ == "__main__":
    main()
