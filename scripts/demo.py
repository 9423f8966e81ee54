#!/usr/bin/env python
"""The main job on the toy world, on a CPU: make data and tiny models, train a remover, then each
method from it twice where it can be, once on a signal whose optimum is known (GT: masked error, pairs
judged against GT, GT-based labels) and once on the discriminator, and compare each with its start on
held-out inputs, same seeds, with paired intervals (<work_dir>/report/README.md leads with that table).

    python scripts/demo.py --work_dir .demo          (what `make demo` runs)

Each stage is skipped when its output exists, so a second run only re-evaluates; delete a stage's
folder under --work_dir to redo it. Masked MSE is the mean squared error inside the mask in [-1, 1]
pixel space against GT (lower is better).
"""
import argparse
import concurrent.futures
import contextlib
import functools
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from myutils.args import NONNEGATIVE_REAL, POSITIVE, SEED  # noqa: E402
from toy_world.data import BACKGROUNDS  # noqa: E402

STRUCTURED = ("stripes", "two_tone", "grid")
from toy_world.report import hacking_reading, hypervolume_change, lead_table, method_row, verdict  # noqa: E402


# Two stages that do not depend on each other run side by side, one CPU thread each: on 2 cores two
# 1-thread processes do 1.3-1.6x the work of one 2-thread process on these tiny models (remover:
# 2 x 1.85 vs 2.85 steps/s; the VAE fit 1.6x). A stage run that way writes its output to
# <work_dir>/logs/<stage>.log. (Forking the stages from one process that imported torch and diffusers
# once saves ~12 s of imports per script, but the forked children trained about 5% slower at one
# thread and 20-30% at two: measured, dropped.)
LANE = threading.local()
LOG_DIR = [None]


def run(args):
    if os.path.basename(args[0]).startswith("train_RORem") and "--resume_from_checkpoint" not in args:
        args = [*args, "--resume_from_checkpoint", "latest"]  # a stage cut short continues exactly (a new run there is refused)
    log = getattr(LANE, "log", None)
    if log is None:
        print("+ " + " ".join(args), flush=True)
        subprocess.run([sys.executable, *args], check=True, cwd=ROOT)
        return
    print(f"+ {' '.join(args)}\n  (output: {log})", flush=True)
    with open(log, "a") as f:
        code = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")).returncode
    if code:
        sys.exit(f"error: {args[0]} failed; its output is in {log}")


@contextlib.contextmanager
def side_by_side(on=True):
    """Stages in this block run with one thread and log to files (another lane runs beside them)."""
    LANE.side_by_side = on
    try:
        yield
    finally:
        LANE.side_by_side = False


def in_lane(fn, *a):
    with side_by_side():
        return fn(*a)


ONLY, DONE = set(), set()  # --only: the stages to run; the ones before them must already have their outputs


def stage(name, output, fn):
    if os.path.exists(output):
        print(f"[{name}] {output} exists, skipped")
        DONE.add(name)
        return
    if ONLY and name not in ONLY:
        if ONLY <= DONE:  # everything asked for has run; later stages are not wanted
            print(f"--only {', '.join(sorted(ONLY))}: done (run the demo without --only for the rest and the report)")
            sys.exit(0)
        sys.exit(f"error: stage '{name}' has not run ({output} is missing): add it to --only, or run the demo without --only")
    start = time.time()
    LANE.log = None
    if getattr(LANE, "side_by_side", False):
        os.makedirs(LOG_DIR[0], exist_ok=True)
        LANE.log = os.path.join(LOG_DIR[0], name.replace(" ", "_").replace("(", "").replace(")", "") + ".log")
    try:
        fn()
    finally:
        LANE.log = None
    DONE.add(name)
    print(f"[{name}] done in {time.time() - start:.0f} s", flush=True)


def check_backgrounds(w, backgrounds):
    """Every stage after the data reuses what a work_dir holds, so a work_dir is for one choice of
    --backgrounds: recorded with its data (write_toy_data), and a different choice is refused before
    anything runs."""
    path = f"{w}/data/backgrounds.json"
    if os.path.isfile(path):
        with open(path) as f:
            made = json.load(f)
        if made != list(backgrounds):
            sys.exit(f"error: --work_dir {w} holds a demo on --backgrounds {' '.join(made)}; choose another --work_dir "
                     f"for --backgrounds {' '.join(backgrounds)} (or remove {w})")
    elif os.path.exists(f"{w}/data/heldout/meta.json"):  # made before the choice was recorded: the original toy
        if list(backgrounds) != ["smooth"]:
            sys.exit(f"error: --work_dir {w} holds a demo on the smooth backgrounds; choose another --work_dir "
                     f"for --backgrounds {' '.join(backgrounds)} (or remove {w})")


def write_toy_data(w, args):
    os.makedirs(f"{w}/data", exist_ok=True)
    with open(f"{w}/data/backgrounds.json", "w") as f:
        json.dump(list(args.backgrounds), f)
    for name, num, seed in (("train", args.train_samples, 0), ("heldout", args.heldout_samples, 1)):
        run(["scripts/make_toy_dataset.py", "--out", f"{w}/data/{name}", "--num", str(num), "--seed", str(seed),
             "--backgrounds", *args.backgrounds])


def make_scored_data(w, train_meta, held_meta, model_dir, remover_dir, args):
    from toy_world.data import write_scored_toy_dataset

    with open(train_meta) as f:
        subset = json.load(f)[: args.scored_inputs]
    root = os.path.dirname(train_meta)
    os.makedirs(f"{w}/scored/inputs", exist_ok=True)
    with open(f"{w}/scored/inputs/meta.json", "w") as f:
        json.dump([{k: os.path.join(root, v) for k, v in e.items()} for e in subset], f)
    for name, meta in (("train", f"{w}/scored/inputs/meta.json"), ("heldout", held_meta)):
        run(["inference_RORem.py", "--pretrained_model", model_dir, "--RORem_unet", f"{remover_dir}/unet",
             "--meta_path", meta, "--save_path", f"{w}/scored/remover_{name}", "--resolution", "32",
             "--inference_steps", str(args.eval_steps), "--strength", "1.0", "--batch_size", "16", "--seed", str(args.seed + 1000)])
        write_scored_toy_dataset(meta, f"{w}/scored/{name}", seed=args.seed,
                                 results={"trained remover": f"{w}/scored/remover_{name}/meta.json"})


def make_pairs(w, model_dir, remover_dir, disc_dir, args):
    """Preference pairs from the same remover candidates (4 per training input, fixed seeds), judged two
    ways: against GT (masked error, the known answer) and by the discriminator (the research signal);
    held-out natural pairs (true removal against a failure) for DPO's preference accuracy."""
    with open(f"{w}/scored/inputs/meta.json") as f:
        inputs = json.load(f)[: args.pair_inputs]
    os.makedirs(f"{w}/pairs", exist_ok=True)
    with open(f"{w}/pairs/candidate_inputs.json", "w") as f:
        json.dump(inputs, f)
    for judge, extra in (("gt", []), ("discriminator", ["--RORem_discriminator", disc_dir])):
        # every input paired (margin 0), so both runs train on the same inputs and candidates and differ
        # only in which candidate each judge prefers
        run(["scripts/build_preference_pairs.py", "--meta_path", f"{w}/pairs/candidate_inputs.json", "--judge", judge, *extra,
             "--min_margin", "0",
             "--pretrained_model", model_dir, "--RORem_unet", f"{remover_dir}/unet", "--num_candidates", "4",
             "--inference_steps", str(args.eval_steps), "--strength", "1.0", "--resolution", "32", "--seed", str(args.seed + 2000),
             "--output_dir", f"{w}/pairs/{judge}"])
    run(["scripts/build_preference_pairs.py", "--scored_meta_path", f"{w}/scored/heldout/meta.json", "--output_dir", f"{w}/pairs/heldout"])


def grpo_command(w, args, out, *extra):
    """Online RL from the trained remover (configs/toy_ddpo.yaml): every run from the same start, seeds
    and settings, only what `extra` says differing."""
    return ["train_RORem_ddpo.py", "--config", "configs/toy_ddpo.yaml", "--pretrained_model_name_or_path", f"{w}/models/toy_sdxl_inpaint",
            "--pretrained_unet", f"{w}/remover/unet", "--meta_path", f"{w}/data/train/meta.json",
            "--validation_meta_path", f"{w}/data/heldout/meta.json", "--seed", str(args.seed), "--output_dir", f"{w}/{out}", *extra]


def lcm_command(w, args, script, out, *extra):
    """LCM distillation of the trained remover on the scored training results (configs/toy_lcm.yaml),
    validated with the discriminator's win rate on 8 held-out inputs (the evaluation measures all)."""
    return [script, "--config", "configs/toy_lcm.yaml", "--pretrained_model_name_or_path", f"{w}/models/toy_sdxl_inpaint",
            "--pretrained_teacher_unet", f"{w}/remover/unet", "--meta_path", f"{w}/scored/train/meta.json",
            "--validation_meta_path", f"{w}/data/heldout/meta.json", "--discriminator_path", f"{w}/discriminator",
            "--max_train_steps", str(args.lcm_steps), "--validation_steps", str(args.lcm_steps), "--win_rate_samples", "8",
            "--seed", str(args.seed), "--output_dir", f"{w}/{out}", *extra]


