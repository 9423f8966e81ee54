#!/usr/bin/env python
"""The research plan's DPO sweep (phase 2.4): beta values, LoRA vs full fine-tune, the SFT baseline
and Diffusion-KTO on the same scored data, one run after another, then one results table.

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

`kto` (with --scored_meta_path, the scored results the pairs come from): one train_RORem_kto.py run on
those results as they are, with the same arguments except --preference_data (-> --meta_path the scored
results) and --config (-> --kto_config), so it validates on the same held-out pairs (give the
validation settings after `--`, so that a setting one config has and the other lacks cannot differ). Without
--preference_data the sweep builds the natural pairs of the scored results itself
(<output_root>/natural_pairs, scripts/build_preference_pairs.py --scored_meta_path): DPO, SFT and KTO
then learn from the same verdicts.

    python scripts/sweep_dpo.py --output_root experiment/pref_sweep --betas 1.0 --variants lora sft kto \
        --scored_meta_path scored/meta.json -- --config configs/dpo_config.yaml --pretrained_unet path/to/RORem_unet \
        --validation_meta_path pairs/heldout.json --discriminator_path path/to/disc --validation_steps 200
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from myutils.args import POSITIVE_REAL  # noqa: E402
from myutils.sweep import fmt, interval, parse_sweep_args, run_all, sweep_parser, write_tables  # noqa: E402


def parse_args(argv=None):
    p = sweep_parser(__doc__.split("\n")[0])
    p.add_argument("--betas", type=POSITIVE_REAL, nargs="+", default=[0.1, 0.5, 1.0, 2.0])
    p.add_argument("--beta_unit", choices=["mean", "sum"], default="sum", help="the plan's sweep is in summed units")
    p.add_argument("--variants", nargs="+", choices=["lora", "full", "sft", "kto"], default=["lora", "full", "sft"])
    p.add_argument("--loss_type", choices=["sigmoid", "hinge", "ipo"], default="sigmoid")
    p.add_argument("--scored_meta_path", default=None,
                   help="kto: the scored results (0/1) KTO trains on; without --preference_data, also DPO's natural pairs")
    p.add_argument("--kto_config", default=os.path.join(ROOT, "configs", "kto_config.yaml"), help="kto: the run's --config")
    args = parse_sweep_args(p, argv)
    if "kto" in args.variants and not args.scored_meta_path:
        p.error("--variants kto needs --scored_meta_path (the scored results KTO trains on)")
    if not given(args.train_args, "--preference_data") and not args.scored_meta_path:
        p.error("give --preference_data after --, or --scored_meta_path to pair the scored results")
    return args


def given(argv, flag):
    """Whether argv has `flag X` or `flag=X`."""
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def without_option(argv, flag):
    """argv without `flag X` and `flag=X`."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 2
            continue
        if not argv[i].startswith(flag + "="):
            out.append(argv[i])
        i += 1
    return out


def kto_arguments(args):
    """The KTO run's arguments: the DPO runs' with the scored results in place of the pairs and the
    KTO config in place of theirs."""
    argv = args.train_args
    for flag in ("--config", "--preference_data", "--meta_path"):
        argv = without_option(argv, flag)
    return ["--config", args.kto_config, *argv, "--meta_path", args.scored_meta_path]


def natural_pairs(args):
    """--preference_data for the DPO runs: as given, or the scored results' natural pairs, built once."""
    if given(args.train_args, "--preference_data"):
        return
    folder = os.path.join(args.output_root, "natural_pairs")
    if not os.path.isfile(os.path.join(folder, "meta.json")) and not args.dry_run:
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "build_preference_pairs.py"), "--scored_meta_path",
               args.scored_meta_path, "--output_dir", folder]
        print("[natural pairs] " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            sys.exit("error: building the natural pairs of --scored_meta_path failed (its message is above)")
    args.train_args = [*args.train_args, "--preference_data", os.path.join(folder, "meta.json")]


def sweep_runs(args):
    """[(name, extra arguments)] of every run."""
    runs = []
    for variant in [v for v in args.variants if v in ("lora", "full")]:
        for beta in args.betas:
            runs.append((f"{variant}_beta{beta:g}", ["--beta", f"{beta:g}", "--beta_unit", args.beta_unit, "--loss_type", args.loss_type,
                                                     "--use_lora" if variant == "lora" else "--no-use_lora"]))
    if "sft" in args.variants:
        runs.append(("sft", ["--loss_type", "sft", "--use_lora"]))
    if "kto" in args.variants:
        runs.append(("kto", [], "train_RORem_kto.py", kto_arguments(args)))
    return runs


def results_row(final):
    m, a = final["metrics"] or {}, final["args"]
    loss = a.get("loss_type", "kto")  # KTO's runs have no loss type
    return {"run": final["name"], "loss": loss,
            "beta": "-" if loss == "sft" else f"{a['beta']:g} ({a.get('beta_unit', 'mean')})",
            "trained": "LoRA r%d" % a["lora_rank"] if a["use_lora"] else "full UNet", "steps": a["max_train_steps"], "seed": a["seed"],
            "preference_accuracy": m.get("val_preference_accuracy"), "win_rate": m.get("val_win_rate"),
            "win_rate_low": m.get("val_win_rate_low"), "win_rate_high": m.get("val_win_rate_high"),
            "score": m.get("val_score"), "reference_score": m.get("val_reference_score"),
            "masked_mse": m.get("val_masked_mse"), "reference_masked_mse": m.get("val_reference_masked_mse")}


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_root, exist_ok=True)
    natural_pairs(args)
    finals = run_all(args, "train_RORem_dpo.py", sweep_runs(args))
    if not finals:
        return []
    rows = [results_row(f) for f in finals]
    ref_score = next((r["reference_score"] for r in rows if r["reference_score"] is not None), None)
    ref_mse = next((r["reference_masked_mse"] for r in rows if r["reference_masked_mse"] is not None), None)
    rows.insert(0, {"run": "start (reference)", "loss": "-", "beta": "-", "trained": "-", "steps": 0, "seed": "-",
                    "preference_accuracy": 0.5, "win_rate": 0.5 if ref_score is not None else None, "score": ref_score,
                    "reference_score": ref_score, "masked_mse": ref_mse, "reference_masked_mse": ref_mse})
    write_tables(args.output_root, rows,
                 ["run", "loss", "beta", "trained", "steps", "held-out preference acc.", "win rate vs start [95% CI]",
                  "mean score (run / start)", "masked MSE vs preferred (run / start)"],
                 lambda r: [r["run"], r["loss"], r["beta"], r["trained"], str(r["steps"]), fmt(r["preference_accuracy"]),
                            interval(r), f"{fmt(r['score'])} / {fmt(r['reference_score'])}",
                            f"{fmt(r['masked_mse'], 4)} / {fmt(r['reference_masked_mse'], 4)}"])
    return rows


if __name__ == "__main__":
    main()