def grpo_and_lcm_stages(w, args, which):
    """The main demo's GRPO runs and plain LCM student, which the DRaFT part is compared with (run here
    when the main demo has not run them)."""
    if "grpo_gt" in which:
        stage("GRPO (GT reward)", f"{w}/rl_gt/final_metrics.json", lambda: run(grpo_command(w, args, "rl_gt", "--reward", "gt=1")))
    if "lcm" in which:
        stage("LCM", f"{w}/lcm/final_metrics.json", lambda: run(lcm_command(w, args, "train_RORem_lcm.py", "lcm", "--weighting", "none")))
    if "grpo" in which:
        stage("online RL", f"{w}/rl/final_metrics.json", lambda: run(grpo_command(w, args, "rl", "--discriminator_path",
                                                                                 f"{w}/discriminator")))


def win_of(evaluation, a, b):
    """System a's discriminator win rate against b and its 95% interval, from evaluate_RORem.py's results."""
    for r in evaluation["win_rates"]:
        if (r["a"], r["b"]) == (a, b):
            return r["win_rate"], r["low"], r["high"]
        if (r["a"], r["b"]) == (b, a):  # the Wilson interval of 1 - p is 1 - the interval of p
            return 1 - r["win_rate"], 1 - r["high"], 1 - r["low"]
    raise KeyError(f"no win rate of {a} against {b} in the evaluation")


# the evaluated systems, by the name each has in the evaluation and the report
SYSTEMS = {"fill": "border fill (classical)", "untrained": "untrained remover", "teacher": "trained remover (teacher)",
           "dpo_gt": "DPO, GT-judged pairs", "dpo": "DPO, discriminator-judged pairs",
           "sdpo_gt": "SDPO, GT-judged pairs", "sdpo": "SDPO, discriminator-judged pairs",
           "kto": "KTO, scored results", "dpo_natural": "DPO, natural pairs of the scored results",
           "rl_gt": "GRPO, GT reward", "ppo_gt": "PPO, GT reward", "rl": "GRPO, discriminator reward",
           "lcm_undistilled": "trained remover, 4 LCM steps, not distilled", "lcm": "LCM student, 4 steps",
           "lcm_labels": "LCM student weighted by labels, 4 steps",
           "lcm_rewarded": "LCM student weighted by the discriminator, 4 steps"}
# (method, its signal, the system it is, the system it starts from) for the evaluation's systems
KNOWN_ANSWER = [("supervised remover vs the border fill", "GT (training triplets)", "teacher", "fill"),
                ("DPO", "candidate pairs judged against GT", "dpo_gt", "teacher"),
                ("SDPO (DPO + safeguard, mu 0.6)", "candidate pairs judged against GT", "sdpo_gt", "teacher"),
                ("KTO", "the scored results' GT-based 0/1 labels", "kto", "teacher"),
                ("DPO", "natural pairs of the same scored results", "dpo_natural", "teacher"),
                ("GRPO", "reward: minus the masked error against GT", "rl_gt", "teacher"),
                ("PPO", "reward: minus the masked error against GT", "ppo_gt", "teacher"),
                ("label-weighted LCM vs plain LCM", "each target's GT-based label", "lcm_labels", "lcm")]
RESEARCH = [("DPO", "candidate pairs judged by the discriminator", "dpo", "teacher"),
            ("SDPO (DPO + safeguard, mu 0.6)", "candidate pairs judged by the discriminator", "sdpo", "teacher"),
            ("GRPO", "reward: the discriminator", "rl", "teacher"),
            ("discriminator-weighted LCM vs plain LCM", "the discriminator's score of each target", "lcm_rewarded", "lcm")]


def method_rows(w, evaluation):
    """The lead table: each method against its own start on the same held-out inputs and seeds, in the
    measure its signal optimises (masked MSE for the GT signals, the discriminator's score for the
    discriminator's), then Flow-GRPO's held-out reward and PGMORL's hypervolume."""
    per = evaluation["per_input"]
    rows = [method_row(m, sig, "masked MSE", per[SYSTEMS[a]]["masked_mse"], per[SYSTEMS[b]]["masked_mse"], True)
            for m, sig, b, a in KNOWN_ANSWER]
    if os.path.isfile(f"{w}/flow_rl/reward_history.json"):
        with open(f"{w}/flow_rl/reward_history.json") as f:
            evals = json.load(f)["evals"]
        rows.append(method_row("Flow-GRPO (tiny FLUX-Fill, from random init)", "reward: minus the masked error against GT, "
                               "plus preservation", "held-out reward (ODE)", [p["reward"] for p in evals[0]["per_sample"]],
                               [p["reward"] for p in evals[-1]["per_sample"]], False))
    rows += [method_row(m, sig, "discriminator score", per[SYSTEMS[a]]["discriminator_score"], per[SYSTEMS[b]]["discriminator_score"],
                        False, digits=3) for m, sig, b, a in RESEARCH]
    for name, out, objectives in MORL_RUNS:
        if os.path.isfile(f"{w}/{out}/policies.json"):
            summary, (change, low, high) = morl_test(f"{w}/{out}/policies.json")
            t = summary["test"]
            method = f"PGMORL ({len(t['front'])} polic{'y' if len(t['front']) == 1 else 'ies'} on the front)"
            signal = " and ".join(summary["objectives"]).replace("gt", "GT error")
            v = verdict(low, high, lower_is_better=False)
            rows.append({"method": method, "signal": signal, "measure": "hypervolume, test inputs", "start": t["hypervolume_start"],
                         "end": t["hypervolume_front"], "difference": change, "low": low, "high": high, "verdict": v,
                         "inputs": t["inputs"], "cells": [method, signal, "hypervolume (test inputs, bootstrap)",
                                                          f"{t['hypervolume_start']:.5f}", f"{t['hypervolume_front']:.5f}",
                                                          f"{change:+.5f} [{low:+.5f}, {high:+.5f}]", v]})
    return rows


def hacking_lines(evaluation):
    """Per method trained on a signal (against its start): the change of the discriminator's score
    and of the GT error, each with its interval, and what they say together."""
    per = evaluation["per_input"]
    lines = ["| method | signal | discriminator score change [95% CI] | masked MSE change [95% CI] | reading |", "|---|---|---|---|---|"]
    for m, sig, b, a in KNOWN_ANSWER[1:] + RESEARCH:
        score = method_row(m, sig, "", per[SYSTEMS[a]]["discriminator_score"], per[SYSTEMS[b]]["discriminator_score"], False, 3)
        error = method_row(m, sig, "", per[SYSTEMS[a]]["masked_mse"], per[SYSTEMS[b]]["masked_mse"], True)
        lines.append(f"| {m} | {sig} | {score['cells'][5]} | {error['cells'][5]} | {hacking_reading(score, error)} |")
    return lines


def dpo_report(w, args, rows, evaluation):
    score = {k: d for k, m, s, d, c in rows}
    with open(f"{w}/pairs/heldout/meta.json") as f:
        held = len(json.load(f))
    lines = ["## Diffusion-DPO (LoRA rank 8 on the trained remover)", "",
             f"The same 4 remover candidates for each of {args.pair_inputs} training inputs (fixed seeds), best against worst, judged "
             "against GT (masked error) or by the discriminator; beta 2000 (mean-error units), lr 1e-4, 16 pairs a step "
             "(`configs/toy_dpo.yaml`). Preference accuracy: held-out natural pairs (true removal against a failure), "
             "2 noises x 5 timesteps; win rate: the discriminator's, against the start on the same seeds.", "",
             "| loss | pairs judged by | pairs (inputs below the margin) | steps | held-out preference accuracy (start 0.500) | "
             "win rate vs start [95% CI] | mean discriminator score (start) |", "|---|---|---|---|---|---|---|"]
    for loss, judge, out in (("DPO", "GT", "dpo_gt"), ("DPO", "discriminator", "dpo"), ("SDPO", "GT", "sdpo_gt"),
                             ("SDPO", "discriminator", "sdpo")):
        if not os.path.isfile(f"{w}/{out}/final_metrics.json"):
            continue  # a work_dir from before the SDPO stages
        with open(f"{w}/{out}/final_metrics.json") as f:
            final = json.load(f)
        with open(f"{w}/pairs/{'gt' if judge == 'GT' else 'discriminator'}/report.json") as f:
            gen = json.load(f)["generated"]
        win, low, high = win_of(evaluation, SYSTEMS[out], SYSTEMS["teacher"])
        lines.append(f"| {loss} | {judge} | {gen['pairs']} ({gen['inputs_below_margin']} below {gen['min_margin']:g}) | "
                     f"{final['args']['max_train_steps']} | {final['metrics']['val_preference_accuracy']:.3f} ({held} pairs) | "
                     f"{win:.3f} [{low:.3f}, {high:.3f}] | {score[SYSTEMS[out]]:.3f} ({score[SYSTEMS['teacher']]:.3f}) |")
    per = evaluation["per_input"]
    safeguard = [method_row(f"SDPO vs DPO, {judge} pairs", "", "masked MSE", per[SYSTEMS[dpo]]["masked_mse"],
                            per[SYSTEMS[sdpo]]["masked_mse"], True)
                 for judge, dpo, sdpo in (("GT-judged", "dpo_gt", "sdpo_gt"), ("discriminator-judged", "dpo", "sdpo"))
                 if SYSTEMS[sdpo] in per]
    if safeguard:
        lines += ["", "SDPO (`--safeguard_mu 0.6`, the official SDXL example's value) scales the rejected half's gradient so the "
                  "preferred error does not rise; against DPO on the same pairs, seeds and steps (held-out masked MSE):", "",
                  "| comparison | DPO | SDPO | paired difference [95% CI] | verdict |", "|---|---|---|---|---|",
                  *[f"| {r['method']} | {r['cells'][3]} | {r['cells'][4]} | {r['cells'][5]} | {r['cells'][6]} |" for r in safeguard]]
    return lines


def lcm_report(w, rows, evaluation):
    by = {k: (m, d, c) for k, m, s, d, c in rows}
    with open(f"{w}/lcm/final_metrics.json") as f:
        steps = json.load(f)["args"]["max_train_steps"]
    t = by[SYSTEMS["teacher"]]
    lines = ["## LCM distillation (4-step students of the trained remover)", "",
             f"LoRA rank 16, {steps} steps of 16, lr 1e-4, l2 (`configs/toy_lcm.yaml`), on the scored training results (true "
             "removals, failures and remover outputs as targets). Weighted students: a filter keeps the targets whose label "
             "(GT-based, the annotator stand-in) or whose discriminator score (computed once) is >= 0.5.", "",
             f"- teacher ({t[2]:g} UNet calls): masked MSE {t[0]:.4f}, discriminator {t[1]:.3f}"]
    for key, what in (("lcm_undistilled", "the same teacher run for 4 LCM steps without distillation"),
                      ("lcm", "plain LCM student, 4 steps"), ("lcm_labels", "label-weighted LCM student, 4 steps"),
                      ("lcm_rewarded", "discriminator-weighted LCM student, 4 steps")):
        m, d, _ = by[SYSTEMS[key]]
        line = f"- {what}: {m:.4f}, {d:.3f}"
        if key in ("lcm_labels", "lcm_rewarded"):
            win, low, high = win_of(evaluation, SYSTEMS[key], SYSTEMS["teacher"])
            line += f" (discriminator win rate against the 20-step teacher {win:.3f} [{low:.3f}, {high:.3f}])"
        lines.append(line)
    return lines


def rl_report(w):
    lines = []
    for name, out in (("GRPO, GT reward", "rl_gt"), ("PPO, GT reward", "ppo_gt"), ("GRPO, discriminator reward", "rl")):
        with open(f"{w}/{out}/final_metrics.json") as f:
            final = json.load(f)
        m, a = final["metrics"], final["args"]
        with open(f"{w}/{out}/reward_history.json") as f:
            evals = json.load(f)["evals"]
        det = method_row(name, "", "", [p["reward"] for p in evals[0]["per_sample"]], [p["reward"] for p in evals[-1]["per_sample"]], False)
        lines.append(f"| {name} | {m['start_eval_sde_reward']:.4f} -> {m['eval_sde_reward']:.4f} | "
                     f"{m['start_eval_reward']:.4f} -> {m['eval_reward']:.4f} | {det['cells'][5]} | {m['eval_kl_to_start']:.4f} |")
    return ["## Online RL (LoRA on the trained remover)", "",
            f"Each run: {a['num_train_epochs']} epochs of {a['sample_batch_size'] * a['sample_batches_per_epoch']} training inputs x "
            f"{a['group_size']} samples, {a['sample_steps']} DDIM steps at eta {a['eta']:g}, lr {a['learning_rate']:g}, clip range "
            f"{a['clip_range']:g} (`configs/toy_ddpo.yaml`; PPO normalises by each input's running reward statistics from its first 4 and makes two "
            f"clipped passes over each epoch's samples). "
            f"Held out: {a['eval_samples']} inputs, fixed noises, the same before and after; reward = the run's own signal.", "",
            "| run | held-out reward, stochastic sampler it trains | deterministic DDIM (eta 0) | paired change (eta 0) [95% CI] | "
            "KL to the start |", "|---|---|---|---|---|", *lines, "",
            f"Curves: `tensorboard --logdir {w}/rl_gt/logs` (and ppo_gt, rl); grids of start vs current: `{w}/rl_gt/validation/`."]


def flow_part(w, train_meta, held_meta, args):
    """Flow-GRPO on the tiny FLUX-Fill model (random transformer, toy-fitted VAE): held-out reward
    with the ODE before and after (and with --flow_compare_naive the naive Euler-plus-noise step)."""
    flux_dir = f"{w}/models/toy_flux_fill"
    stage("flow model", f"{flux_dir}/model_index.json", lambda: run([
        "scripts/make_tiny_models.py", "--family", "flux-fill", "--out", flux_dir, "--vae_train_meta", train_meta,
        "--vae_steps", str(args.flow_vae_steps), "--seed", str(args.seed)]))
    common = ["train_RORem_ddpo.py", "--config", "configs/toy_flow_grpo.yaml", "--pretrained_model_name_or_path", flux_dir,
              "--meta_path", train_meta, "--validation_meta_path", held_meta, "--seed", str(args.seed)]
    stage("flow RL (SDE)", f"{w}/flow_rl/final_metrics.json", lambda: run([*common, "--output_dir", f"{w}/flow_rl"]))
    runs = [("SDE step (default)", "flow_rl")]
    if args.flow_compare_naive:
        stage("flow RL (naive step)", f"{w}/flow_rl_naive/final_metrics.json", lambda: run([
            *common, "--naive_sde", "--output_dir", f"{w}/flow_rl_naive"]))
        runs.append(("naive Euler + noise", "flow_rl_naive"))
    rows = []
    for name, folder in runs:
        with open(f"{w}/{folder}/final_metrics.json") as f:
            m, a = (lambda d: (d["metrics"], d["args"]))(json.load(f))
        rows.append(f"| {name} | {m['start_eval_reward']:.4f} | {m['eval_reward']:.4f} | {m['eval_reward'] - m['start_eval_reward']:+.4f} "
                    f"| {m['eval_reward_gt']:.4f} | {m['eval_reward_preserve']:.4f} | {m['eval_kl_to_start']:.3f} |")
    return ["## Flow-matching RL (Flow-GRPO on a tiny FLUX-Fill model)", "",
            f"A random-init FLUX.1-Fill transformer (diffusers' FluxFillPipeline layout, its VAE fitted to the toy images for "
            f"{args.flow_vae_steps} steps), trained from scratch by GRPO for {a['num_train_epochs']} epochs of "
            f"{a['sample_batch_size'] * a['sample_batches_per_epoch']} inputs x {a['group_size']} samples, {a['sample_steps']} "
            f"steps (the last one the ODE step, untrained), noise level {a['noise_level']:g}, lr {a['learning_rate']:g} "
            "(`configs/toy_flow_grpo.yaml`); reward gt + preserve (-MSE to GT inside the hole, to the source outside). Held out: "
            f"{a['eval_samples']} inputs, the ODE from fixed noises.", "",
            "| sampler used for training | held-out reward, start | after | change | gt part | preserve part | KL to start |",
            "|---|---|---|---|---|---|---|", *rows, "",
            f"Grids: `{w}/flow_rl/validation/`; curves: `tensorboard --logdir {w}/flow_rl/logs`."]


MORL_RUNS = (("multi-objective RL (GT)", "morl_gt", "gt,preserve"), ("multi-objective RL", "morl", "discriminator,preserve"))


@functools.lru_cache(maxsize=None)
def morl_test(policies_json):
    """(PGMORL's summary, the test change of its front's hypervolume with its bootstrap interval): read
    and bootstrapped once, for its section and for the lead table."""
    with open(policies_json) as f:
        summary = json.load(f)
    t = summary["test"]
    return summary, hypervolume_change(t["start"], list(t["front"].values()), summary["reference"])


def split_heldout(w, held_meta, first):
    """The held-out inputs split in two (absolute paths): PGMORL chooses its front on the first `first`
    and is tested on the rest, which the choice never saw."""
    root = os.path.dirname(held_meta)
    with open(held_meta) as f:
        entries = [{k: os.path.join(root, v) if k in ("source", "mask", "GT") else v for k, v in e.items()} for e in json.load(f)]
    os.makedirs(f"{w}/data/heldout_split", exist_ok=True)
    for name, part in (("selection", entries[:first]), ("test", entries[first:])):
        with open(f"{w}/data/heldout_split/{name}.json", "w") as f:
            json.dump(part, f)
    return f"{w}/data/heldout_split/selection.json", f"{w}/data/heldout_split/test.json"


def morl_part(w, model_dir, remover_dir, disc_dir, train_meta, held_meta, args):
    """PGMORL: a population of LoRA policies on the trained remover trading the GT error (the known
    answer) or the discriminator against preservation; the front is chosen on half the held-out inputs
    and tested on the other half."""
    with open(os.path.join(ROOT, "configs", "toy_morl.yaml")) as f:
        cfg = yaml.safe_load(f)
    selection, test = split_heldout(w, held_meta, cfg["eval_samples"])
    lines = ["## Multi-objective RL (PGMORL)", "",
             f"{cfg['population']} LoRA policies on one copy of the trained remover, {cfg['generations']} generations "
             f"({cfg['warmup_generations']} of warm-up with weights evenly spread on [0, 1]), {cfg['epochs_per_generation']} GRPO "
             f"epoch(s) per policy and generation (`configs/toy_morl.yaml`). The front is chosen on {cfg['eval_samples']} held-out "
             "inputs (deterministic DDIM) and tested on the other held-out inputs, which the choice never saw; the test's interval "
             "is a paired bootstrap over those inputs of the front's hypervolume minus the start's (LoRA off).", ""]
    for name, out, objectives in MORL_RUNS:
        stage(name, f"{w}/{out}/policies.json", lambda out=out, objectives=objectives: run([
            "train_RORem_morl.py", "--config", "configs/toy_morl.yaml", "--pretrained_model_name_or_path", model_dir,
            "--pretrained_unet", f"{remover_dir}/unet", "--meta_path", train_meta, "--validation_meta_path", selection,
            "--test_meta_path", test, "--objectives", objectives, "--discriminator_path", disc_dir, "--output_dir", f"{w}/{out}",
            "--seed", str(args.seed)]))
        summary, (change, low, high) = morl_test(f"{w}/{out}/policies.json")
        hv, names = summary["hypervolume_per_generation"], summary["objectives"]
        front = sorted((p for p in summary["policies"] if p["name"].startswith("gen")), key=lambda p: p["objectives"][0])
        t = summary["test"]
        lines += [f"**{' and '.join(names)}.** Start (LoRA off) on the selection inputs: "
                  + ", ".join(f"{v:.4f}" for v in summary["start"]) + "; hypervolume reference: "
                  + ", ".join(f"{v:.4f}" for v in summary["reference"]) + ". Hypervolume of the archive per generation "
                  "(selection inputs): " + ", ".join(f"{h:.5f}" for h in hv) + f". On the {t['inputs']} test inputs: start "
                  + ", ".join(f"{v:.4f}" for v in np.mean(t["start"], axis=0)) + f", hypervolume {t['hypervolume_start']:.5f} -> "
                  f"front {t['hypervolume_front']:.5f}, change {change:+.5f} [{low:+.5f}, {high:+.5f}].", "",
                  "| on the front | weights | " + " | ".join(f"{n} (selection / test)" for n in names) + " |",
                  "|---|---|" + "---|" * len(names),
                  *[f"| {p['name']} | " + ", ".join(f"{x:.2f}" for x in p["weights"]) + " | "
                    + " | ".join(f"{v:.4f} / {u:.4f}" for v, u in zip(p["objectives"], np.mean(t["front"][p["name"]], axis=0)))
                    + " |" for p in front], "", f"![front]({'../' + out}/front.png)", ""]
    return lines + [f"Per generation: `{w}/morl_gt/fronts/`, `{w}/morl/fronts/`; every policy: `policies.json` there (each a "
                    "LoRA that diffusers loads)."]


def scalar_series(log_dir, tag):
    """(steps, values) of a tensorboard scalar from every event file under log_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps, values = [], []
    for d, _, files in os.walk(log_dir):
        for name in files:
            if name.startswith("events"):
                acc = EventAccumulator(os.path.join(d, name))
                acc.Reload()
                if tag in acc.Tags().get("scalars", []):
                    for e in acc.Scalars(tag):
                        steps.append(e.step)
                        values.append(e.value)
    order = np.argsort(steps, kind="stable")
    return np.asarray(steps)[order], np.asarray(values)[order]


def plot_curves(w, path):
    """One PNG of the training curves of every stage that logged them; returns a caption line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("remover: loss", "remover", "loss"), ("discriminator: held-out AUC", "discriminator", "val_auc"),
              ("DPO, GT-judged pairs: loss", "dpo_gt", "loss"), ("DPO, discriminator-judged pairs: loss", "dpo", "loss"),
              ("LCM: loss", "lcm", "loss"), ("label-weighted LCM: loss", "lcm_labels", "loss"),
              ("discriminator-weighted LCM: loss", "lcm_rewarded", "loss"),
              ("GRPO, GT reward: held-out reward", "rl_gt", "eval_reward"), ("PPO, GT reward: held-out reward", "ppo_gt", "eval_reward"),
              ("GRPO, discriminator: mean reward", "rl", "reward_discriminator_mean"),
              ("GRPO, discriminator: held-out reward", "rl", "eval_reward"),
              ("flow GRPO: held-out reward (ODE)", "flow_rl", "eval_reward"), ("PGMORL, GT error: hypervolume", "morl_gt", "hypervolume"),
              ("PGMORL, discriminator: hypervolume", "morl", "hypervolume")]
    found = [(title, *scalar_series(f"{w}/{run}/logs", tag)) for title, run, tag in panels if os.path.isdir(f"{w}/{run}/logs")]
    found = [f for f in found if len(f[1])]
    cols = 3
    fig, axes = plt.subplots(-(-len(found) // cols), cols, figsize=(12, 3 * -(-len(found) // cols)), dpi=100, squeeze=False)
    for ax, (title, x, y) in zip(axes.flat, found):
        if len(y) > 50:  # a running mean keeps noisy per-step losses readable
            k = len(y) // 25
            y = np.convolve(y, np.ones(k) / k, mode="valid")
            x = x[k - 1:]
        ax.plot(x, y, marker="o" if len(y) < 30 else None, ms=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(found):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return [f"Training curves (from each run's tensorboard log): {', '.join(t for t, _, _ in found)}."]


def discriminator_metrics(disc_dir):
    """Held-out accuracy and AUC at the first and last validation, from the run's tensorboard log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = [os.path.join(d, f) for d, _, fs in os.walk(f"{disc_dir}/logs") for f in fs if f.startswith("events")]
    out = {}
    for path in logs:
        acc = EventAccumulator(path)
        acc.Reload()
        for tag in ("val_accuracy", "val_auc"):
            if tag in acc.Tags().get("scalars", []):
                events = acc.Scalars(tag)
                out[tag] = (events[0].value, events[-1].value, events[-1].step)
    return out


def rounds_part(w, model_dir, remover_dir, disc_dir, train_meta, held_meta, args):
    """Two rounds of RORem's data loop (scripts/data_round.py) on new toy inputs, a simulated annotator
    labelling what the discriminator is unsure of and an audit sample; after each round the remover
    fine-tuned on the round's training data, beside the same steps on the original data only (what
    the steps alone give). Held-out masked MSE of every remover, paired, same seeds."""
    from toy_world.report import markdown_table, method_row

    unet, base_unet, data, removers = f"{remover_dir}/unet", f"{remover_dir}/unet", train_meta, []
    for r in (1, 2):
        inputs, rd = f"{w}/rounds/inputs{r}/meta.json", f"{w}/rounds/r{r}"
        stage(f"round {r} inputs", inputs, lambda r=r, inputs=inputs: run([
            "scripts/make_toy_dataset.py", "--out", os.path.dirname(inputs), "--num", str(args.round_inputs), "--seed", str(10 + r),
            "--backgrounds", *args.backgrounds]))
        stage(f"round {r}", f"{rd}/report.json", lambda rd=rd, inputs=inputs, unet=unet, data=data: run([
            "scripts/data_round.py", "--round_dir", rd, "--inputs_meta", inputs, "--train_meta", data, "--pretrained_model", model_dir,
            "--RORem_unet", unet, "--RORem_discriminator", disc_dir, "--resolution", "32", "--inference_steps", str(args.eval_steps),
            "--strength", "1.0", "--batch_size", "16", "--simulate_annotator", "gt", "--seed", str(args.seed)]))
        for name, meta, start, out in ((f"remover after round {r}", f"{rd}/train/meta.json", unet, f"{w}/rounds/remover{r}"),
                                       (f"remover, round {r} steps on the original data", train_meta, base_unet, f"{w}/rounds/steps{r}")):
            stage(name, f"{out}/unet/config.json", lambda meta=meta, start=start, out=out: run([
                "train_RORem.py", "--config", "configs/toy_RORem.yaml", "--pretrained_model_name_or_path", model_dir,
                "--pretrained_unet", start, "--meta_path", meta, "--validation_meta_path", held_meta, "--output_dir", out,
                "--max_train_steps", str(args.round_steps), "--seed", str(args.seed)]))
        unet, base_unet, data = f"{w}/rounds/remover{r}/unet", f"{w}/rounds/steps{r}/unet", f"{rd}/train/meta.json"
        removers += [(f"after round {r}", unet), (f"round {r}: the same steps, original data", base_unet)]
    eval_dir = f"{w}/rounds/evaluation"
    stage("rounds evaluation", f"{eval_dir}/results.json", lambda: run([
        "evaluate_RORem.py", "--meta_path", held_meta, "--output_dir", eval_dir, "--pretrained_model", model_dir,
        "--resolution", "32", "--inference_steps", str(args.eval_steps), "--strength", "1.0", "--batch_size", "16",
        "--seed", str(args.seed), "--num_grid_inputs", "8", "--no-fetch_weights",
        *[a for name, u in [("start", f"{remover_dir}/unet")] + removers for a in ("--system", f"{name}=unet:{u}")]]))
    with open(f"{eval_dir}/results.json") as f:
        mse = {name: v["masked_mse"] for name, v in json.load(f)["per_input"].items()}
    reports = []
    for r in (1, 2):
        with open(f"{w}/rounds/r{r}/report.json") as f:
            reports.append(json.load(f))
    rows = [method_row("round 1 data + steps", "round 1's kept results", "masked MSE", mse["start"], mse["after round 1"], True),
            method_row("round 2 data + steps", "rounds 1-2's kept results", "masked MSE", mse["start"], mse["after round 2"], True),
            method_row("steps only (2 x)", "original data", "masked MSE", mse["start"], mse["round 2: the same steps, original data"], True),
            method_row("the rounds' data vs the steps alone", "kept results", "masked MSE",
                       mse["round 2: the same steps, original data"], mse["after round 2"], True)]
    rep = lambda k, fmt="{:.1%}": " | ".join(fmt.format(x[k]) if x[k] is not None else "-" for x in reports)  # noqa: E731
    return ["## Data rounds (RORem's loop, a simulated annotator)", "",
            f"Each round: {args.round_inputs} new inputs, the current remover's results scored by the discriminator, accepted at "
            "0.7, rejected below 0.3, the uncertain band and a 5% audit labelled by a simulated annotator (the known answer), "
            f"the kept results added to the training data, then {args.round_steps} fine-tuning steps on it; beside it, the same "
            "steps on the original data only. Held-out masked MSE, 64 inputs, paired:", "",
            *markdown_table(["remover", "data", "measure", "start", "end", "paired difference [95% CI]", "verdict"],
                            [r["cells"] for r in rows]), "",
            "| per round | round 1 | round 2 |", "|---|---|---|",
            f"| success rate, known answer (the remover of the round) | {rep('true_success_rate')} |",
            f"| success rate, discriminator alone | {rep('discriminator_success_rate')} |",
            f"| kept (discriminator, overruled by people) | {rep('success_rate')} |",
            f"| of the kept, good by the known answer | {rep('kept_precision')} |",
            f"| people vs discriminator on the audit | {rep('audit_agreement')} |",
            f"| training entries after the round | {rep('train_entries', '{:d}')} |", "",
            f"Round reports: `{w}/rounds/r1/report.md`, `{w}/rounds/r2/report.md`; grids: `{eval_dir}/grids/`."]


def lcm_epsilon_part(w, model_dir, remover_dir, train_meta, held_meta, args):
    """What distillation buys where few undistilled steps are poor, as on the real (epsilon-prediction)
    SDXL remover: the demo's v-prediction remover fine-tuned as epsilon-prediction (the same UNet and
    data, the scheduler's prediction type switched), then distilled into a 4-step LCM student. Held-out
    masked MSE of the student against the teacher's own sampler at 4 and 20 steps and against the
    teacher run for 4 LCM steps undistilled, paired, same seeds. (On the demo's v teacher 4 undistilled
    steps are already good: masked MSE rewards the blur few-step sampling lands near.)"""
    import shutil

    from toy_world.report import markdown_table, method_row

    d = f"{w}/lcm_epsilon"
    eps_model, teacher, student = f"{d}/model", f"{d}/teacher", f"{d}/student"

    def epsilon_model():
        shutil.copytree(model_dir, eps_model + ".tmp", dirs_exist_ok=True)
        path = f"{eps_model}.tmp/scheduler/scheduler_config.json"
        with open(path) as f:
            config = json.load(f)
        with open(path, "w") as f:
            json.dump({**config, "prediction_type": "epsilon"}, f, indent=2)
        os.replace(eps_model + ".tmp", eps_model)

    stage("epsilon model", f"{eps_model}/model_index.json", epsilon_model)
    stage("epsilon teacher", f"{teacher}/unet/config.json", lambda: run([
        "train_RORem.py", "--config", "configs/toy_RORem.yaml", "--pretrained_model_name_or_path", eps_model,
        "--pretrained_unet", f"{remover_dir}/unet", "--meta_path", train_meta, "--validation_meta_path", held_meta,
        "--output_dir", teacher, "--max_train_steps", str(args.epsilon_steps), "--validation_steps", str(args.epsilon_steps),
        "--seed", str(args.seed)]))
    stage("epsilon LCM student", f"{student}/final_metrics.json", lambda: run([
        "train_RORem_lcm.py", "--config", "configs/toy_lcm.yaml", "--pretrained_model_name_or_path", eps_model,
        "--pretrained_teacher_unet", f"{teacher}/unet", "--meta_path", train_meta, "--validation_meta_path", held_meta,
        "--output_dir", student, "--max_train_steps", str(args.epsilon_lcm_steps), "--validation_steps", str(args.epsilon_lcm_steps),
        "--win_rate_samples", "0", "--seed", str(args.seed)]))
    systems = {"teacher, 20 steps": f"unet:{teacher}/unet", "teacher, 4 steps": f"unet:{teacher}/unet,steps=4",
               "teacher, 4 LCM steps undistilled": f"unet:{teacher}/unet,steps=4,strength=1,scheduler=lcm",
               "student, 4 LCM steps": f"lcm:{student}"}
    eval_dir = f"{d}/evaluation"
    stage("epsilon LCM evaluation", f"{eval_dir}/results.json", lambda: run([
        "evaluate_RORem.py", "--meta_path", held_meta, "--output_dir", eval_dir, "--pretrained_model", eps_model,
        "--base_unet", f"{teacher}/unet", "--resolution", "32", "--inference_steps", str(args.eval_steps), "--strength", "1.0",
        "--batch_size", "16", "--seed", str(args.seed), "--num_grid_inputs", "8", "--no-fetch_weights",
        *[a for name, spec in systems.items() for a in ("--system", f"{name}={spec}")]]))
    with open(f"{eval_dir}/results.json") as f:
        mse = {name: v["masked_mse"] for name, v in json.load(f)["per_input"].items()}
    s = "student, 4 LCM steps"
    rows = [method_row("LCM distillation vs the teacher's 4 steps", "the teacher", "masked MSE", mse["teacher, 4 steps"], mse[s], True),
            method_row("LCM distillation vs the teacher's 20 steps", "the teacher", "masked MSE", mse["teacher, 20 steps"], mse[s], True),
            method_row("LCM distillation vs 4 undistilled LCM steps", "the teacher", "masked MSE",
                       mse["teacher, 4 LCM steps undistilled"], mse[s], True)]
    return ["## LCM on an epsilon-prediction teacher (what distillation buys)", "",
            f"The demo's remover fine-tuned as epsilon-prediction for {args.epsilon_steps} steps (`configs/toy_RORem.yaml`; the "
            "real SDXL remover is epsilon-prediction, where few undistilled steps are poor), then distilled for "
            f"{args.epsilon_lcm_steps} steps into a 4-step LCM LoRA (`configs/toy_lcm.yaml`, the training triplets as targets). "
            f"The teacher samples with its pipeline's scheduler (Euler) at 4 and {args.eval_steps} steps; held-out masked MSE, "
            f"{args.heldout_samples} inputs, seeds {args.seed}.., paired (start = the teacher's system, end = the student):", "",
            *markdown_table(["comparison", "teacher", "measure", "start", "end", "paired difference [95% CI]", "verdict"],
                            [r["cells"] for r in rows]), "",
            "| system | masked MSE |", "|---|---|", *[f"| {k} | {np.mean(v):.4f} |" for k, v in mse.items()], "",
            f"Grids (source, mask, GT, then each system): `{eval_dir}/grids/`."]


# (name in the evaluation, folder of the system, its start) for the DRaFT part
DRAFT_SYSTEMS = {"teacher": SYSTEMS["teacher"], "rl_gt": SYSTEMS["rl_gt"], "draft_gt": "DRaFT-1, GT reward",
                 "rl": SYSTEMS["rl"], "draft": "DRaFT-1, discriminator reward", "lcm": SYSTEMS["lcm"],
                 "draft_lcm_gt": "LCM student + AlignProp, GT reward", "draft_lcm": "LCM student + AlignProp, discriminator reward",
                 "rg_lcd_gt": "RG-LCD student, GT guidance", "rg_lcd": "RG-LCD student, discriminator guidance"}
# (method, signal, system, its start, the signal is the known answer)
DRAFT_ROWS = [("GRPO", "reward: GT error (pixels)", "rl_gt", "teacher", True),
              ("DRaFT-1", "reward: GT error (latents)", "draft_gt", "teacher", True),
              ("DRaFT-1 vs GRPO", "the GT error", "draft_gt", "rl_gt", True),
              ("AlignProp on the 4-step student", "reward: GT error (latents)", "draft_lcm_gt", "lcm", True),
              ("RG-LCD vs plain LCM", "guidance: GT error (latents)", "rg_lcd_gt", "lcm", True),
              ("AlignProp on the student vs RG-LCD", "the GT error", "draft_lcm_gt", "rg_lcd_gt", True),
              ("GRPO", "reward: the discriminator", "rl", "teacher", False),
              ("DRaFT-1", "reward: the discriminator (its gradient)", "draft", "teacher", False),
              ("AlignProp on the 4-step student", "reward: the discriminator (its gradient)", "draft_lcm", "lcm", False),
              ("RG-LCD vs plain LCM", "guidance: the discriminator", "rg_lcd", "lcm", False)]


def draft_part(w, args):
    """Direct reward fine-tuning beside the methods on the same rewards: DRaFT-1 on the remover beside
    GRPO (the known answer, then the discriminator), and on the 4-step student AlignProp (backprop
    through all 4 LCM steps) beside RG-LCD (the reward's gradient inside the distillation), each against
    its start on the held-out inputs, same seeds, paired; the GT error beside the discriminator's
    score for every run, so hacking shows."""
    from toy_world.report import hacking_reading, markdown_table, method_row

    model_dir, disc = f"{w}/models/toy_sdxl_inpaint", f"{w}/discriminator"
    held = f"{w}/data/heldout/meta.json"
    def draft(out, *extra):  # from the remover, on its training data, as GRPO
        return ["train_RORem_draft.py", "--pretrained_model_name_or_path", model_dir, "--pretrained_unet", f"{w}/remover/unet",
                "--meta_path", f"{w}/data/train/meta.json", "--validation_meta_path", held, "--seed", str(args.seed),
                "--output_dir", f"{w}/{out}", *extra]

    student = ["--config", "configs/toy_draft_lcm.yaml", "--student_lora", f"{w}/lcm"]
    runs = {"draft_gt": draft("draft_gt", "--config", "configs/toy_draft.yaml", "--reward", "gt=1"),
            "draft": draft("draft", "--config", "configs/toy_draft.yaml", "--reward", "discriminator=1", "--discriminator_path", disc),
            "draft_lcm_gt": draft("draft_lcm_gt", *student, "--reward", "gt=1"),
            "draft_lcm": draft("draft_lcm", *student, "--reward", "discriminator=1", "--discriminator_path", disc),
            "rg_lcd_gt": lcm_command(w, args, "train_RORem_lcm.py", "rg_lcd_gt", "--weighting", "none", "--reward_guidance",
                                     f"gt={args.rg_lcd_beta_gt:g}"),
            "rg_lcd": lcm_command(w, args, "train_RORem_lcm.py", "rg_lcd", "--weighting", "none", "--reward_guidance",
                                  f"discriminator={args.rg_lcd_beta:g}")}

    def train(keys):
        for k in keys:
            stage(DRAFT_SYSTEMS[k], f"{w}/{k}/final_metrics.json", lambda k=k: run(runs[k]))

    def lane_a():
        grpo_and_lcm_stages(w, args, ["grpo_gt"])
        train(["draft_gt", "draft", "draft_lcm"])

    def lane_b():
        grpo_and_lcm_stages(w, args, ["lcm", "grpo"])
        train(["draft_lcm_gt", "rg_lcd_gt", "rg_lcd"])

    parallel = not ONLY
    pool = concurrent.futures.ThreadPoolExecutor(1)
    other = pool.submit(in_lane, lane_a) if parallel else None
    with side_by_side(parallel):
        lane_b()
    other.result() if parallel else lane_a()
    pool.shutdown()

    systems = {DRAFT_SYSTEMS["teacher"]: f"unet:{w}/remover/unet",
               **{DRAFT_SYSTEMS[k]: f"lora:{w}/{k}" for k in ("rl_gt", "draft_gt", "rl", "draft")},
               **{DRAFT_SYSTEMS[k]: f"lcm:{w}/{k}" for k in ("lcm", "draft_lcm_gt", "draft_lcm", "rg_lcd_gt", "rg_lcd")}}
    eval_dir = f"{w}/draft_evaluation"
    stage("DRaFT evaluation", f"{eval_dir}/results.json", lambda: run([
        "evaluate_RORem.py", "--meta_path", held, "--output_dir", eval_dir, "--pretrained_model", model_dir,
        "--base_unet", f"{w}/remover/unet", "--resolution", "32", "--inference_steps", str(args.eval_steps), "--strength", "1.0",
        "--batch_size", "16", "--seed", str(args.seed), "--discriminator_path", disc, "--num_grid_inputs", "8", "--no-fetch_weights",
        *[a for name, spec in systems.items() for a in ("--system", f"{name}={spec}")]]))
    with open(f"{eval_dir}/results.json") as f:
        per = json.load(f)["per_input"]

    def row(m, sig, a, b, known):
        key, lower = ("masked_mse", True) if known else ("discriminator_score", False)
        return method_row(m, sig, "masked MSE" if known else "discriminator score", per[DRAFT_SYSTEMS[b]][key],
                          per[DRAFT_SYSTEMS[a]][key], lower, 4 if known else 3)

    rows = [row(*r) for r in DRAFT_ROWS]
    hacking = []
    for m, sig, a, b, _ in [r for r in DRAFT_ROWS if r[3] in ("teacher", "lcm")]:  # each method against its start
        score, error = row(m, sig, a, b, False), row(m, sig, a, b, True)
        hacking.append([m, sig, score["cells"][5], error["cells"][5], hacking_reading(score, error)])
    means = [[name, f"{np.mean(v['masked_mse']):.4f}", f"{np.mean(v['discriminator_score']):.3f}"] for name, v in per.items()]
    return ["## Direct reward fine-tuning beside GRPO and RG-LCD (same rewards, same start, same seeds)", "",
            "DRaFT-1 on a LoRA of the trained remover (`configs/toy_draft.yaml`: 10 DDIM steps, the last differentiated, 100 "
            "steps of 16, lr 1e-4, rank 8), with the GRPO runs of the main demo on the same two rewards (GRPO's GT error is "
            "measured on decoded pixels, DRaFT's on latents: the same target, no decode). On the 4-step LCM student (the main "
            "demo's plain one): AlignProp through its 4 LCM steps on its own LoRA (`configs/toy_draft_lcm.yaml`, 100 steps of "
            f"16), and RG-LCD: the plain student's distillation ({args.lcm_steps} steps) with the reward's gradient in its loss "
            f"(beta {args.rg_lcd_beta_gt:g} for the GT error, {args.rg_lcd_beta:g} for the discriminator). Held out: "
            f"{args.heldout_samples} inputs, seeds {args.seed}.., {args.eval_steps} steps (4 LCM steps for the students), paired; "
            "each row against its own start:", "",
            *markdown_table(["method", "signal", "held-out measure", "start", "end", "paired difference [95% CI]", "verdict"],
                            [r["cells"] for r in rows]), "",
            "Both measures for every run against its start (the GT error is the known answer; the discriminator is the learned "
            "reward):", "",
            *markdown_table(["method", "signal", "discriminator score change [95% CI]", "masked MSE change [95% CI]", "reading"], hacking),
            "", *markdown_table(["system", "masked MSE", "mean discriminator score"], means), "",
            f"Grids (source, mask, GT, then each system): `{eval_dir}/grids/`; training curves: `tensorboard --logdir {w}/draft_gt/logs` "
            "(and draft, draft_lcm_gt, draft_lcm, rg_lcd_gt, rg_lcd)."]


def write_part(w, name, lines, start):
    os.makedirs(f"{w}/report", exist_ok=True)
    with open(f"{w}/report/{name}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines) + f"\n\nreport: {w}/report/{name}.md   ({time.time() - start:.0f} s)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work_dir", default=".demo")
    p.add_argument("--train_samples", type=POSITIVE, default=2000)
    p.add_argument("--heldout_samples", type=POSITIVE, default=64)
    p.add_argument("--vae_steps", type=POSITIVE, default=500)
    p.add_argument("--remover_steps", type=POSITIVE, default=400, help="at batch 32")
    p.add_argument("--eval_steps", type=POSITIVE, default=20)
    p.add_argument("--scored_inputs", type=POSITIVE, default=600, help="training inputs that get scored results for the discriminator")
    p.add_argument("--pair_inputs", type=POSITIVE, default=64,
                   help="training inputs that get 4 remover candidates each, judged against GT and by the discriminator (DPO's pairs)")
    p.add_argument("--dpo_steps", type=POSITIVE, default=100)
    p.add_argument("--lcm_steps", type=POSITIVE, default=80, help="distillation steps for each 4-step student")
    p.add_argument("--flow_vae_steps", type=POSITIVE, default=300, help="fitting the tiny FLUX-Fill VAE to the toy images")
    p.add_argument("--flow_compare_naive", action="store_true", help="also train the flow model with the naive Euler + noise step")
    p.add_argument("--part", choices=["all", "flow", "morl", "rounds", "lcm_epsilon", "draft"], default="all",
                   help="flow / morl / rounds / lcm_epsilon / draft: only the flow-matching RL, the multi-objective RL, the data "
                        "rounds, the epsilon teacher's LCM part or direct reward fine-tuning beside GRPO and RG-LCD (and what it "
                        "needs; make demo runs none of the last three: make demo-rounds, make demo-lcm-epsilon, make demo-draft)")
    p.add_argument("--round_inputs", type=POSITIVE, default=400, help="rounds: new inputs per round")
    p.add_argument("--round_steps", type=POSITIVE, default=200, help="rounds: fine-tuning steps after each round (at batch 32)")
    p.add_argument("--epsilon_steps", type=POSITIVE, default=1500,
                   help="lcm_epsilon: fine-tuning steps of the remover as epsilon-prediction (at batch 32)")
    p.add_argument("--epsilon_lcm_steps", type=POSITIVE, default=200, help="lcm_epsilon: distillation steps of its 4-step student")
    p.add_argument("--rg_lcd_beta_gt", type=NONNEGATIVE_REAL, default=0.001, help="draft: RG-LCD's weight of the GT-error guidance")
    p.add_argument("--rg_lcd_beta", type=NONNEGATIVE_REAL, default=0.001, help="draft: RG-LCD's weight of the discriminator's guidance")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--backgrounds", nargs="+", choices=sorted(BACKGROUNDS), default=list(STRUCTURED),
                   help="the toy's background families (scripts/make_toy_dataset.py): stripes, two_tone and grid put "
                        "structure across the hole, which the border fill cannot continue; smooth is the first toy's, where "
                        "the border fill is close to the best possible fill")
    p.add_argument("--only", nargs="+", default=[], metavar="STAGE",
                   help="run just these stages (e.g. 'DPO' 'online RL'); the stages before them must have run")
    args = p.parse_args()
    ONLY.update(args.only)
    w = os.path.abspath(args.work_dir)
    train_meta, held_meta = f"{w}/data/train/meta.json", f"{w}/data/heldout/meta.json"
    model_dir, remover_dir = f"{w}/models/toy_sdxl_inpaint", f"{w}/remover"
    start = time.time()

    check_backgrounds(w, args.backgrounds)
    stage("data", held_meta, lambda: write_toy_data(w, args))
    if args.part == "flow":
        return write_part(w, "flow", flow_part(w, train_meta, held_meta, args), start)
    # side by side (not with --only, which runs stages in turn): the flow-matching part beside the scored
    # data and the discriminator, then preference pairs, DPO and LCM beside online RL and multi-objective
    # RL. The VAE fit and the remover get both threads: everything after them needs them.
    parallel = not ONLY and args.part == "all"
    LOG_DIR[0] = f"{w}/logs"
    pool = concurrent.futures.ThreadPoolExecutor(1)
    stage("tiny models", f"{model_dir}/model_index.json", lambda: run([
        "scripts/make_tiny_models.py", "--out", model_dir, "--prediction_type", "v_prediction",
        "--vae_train_meta", train_meta, "--vae_steps", str(args.vae_steps), "--seed", str(args.seed)]))
    stage("remover", f"{remover_dir}/unet/config.json", lambda: run([
        "train_RORem.py", "--config", "configs/toy_RORem.yaml", "--pretrained_model_name_or_path", model_dir,
        "--meta_path", train_meta, "--validation_meta_path", held_meta, "--output_dir", remover_dir,
        "--max_train_steps", str(args.remover_steps), "--seed", str(args.seed)]))

    from myutils.data import read_meta
    # the discriminator: scored results (true removals, deliberate failures, the remover's outputs
    # labelled by their error against GT) for some training inputs and all held-out ones
    if args.part == "lcm_epsilon":
        return write_part(w, "lcm_epsilon", lcm_epsilon_part(w, model_dir, remover_dir, train_meta, held_meta, args), start)
    flow_lines = pool.submit(in_lane, flow_part, w, train_meta, held_meta, args) if parallel else None
    scored_train, scored_held, disc_dir = f"{w}/scored/train/meta.json", f"{w}/scored/heldout/meta.json", f"{w}/discriminator"
    with side_by_side(parallel):
        stage("scored data", scored_held, lambda: make_scored_data(w, train_meta, held_meta, model_dir, remover_dir, args))
        stage("discriminator", f"{disc_dir}/cls_pred_branch.pt", lambda: run([
            "train_RORem_discriminator.py", "--config", "configs/toy_RORem_discriminator.yaml",
            "--pretrained_model_name_or_path", model_dir, "--meta_path", scored_train, "--val_meta_path", scored_held,
            "--output_dir", disc_dir, "--seed", str(args.seed)]))
    if parallel:
        flow_lines = flow_lines.result()  # before the next two lanes take both cores
    disc_metrics = discriminator_metrics(disc_dir)
    if args.part == "morl":
        return write_part(w, "morl", morl_part(w, model_dir, remover_dir, disc_dir, train_meta, held_meta, args), start)
    if args.part == "rounds":
        return write_part(w, "rounds", rounds_part(w, model_dir, remover_dir, disc_dir, train_meta, held_meta, args), start)
    if args.part == "draft":
        return write_part(w, "draft", draft_part(w, args), start)

    # online RL from the trained remover, each run from the same start, seeds and settings
    # (configs/toy_ddpo.yaml), only the reward differing: GRPO and PPO with the known answer (minus the
    # masked error against GT), then multi-objective RL; beside the preference and LCM stages, which
    # end with GRPO on the discriminator (so the two lanes take about as long)
    def known_answer_rl_and_morl():
        grpo_and_lcm_stages(w, args, ["grpo_gt"])
        # PPO (DDPO's): advantages from each input's running reward statistics, from its first group of 4
        # (with the default 16 an input seen once per epoch falls back to whole-batch statistics, which
        # mostly say which inputs are easy), and two clipped passes over each epoch's samples (with one,
        # and a new input each time, it would be GRPO to the last bit)
        stage("PPO (GT reward)", f"{w}/ppo_gt/final_metrics.json", lambda: run(grpo_command(
            w, args, "ppo_gt", "--reward", "gt=1", "--algorithm", "ppo", "--stat_min_count", "4", "--num_inner_epochs", "2")))
        # Diffusion-KTO on the scored results themselves (0/1 labels from the known answer, no pairs), and
        # beside it DPO on the natural pairs of the same results (each good one against each bad one of
        # its input): the two preference methods on one data set, from the same start and seeds
        stage("KTO", f"{w}/kto/final_metrics.json", lambda: run([
            "train_RORem_kto.py", "--config", "configs/toy_kto.yaml", "--pretrained_model_name_or_path", model_dir,
            "--pretrained_unet", f"{remover_dir}/unet", "--meta_path", scored_train, "--output_dir", f"{w}/kto",
            "--max_train_steps", str(args.dpo_steps), "--validation_steps", "0", "--seed", str(args.seed)]))
        stage("natural pairs", f"{w}/pairs/natural/meta.json", lambda: run([
            "scripts/build_preference_pairs.py", "--scored_meta_path", scored_train, "--output_dir", f"{w}/pairs/natural"]))
        stage("DPO (natural pairs)", f"{w}/dpo_natural/final_metrics.json", lambda: run([
            "train_RORem_dpo.py", "--config", "configs/toy_dpo.yaml", "--pretrained_model_name_or_path", model_dir,
            "--pretrained_unet", f"{remover_dir}/unet", "--preference_data", f"{w}/pairs/natural/meta.json",
            "--output_dir", f"{w}/dpo_natural", "--max_train_steps", str(args.dpo_steps), "--validation_steps", "0",
            "--seed", str(args.seed)]))
        return morl_part(w, model_dir, remover_dir, disc_dir, train_meta, held_meta, args)

    morl_lines = pool.submit(in_lane, known_answer_rl_and_morl) if parallel else None
    pairs = f"{w}/pairs"

    def preference_lcm_and_discriminator_rl():
        # Diffusion-DPO on pairs of remover candidates (best against worst of 4 per input), judged against
        # GT (the known answer) or by the discriminator; preference accuracy on held-out natural pairs
        # (validation here needs only its grids and that accuracy, hence 8 win-rate inputs: the evaluation
        # at the end measures every system on all held-out inputs)
        stage("preference pairs", f"{pairs}/heldout/meta.json", lambda: make_pairs(w, model_dir, remover_dir, disc_dir, args))
        # and the same two runs with Diffusion-SDPO's safeguard (the official SDXL example's mu)
        for name, judge, out, extra in (("DPO (GT-judged pairs)", "gt", "dpo_gt", []), ("DPO", "discriminator", "dpo", []),
                                        ("SDPO (GT-judged pairs)", "gt", "sdpo_gt", ["--safeguard_mu", "0.6"]),
                                        ("SDPO", "discriminator", "sdpo", ["--safeguard_mu", "0.6"])):
            stage(name, f"{w}/{out}/final_metrics.json", lambda judge=judge, out=out, extra=extra: run([
                "train_RORem_dpo.py", "--config", "configs/toy_dpo.yaml", "--pretrained_model_name_or_path", model_dir,
                "--pretrained_unet", f"{remover_dir}/unet", "--preference_data", f"{pairs}/{judge}/meta.json",
                "--validation_meta_path", f"{pairs}/heldout/meta.json", "--discriminator_path", disc_dir, "--output_dir", f"{w}/{out}",
                "--max_train_steps", str(args.dpo_steps), "--validation_steps", str(args.dpo_steps), "--win_rate_samples", "8",
                "--seed", str(args.seed), *extra]))

        # LCM distillation into 4-step students on the scored training results (true removals, failures
        # and remover outputs as targets): plain, weighted by each target's label (the known answer: the
        # GT-based annotator stand-in; the filter keeps the good targets), and weighted by the
        # discriminator's score of each target (filter at 0.5)
        grpo_and_lcm_stages(w, args, ["lcm"])
        for name, source, out in (("label-weighted LCM", "labels", "lcm_labels"), ("reward-weighted LCM", "data", "lcm_rewarded")):
            stage(name, f"{w}/{out}/final_metrics.json", lambda source=source, out=out: run(lcm_command(
                w, args, "train_RORem_lcm_rewarded.py", out, "--reward_source", source, "--weighting", "filter",
                "--reward_threshold", "0.5")))
        grpo_and_lcm_stages(w, args, ["grpo"])

    with side_by_side(parallel):
        preference_lcm_and_discriminator_rl()
    morl_lines = morl_lines.result() if parallel else known_answer_rl_and_morl()
    if not parallel:  # flow-matching RL (tiny FLUX-Fill)
        flow_lines = flow_part(w, train_meta, held_meta, args)
    pool.shutdown()

    # evaluation: every system on the held-out inputs with evaluate_RORem.py (same seeds for all)
    from myutils.img_util import load_image, load_mask
    from myutils.metrics import border_fill

    entries = read_meta(held_meta, "triplet")
    fill_dir = f"{w}/baselines/border_fill"
    if not os.path.isdir(fill_dir):
        os.makedirs(fill_dir)
        for i, e in enumerate(entries):
            border_fill(load_image(e.paths["source"]), load_mask(e.paths["mask"])).save(f"{fill_dir}/{i:05d}.png")
    unet = f"{remover_dir}/unet"
    systems = [(SYSTEMS["fill"], f"results:{fill_dir}"), (SYSTEMS["untrained"], "base"), (SYSTEMS["teacher"], f"unet:{unet}"),
               (SYSTEMS["dpo_gt"], f"lora:{w}/dpo_gt"), (SYSTEMS["dpo"], f"lora:{w}/dpo"),
               (SYSTEMS["sdpo_gt"], f"lora:{w}/sdpo_gt"), (SYSTEMS["sdpo"], f"lora:{w}/sdpo"),
               (SYSTEMS["kto"], f"lora:{w}/kto"), (SYSTEMS["dpo_natural"], f"lora:{w}/dpo_natural"),
               (SYSTEMS["rl_gt"], f"lora:{w}/rl_gt"), (SYSTEMS["ppo_gt"], f"lora:{w}/ppo_gt"), (SYSTEMS["rl"], f"lora:{w}/rl"),
               (SYSTEMS["lcm_undistilled"], f"unet:{unet},steps=4,strength=1,scheduler=lcm"), (SYSTEMS["lcm"], f"lcm:{w}/lcm"),
               (SYSTEMS["lcm_labels"], f"lcm:{w}/lcm_labels"), (SYSTEMS["lcm_rewarded"], f"lcm:{w}/lcm_rewarded")]
    eval_dir = f"{w}/evaluation"
    stage("evaluate", f"{eval_dir}/results.json", lambda: run([
        "evaluate_RORem.py", "--meta_path", held_meta, "--output_dir", eval_dir, "--pretrained_model", model_dir, "--base_unet", unet,
        "--resolution", "32", "--inference_steps", str(args.eval_steps), "--strength", "1.0", "--batch_size", "16",
        "--seed", str(args.seed), "--discriminator_path", disc_dir, "--num_grid_inputs", "8",
        "--no-fetch_weights",  # 32 px toy images: ImageNet networks would measure nothing; and the demo runs offline
        *[a for name, spec in systems for a in ("--system", f"{name}={spec}")]]))
    with open(f"{eval_dir}/results.json") as f:
        evaluation = json.load(f)
    rows = [(r["system"], r["masked_mse"], r["masked_mse_stderr"], r["discriminator_score"], r.get("unet_calls_per_image", 0))
            for r in evaluation["systems"]]
    os.makedirs(f"{w}/report", exist_ok=True)
    curves = plot_curves(w, f"{w}/report/curves.png")
    with open(scored_held) as f:
        held_scored = json.load(f)
    disc_lines = ["## Discriminator (reward model)", "",
                  f"Trained on {args.scored_inputs} training inputs x (true removal, a deliberate failure, the trained "
                  f"remover's output, labelled good when its masked MSE is below half the border fill's on the same input or "
                  f"below 0.02); held out: {len(held_scored)} scored results of the {args.heldout_samples} held-out inputs "
                  f"({sum(e['score'] for e in held_scored)} positive).", "",
                  "| held-out metric | untrained (step 0) | trained |", "|---|---|---|"]
    for tag, name in (("val_accuracy", "accuracy at 0.5"), ("val_auc", "ROC AUC")):
        if tag in disc_metrics:
            first, last, step = disc_metrics[tag]
            disc_lines.append(f"| {name} | {first:.3f} | {last:.3f} (step {step}) |")
    methods = method_rows(w, evaluation)
    hacking = hacking_lines(evaluation)
    table = ["| system | UNet calls / image | masked MSE (lower is better) | std. error | mean discriminator score |",
             "|---|---|---|---|---|"]
    table += [f"| {k} | {c:g} | {m:.4f} | {s:.4f} | {d:.3f} |" for k, m, s, d, c in rows]
    sections = [*disc_lines, "", *dpo_report(w, args, rows, evaluation), "", *lcm_report(w, rows, evaluation), "", *rl_report(w), "",
                *flow_lines, "", *morl_lines]
    report = "\n".join([
        "# Toy-world demo", "",
        f"{args.heldout_samples} held-out toy inputs (backgrounds: {', '.join(args.backgrounds)}); every SDXL-family system "
        f"samples {args.eval_steps} steps from noise (4 for the LCM rows) with seeds {args.seed}..{args.seed + args.heldout_samples - 1}, "
        "the result pasted into the source; masked MSE = mean squared error inside the mask in [-1, 1] pixel space against "
        "GT. Each method is compared with its own start on the same inputs and seeds; the interval is a 95% normal "
        "interval of the mean paired difference, and the verdict says on which side of zero it lies.", "",
        "## What each method did", "", *lead_table(methods), "",
        "Known-answer rows first (the signal's optimum is GT), then the research runs with the discriminator as the signal.", "",
        "![rows: source, mask, GT, then each system in the evaluation table's order](../evaluation/grids/grid_00.png)", "",
        "## Reward hacking: the discriminator's score against the GT error", "", *hacking, "",
        "## Every system", "", *table, "",
        f"All metrics (masked PSNR, LPIPS, CLIP, FID where weights are given; success rate, speed), the discriminator's "
        f"pairwise win rates and the grids: `{eval_dir}/results.md`, `win_rates.md`, `index.html`.", "",
        "![training curves](curves.png)", "", *curves, "", *sections, "",
        f"Validation grids during training: `{remover_dir}/validation/`; curves: `tensorboard --logdir {remover_dir}/logs`.", ""])
    with open(f"{w}/report/README.md", "w") as f:
        f.write(report)
    with open(f"{w}/report/results.json", "w") as f:
        json.dump({"systems": {k: {"masked_mse": m, "stderr": s, "discriminator_score": d, "unet_calls_per_image": c}
                               for k, m, s, d, c in rows},
                   "methods": [{k: v for k, v in r.items() if k != "cells"} for r in methods]}, f, indent=1)
    print("\n" + "\n".join(["## What each method did", "", *lead_table(methods), "", *hacking, "", *table, "", *sections]))
    print(f"\nreport: {w}/report/README.md   curves: {w}/report/curves.png   evaluation: {eval_dir}/index.html "
          f"({time.time() - start:.0f} s)")
    per_input = {k: v["masked_mse"] for k, v in evaluation["per_input"].items()}
    if np.mean(per_input[SYSTEMS["teacher"]]) >= np.mean(per_input[SYSTEMS["untrained"]]):
        sys.exit("the trained remover did not beat the untrained one: something is wrong")
    if "val_auc" in disc_metrics and disc_metrics["val_auc"][1] < 0.75:
        sys.exit(f"the discriminator's held-out AUC is only {disc_metrics['val_auc'][1]:.3f}: something is wrong")


if __name__ == "__main__":
    main()
