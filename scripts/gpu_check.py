#!/usr/bin/env python
"""The one GPU check: what only a GPU shows, in one command of under 8 minutes on one GPU.

    bash scripts/gpu_check.sh                 # on a GPU machine (installs missing packages from .whl/)
    bash scripts/gpu_check.sh --dry           # on a CPU: the same runs on a simulated GPU (a test runs this)

Part 1, tiny models (built here): every training command for a few steps in fp16 and in bf16 with
validation, rewards and the win rate on, each then resumed from its checkpoint (supervised, DPO with
SDPO's safeguard, KTO, discriminator, LCM weighted by live scores with RG-LCD's guidance, reward-weighted
LCM, DRaFT, ReFL, AlignProp on the 4-step student, PPO, GRPO, pairwise, Flow-GRPO on FLUX-Fill, PGMORL);
then, in the same precision, both inference scripts, the discriminator, the evaluation with every metric,
a data round, generated preference pairs and the app's removal; train_RORem.py under DeepSpeed ZeRO-2 on
one rank. A run passes when it ends and everything it wrote is finite (weights, metrics, scores).
Part 2, real size: a random-init SDXL-inpainting pipeline from configs/real/ (the 2.57B UNet, the
SDXL VAE) and a few steps of each training script's shipped configuration (configs/*.yaml) at 512 px,
LoRA DPO also at 1024: seconds per optimizer step (median after the first), peak GPU memory, and
scripts/plan_memory.py's prediction for the same configuration, side by side. What differs from the
shipped configuration is listed in the table (accumulation 1, one short epoch for RL, two MORL
policies); FLUX.1-Fill at full size (12B + T5-XXL) is not built here.

--dry runs all of it on the CPU under toy_world/sim_gpu.py's simulated GPU: tensors that report cuda:0,
checked at every op as a GPU checks them, with CUDA autocast's rules and real values (part 2 with the
tiny model's configs at 32/64 px); DeepSpeed runs on the CPU in its own process. It also counts the host
syncs of each run (the host waiting for the GPU) per optimizer step, in the steady state (steps with no
logging, validation, checkpoint or sampling): the table's "syncs/step" column.
Writes <out>/gpu_check.md and <out>/gpu_check.json; exits 1 if any run failed. Runs stop being
started once --budget_minutes have passed (they are listed as not run).
"""
import argparse
import functools
import gc
import glob
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import torch  # noqa: E402

from myutils.args import POSITIVE_REAL  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="where gpu_check.md and gpu_check.json go (required to run the check)")
    p.add_argument("--work_dir", default=None, help="models, data and run outputs (default: <out>/work, removed at the end)")
    p.add_argument("--dry", action="store_true", help="on the CPU, on a simulated GPU, the real part with tiny configs")
    p.add_argument("--budget_minutes", type=POSITIVE_REAL, default=None,
                   help="no run starts after this: on a GPU 6.5 (a run takes up to a minute: under 8 in all); a dry run "
                        "runs everything (30)")
    p.add_argument("--jobs", type=int, choices=[1, 2], default=2,
                   help="dry run: part 1's fp16 and bf16 halves in two processes at once (the simulated GPU is one "
                        "core's Python); a GPU check is always one process")
    p.add_argument("--only", choices=["fp16", "bf16", "rest"], default=None, help=argparse.SUPPRESS)  # one process of --jobs 2
    p.add_argument("--skip_real", action="store_true", help="only part 1")
    p.add_argument("--peak_tflops", type=POSITIVE_REAL, default=989.0, help="the planner's peak (H100/H200 dense bf16)")
    p.add_argument("--update_readme", metavar="GPU_CHECK_JSON", default=None,
                   help="write a dry run's host-sync table (its gpu_check.json) into README.md, and run nothing")
    args = p.parse_args(argv)
    if not args.update_readme and not args.out:
        p.error("--out is required")
    if args.budget_minutes is None:
        args.budget_minutes = 30.0 if args.dry else 6.5
    return args


# ----------------------------------------------------------------------------- running one script

class Check:
    def __init__(self, args):
        self.args, self.rows, self.start = args, [], time.time()
        self.device = "cuda"  # a dry run's is simulated

    def minutes(self):
        return (time.time() - self.start) / 60

    def run(self, part, name, module, argv, precision="", outputs=(), plan=None, note="", patches=()):
        """main(argv) of a script in this process; records status, seconds per optimizer step, peak
        memory and what it wrote being finite."""
        row = {"part": part, "name": name, "precision": precision, "note": note, "plan": plan}
        self.rows.append(row)
        if self.minutes() > self.args.budget_minutes:
            row["status"] = f"not run (past the {self.args.budget_minutes:g}-minute budget)"
            return None
        print(f"\n=== {part}: {name} {precision}".rstrip(), flush=True)
        from accelerate.state import AcceleratorState, GradientState

        from training import rl_loop
        from training import loop

        steps, real_end, real_collect = [], loop.TrainingRun.end_of_step, rl_loop.collect_samples

        def timed_collect(*a, **k):  # RL: a step's time includes sampling (the first sampling starts the clock)
            if not steps:
                steps.append(time.perf_counter())
            return real_collect(*a, **k)

        def timed_end(run, **metrics):
            done = real_end(run, **metrics)
            if done:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                steps.append(time.perf_counter())
            return done

        counter = sim = None
        if self.args.dry:  # the simulated GPU: each row counts its own host syncs, its intervals marked by what ran in them
            from toy_world.sim_gpu import SyncCounter, simulated_gpu

            counter = SyncCounter()
            sim = simulated_gpu(counter)
        restore = [(loop.TrainingRun, "end_of_step", real_end), (rl_loop, "collect_samples", real_collect)]
        loop.TrainingRun.end_of_step, rl_loop.collect_samples = timed_end, timed_collect
        patches = list(patches) + (marked_phases(counter) if counter is not None else [])  # marks wrap the timed functions
        restore += [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches if (obj, attr) not in
                    {(o, a) for o, a, _ in restore}]
        for obj, attr, value in patches:
            setattr(obj, attr, value)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = None
        try:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
            if sim is not None:
                with sim:
                    result = module.main([str(a) for a in argv])
            else:
                result = module.main([str(a) for a in argv])
            bad = [p for p in outputs if not finite_outputs(p)]
            row["status"] = "ok" if not bad else f"FAILED: non-finite or missing output in {', '.join(bad)}"
        except BaseException as e:  # a run's failure is a finding: record it and go on with the others
            if isinstance(e, KeyboardInterrupt):
                raise
            row["status"] = f"FAILED: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            traceback.print_exc()
        finally:
            for obj, attr, value in restore:
                setattr(obj, attr, value)
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        row["seconds"] = time.perf_counter() - t0
        # supervised: the median step after the first (warm-up); RL: from the first sampling to the last step, per step
        rl = module.__name__ in ("train_RORem_ddpo", "train_RORem_morl")
        gaps = [b - a for a, b in zip(steps, steps[1:])]
        row["steps"] = len(steps) - (1 if rl and steps else 0)
        row["s_per_step"] = ((steps[-1] - steps[0]) / (len(steps) - 1) if rl else statistics.median(gaps)) if gaps else None
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() and not self.args.dry else None
        if counter is not None:
            steady = counter.steady()
            row["syncs_per_step"] = max(steady.values()) if steady else None  # the most in any plain training step
            row["steady_steps"] = len(steady)
        print(f"=== {row['status']} ({row['seconds']:.1f} s)", flush=True)
        gc.collect()
        return result

    def subprocess_run(self, part, name, cmd, env=None, outputs=(), precision=""):
        """A command in its own process (DeepSpeed's launcher); passes when it exits 0 with finite outputs."""
        row = {"part": part, "name": name, "precision": precision}
        self.rows.append(row)
        if self.minutes() > self.args.budget_minutes:
            row["status"] = f"not run (past the {self.args.budget_minutes:g}-minute budget)"
            return
        print(f"\n=== {part}: {name} {precision}\n{' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, env=env, cwd=ROOT, text=True, capture_output=True, timeout=600)
        sys.stdout.write(res.stdout[-4000:] + res.stderr[-4000:])
        row["seconds"] = time.perf_counter() - t0
        bad = [p for p in outputs if not finite_outputs(p)]
        row["status"] = ("ok" if not bad else f"FAILED: non-finite or missing output in {', '.join(bad)}") if res.returncode == 0 else \
            f"FAILED: exit {res.returncode}: {(res.stderr.strip().splitlines() or [''])[-1][:300]}"
        print(f"=== {row['status']} ({row['seconds']:.1f} s)", flush=True)


def marked_phases(counter):
    """Patches that mark the simulated GPU's sync counter with what runs besides training steps: a
    step's interval that logs, validates, checkpoints, samples or evaluates is not a steady one."""
    from accelerate import Accelerator

    from training import checkpoint, rl_loop

    def marking(fn, label):
        def marked(*args, **kwargs):
            counter.mark(label)
            return fn(*args, **kwargs)
        return marked
    # every logging step and every validation logs through the accelerator
    return [(obj, attr, marking(getattr(obj, attr), label)) for obj, attr, label in (
        (Accelerator, "log", "logging or validation"), (checkpoint, "save_checkpoint", "checkpoint"),
        (rl_loop, "collect_samples", "sampling"), (rl_loop, "evaluate", "evaluation"))]


def finite_outputs(path):
    """Everything numeric a run wrote under `path` is finite: safetensors/pt weights, final_metrics.json,
    results.json, score files. False when nothing is there."""
    from safetensors.torch import load_file

    if not os.path.exists(path):
        return False
    files = [path] if os.path.isfile(path) else glob.glob(os.path.join(path, "**", "*"), recursive=True)
    seen = 0
    for f in files:
        if "checkpoint-" in f or "latent_cache" in f:
            continue
        if f.endswith(".safetensors"):
            tensors = load_file(f).values()
        elif f.endswith("cls_pred_branch.pt"):
            tensors = torch.load(f, map_location="cpu", weights_only=True).values()
        elif os.path.basename(f) in ("final_metrics.json", "results.json", "scores.json"):
            tensors = [torch.tensor(numbers(json.load(open(f))), dtype=torch.float64)]
        else:
            continue
        seen += 1
        if not all(torch.isfinite(t.float()).all() for t in tensors):
            print(f"non-finite values in {f}")
            return False
    return seen > 0


def numbers(obj):
    """Every float in a JSON document (NaN and inf included: json writes them as NaN/Infinity)."""
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in numbers(v)]
    return [float(obj)] if isinstance(obj, float) else []


# ----------------------------------------------------------------------------- part 1: tiny models

def tiny_world(work):
    """Toy data and the tiny SDXL-inpainting and FLUX-Fill pipelines, made once per work folder."""
    from toy_world.data import write_scored_toy_dataset, write_toy_dataset
    from toy_world.models import tiny_flux_fill_pipeline, tiny_pipeline

    made = os.path.join(work, "world.json")
    if os.path.isfile(made):
        return json.load(open(made))

    meta = write_toy_dataset(os.path.join(work, "toy"), num=16, resolution=32, seed=0)
    root = os.path.dirname(meta)
    entries = json.load(open(meta))
    scored = write_scored_toy_dataset(meta, os.path.join(work, "scored"), seed=0)
    pairs = os.path.join(work, "pairs.json")
    json.dump([{"source": os.path.join(root, e["source"]), "mask": os.path.join(root, e["mask"]),
                "preferred": os.path.join(root, e["GT"]), "rejected": os.path.join(root, e["source"])} for e in entries], open(pairs, "w"))
    tiny_pipeline("epsilon", image_size=32, tmp_dir=os.path.join(work, "tok")).save_pretrained(os.path.join(work, "tiny"))
    tiny_flux_fill_pipeline(image_size=32, tmp_dir=os.path.join(work, "tok_flux")).save_pretrained(os.path.join(work, "tiny_flux"))
    world = {"meta": meta, "scored": scored, "pairs": pairs, "model": os.path.join(work, "tiny"), "flux": os.path.join(work, "tiny_flux")}
    with open(made, "w") as f:
        json.dump(world, f)
    return world


def training_runs(w, out, p, disc, lcm):
    """(name, script, argv, what it must write, what resuming it adds) for each training command at
    precision p: a few optimizer steps with validation and rewards on, then resumed from its checkpoint.
    Supervised scripts run 3 steps (a checkpoint at 2, validation at 3: step 1 to 2 is plain training)."""
    common = ["--pretrained_model_name_or_path", w["model"], "--resolution", "32", "--report_to", "none", "--seed", "0",
              "--mixed_precision", p]
    steps = ["--max_train_steps", "3", "--train_batch_size", "4", "--checkpointing_steps", "2"]
    more = ["--max_train_steps", "4"]
    val = ["--validation_steps", "3", "--num_validation_images", "2", "--validation_inference_steps", "3"]
    win = ["--discriminator_path", disc, "--win_rate_samples", "2"]
    lcm_args = ["--lora_rank", "4", "--num_ddim_timesteps", "10", "--meta_path", w["meta"]]
    draft = ["--meta_path", w["meta"], "--validation_meta_path", w["meta"], "--discriminator_path", disc, "--validation_steps", "3",
             "--eval_samples", "2", "--num_validation_images", "2", "--reg_coef", "0.1"]
    rl = ["--sample_steps", "3", "--sample_batch_size", "2", "--sample_batches_per_epoch", "1", "--train_batch_size", "2",
          "--num_train_epochs", "1", "--eval_samples", "2", "--num_validation_images", "2", "--lora_rank", "4", "--meta_path", w["meta"]]
    flux = [a if a != w["model"] else w["flux"] for a in common]
    return [
        ("train_RORem_discriminator (LoRA + head)", "train_RORem_discriminator",
         common + steps + ["--meta_path", w["scored"], "--validation_steps", "3"], more),
        ("train_RORem (full, validation)", "train_RORem", common + steps + val + ["--meta_path", w["meta"]], more),
        ("train_RORem (LoRA, validation)", "train_RORem", common + steps + val + ["--meta_path", w["meta"], "--use_lora"], more),
        ("train_RORem_dpo (LoRA, SDPO's safeguard, validation with win rate)", "train_RORem_dpo",
         common + steps + val + win + ["--preference_data", w["pairs"], "--use_lora", "--safeguard_mu", "0.6"], more),
        ("train_RORem_kto (LoRA, all-rank reference point, validation with win rate)", "train_RORem_kto",
         common + steps + val + win + ["--meta_path", w["scored"], "--validation_meta_path", w["pairs"], "--use_lora"], more),
        ("train_RORem_lcm (weighted by live teacher scores, RG-LCD; validation: student vs teacher)", "train_RORem_lcm",
         common + steps + val + lcm_args + ["--discriminator_path", disc, "--weighting", "softmax", "--reward_source", "teacher",
                                            "--reward_guidance", "discriminator=0.1,gt=1"], more),
        ("train_RORem_lcm_rewarded (cached data scores, filter)", "train_RORem_lcm_rewarded",
         common + steps + lcm_args + ["--discriminator_path", disc, "--weighting", "filter", "--reward_threshold", "0"], more),
        ("train_RORem_lcm (the 4-step student the AlignProp run below trains)", "train_RORem_lcm",
         common + ["--max_train_steps", "2", "--train_batch_size", "4", "--validation_steps", "0"] + lcm_args, None),
        ("train_RORem_draft (DRaFT-2 through the discriminator, preserve, drift)", "train_RORem_draft",
         common + steps + draft + ["--reward", "discriminator=1,preserve=0.5", "--draft_k", "2", "--sample_steps", "3",
                                   "--lora_rank", "4"], more),
        ("train_RORem_draft (ReFL)", "train_RORem_draft",
         common + steps + draft + ["--reward", "discriminator=1,gt=1", "--method", "refl", "--sample_steps", "3", "--lora_rank", "4"],
         more),
        ("train_RORem_draft (the LCM student: AlignProp through 4 LCM steps)", "train_RORem_draft",
         common + steps + draft + ["--reward", "discriminator=1,gt=1", "--student_lora", lcm, "--method", "alignprop",
                                   "--sample_steps", "4"], more),
        ("train_RORem_ddpo (PPO, discriminator + preserve, CFG, KL)", "train_RORem_ddpo",
         common + rl + ["--reward", "discriminator=1,preserve=0.5", "--discriminator_path", disc, "--guidance_scale", "2",
                        "--kl_coef", "0.01"], ["--num_train_epochs", "2"]),
        ("train_RORem_ddpo (GRPO)", "train_RORem_ddpo",
         common + rl + ["--reward", "gt=1", "--algorithm", "grpo", "--group_size", "2", "--sample_batch_size", "1"],
         ["--num_train_epochs", "2"]),
        ("train_RORem_ddpo (pairwise)", "train_RORem_ddpo",
         common + rl + ["--reward", "preserve=1", "--algorithm", "pairwise", "--group_size", "2", "--sample_batch_size", "1"],
         ["--num_train_epochs", "2"]),
        ("train_RORem_ddpo (Flow-GRPO, FLUX-Fill)", "train_RORem_ddpo",
         flux + rl + ["--reward", "gt=1,preserve=1", "--algorithm", "grpo", "--group_size", "2", "--kl_coef", "0.04", "--kl_unit",
                      "flow_grpo", "--adv_std", "batch", "--max_sequence_length", "16"], ["--num_train_epochs", "2"]),
        ("train_RORem_morl (2 policies, discriminator + preserve)", "train_RORem_morl",
         common + rl + ["--objectives", "discriminator,preserve", "--discriminator_path", disc, "--population", "2", "--generations",
                        "2", "--warmup_generations", "1", "--group_size", "2", "--weight_partitions", "2"], ["--generations", "3"]),
    ]


def tiny_part(check, work, w, precisions=("fp16", "bf16")):
    """Every training command in fp16 and bf16, each then resumed from its checkpoint; the inference
    side on what they saved."""
    import importlib

    for p in precisions:
        out = lambda name: os.path.join(work, "runs", f"{name}-{p}")  # noqa: E731
        disc, lcm = out("discriminator"), out("lcm_student")
        for i, (name, script, argv, resume) in enumerate(training_runs(w, out, p, disc, lcm)):
            folder = disc if script == "train_RORem_discriminator" else lcm if resume is None else out(f"run{i}")
            module = importlib.import_module(script)
            check.run("tiny", name, module, argv + ["--output_dir", folder], p, [folder])
            if resume is not None:  # one more step from the checkpoint, to the final save (validated above)
                check.run("tiny", name + ", resumed", module, argv + resume + ["--output_dir", folder, "--resume_from_checkpoint",
                                                                              "latest", "--validation_steps", "0"], p, [folder])
        inference_runs(check, work, w, {"disc": disc, "lora": out("run2"), "lcm": lcm}, p)


def deepspeed_run(check, work, w):
    """train_RORem.py (full fine-tune) through configs/deepspeed_zero2.yaml on one rank, in its own
    process (a dry run: on the CPU in fp32; the simulated GPU lives in this process only)."""
    import yaml

    try:
        import deepspeed  # noqa: F401
    except ImportError:
        check.rows.append({"part": "tiny", "name": "train_RORem under DeepSpeed ZeRO-2 (1 rank)", "status": "FAILED: deepspeed is not installed"})
        return
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "deepspeed_zero2.yaml")))
    precision = "no" if check.args.dry else "bf16"
    cfg.update(num_processes=1, mixed_precision=precision)
    path = os.path.join(work, "ds.yaml")
    yaml.safe_dump(cfg, open(path, "w"))
    out = os.path.join(work, "runs", "deepspeed")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.path.join(work, "torch_extensions"))
    if check.args.dry:
        env["ACCELERATE_USE_CPU"] = "1"
    else:
        env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", path, "--main_process_port", "29517",
           os.path.join(ROOT, "train_RORem.py"), "--pretrained_model_name_or_path", w["model"], "--resolution", "32", "--report_to",
           "none", "--meta_path", w["meta"], "--output_dir", out, "--max_train_steps", "2", "--train_batch_size", "4",
           "--checkpointing_steps", "2", "--validation_steps", "0", "--mixed_precision", precision]
    check.subprocess_run("tiny", "train_RORem under DeepSpeed ZeRO-2 (1 rank)", cmd, env, [os.path.join(out, "unet")],
                         precision + (" (CPU)" if check.args.dry else ""))


def app_removal(image_path, mask_path, argv):
    """app_RORem.py's work without the web page: a removal in each mode and the discriminator's score."""
    from PIL import Image

    import app_RORem

    remover = app_RORem.Remover(app_RORem.parse_args(argv))
    args = remover.args
    image, mask = Image.open(image_path).convert("RGB"), Image.open(mask_path)
    scores = {}
    for mode in remover.modes():
        result, path, scores[mode] = remover.remove(image, mask, mode, 0)
        assert result.size == image.size and os.path.isfile(path) and scores[mode] is not None
    with open(os.path.join(args.output_dir, "scores.json"), "w") as f:
        json.dump(scores, f)
    return scores


def inference_runs(check, work, w, keep, p):
    """The inference side in precision p on what the training runs saved: both removal scripts (batch
    and one image), the discriminator (batch and one image), the evaluation with every metric (stand-in
    networks: no weights are at hand), a data round with the simulated annotator, preference pairs
    judged by the discriminator, and the app's removal and score."""
    import types

    import evaluate_RORem
    import inference_RORem
    import inference_RORem_4S
    import inference_RORem_discriminator

    import build_preference_pairs
    import data_round
    dtype = ["--dtype", p]
    out = lambda name: os.path.join(work, "runs", f"{name}-{p}")  # noqa: E731
    entry = json.load(open(w["meta"]))[0]
    source, mask = (os.path.join(os.path.dirname(w["meta"]), entry[k]) for k in ("source", "mask"))
    model = ["--pretrained_model", w["model"], "--resolution", "32"]
    results = out("inference")
    runs = [
        ("inference_RORem (meta.json, LoRA)", inference_RORem,
         model + ["--RORem_LoRA", keep["lora"], "--meta_path", w["meta"], "--save_path", results, "--inference_steps", "4",
                  "--batch_size", "4"], []),
        ("inference_RORem (one image)", inference_RORem,
         model + ["--image_path", source, "--mask_path", mask, "--save_path", out("one") + ".png", "--inference_steps", "3",
                  "--overwrite"], []),
        ("inference_RORem_4S (the LCM LoRA, 4 steps)", inference_RORem_4S,
         model + ["--RORem_LoRA", keep["lcm"], "--meta_path", w["meta"], "--save_path", out("inference_4s"), "--batch_size", "4"], []),
        ("inference_RORem_discriminator (batch)", inference_RORem_discriminator,
         model + ["--RORem_discriminator", keep["disc"], "--meta_path", os.path.join(results, "meta.json"), "--output_path",
                  os.path.join(results, "scores.json")], [os.path.join(results, "scores.json")]),
        ("inference_RORem_discriminator (one image)", inference_RORem_discriminator,
         model + ["--RORem_discriminator", keep["disc"], "--image_path", source, "--mask_path", mask, "--edited_path", source], []),
        ("evaluate_RORem (base, LoRA, LCM; discriminator, FID, LPIPS, CLIP with stand-in networks)", evaluate_RORem,
         ["--meta_path", w["meta"], "--output_dir", out("evaluation"), "--pretrained_model", w["model"], "--system", "base=base",
          "--system", f"lora=lora:{keep['lora']}", "--system", f"lcm=lcm:{keep['lcm']}", "--discriminator_path", keep["disc"],
          "--resolution", "32", "--inference_steps", "3", "--limit", "4", "--batch_size", "4", "--no-fetch_weights",
          "--stand_in_weights", "--fid_dims", "64"], [os.path.join(out("evaluation"), "results.json")]),
        ("scripts/data_round.py (remove, score, simulated annotator, next data)", data_round,
         model + ["--RORem_discriminator", keep["disc"], "--inputs_meta", w["meta"], "--round_dir", out("round"), "--inference_steps",
                  "3", "--batch_size", "4", "--simulate_annotator", "gt"], []),
        ("scripts/build_preference_pairs.py (candidates judged by the discriminator)", build_preference_pairs,
         model + ["--RORem_discriminator", keep["disc"], "--meta_path", w["meta"], "--output_dir", out("pairs"), "--num_candidates",
                  "2", "--inference_steps", "3"], []),
        ("app_RORem (a removal in each mode and its score)",
         types.SimpleNamespace(main=functools.partial(app_removal, source, mask), __name__="app_RORem"),
         model + ["--lcm_lora", keep["lcm"], "--RORem_discriminator", keep["disc"], "--inference_steps", "3", "--output_dir",
                  out("app")], [os.path.join(out("app"), "scores.json")]),
    ]
    for name, module, argv, outputs in runs:
        check.run("inference", name, module, argv + dtype, p, outputs)


# ----------------------------------------------------------------------------- part 2: real size

REAL_RUNS = [  # (script, config, resolution key, extra arguments, what differs from the config)
    ("train_RORem.py", "train_RORem.yaml", "lo", ["--max_train_steps", "4"], "full fine-tune; final save skipped"),
    ("train_RORem_dpo.py", "dpo_config.yaml", "lo", ["--max_train_steps", "4", "--gradient_accumulation_steps", "1"],
     "accumulation 1 (config: 16)"),
    ("train_RORem_dpo.py", "dpo_config.yaml", "hi", ["--max_train_steps", "3", "--gradient_accumulation_steps", "1"],
     "accumulation 1 (config: 16)"),
    ("train_RORem_kto.py", "kto_config.yaml", "lo", ["--max_train_steps", "4", "--gradient_accumulation_steps", "1"],
     "accumulation 1 (config: 16)"),
    ("train_RORem_lcm.py", "lcm_config.yaml", "lo", ["--max_train_steps", "4"], ""),
    ("train_RORem_discriminator.py", "train_RORem_discriminator.yaml", "lo", ["--max_train_steps", "4"], ""),
    ("train_RORem_lcm_rewarded.py", "lcm_rewarded_config.yaml", "lo", ["--max_train_steps", "4"], "data scores of 48 inputs first"),
    ("train_RORem_draft.py", "draft_config.yaml", "lo", ["--max_train_steps", "4"], "DRaFT-1, 20 DDIM steps"),
    ("train_RORem_ddpo.py", "ddpo_config.yaml", "lo", ["--sample_batches_per_epoch", "1", "--num_train_epochs", "1", "--eval_samples", "2",
                                                      "--checkpointing_epochs", "0"], "one epoch of 8 samples (config: 32/epoch)"),
    ("train_RORem_morl.py", "morl_config.yaml", "lo", ["--population", "2", "--generations", "1", "--warmup_generations", "1",
                                                      "--epochs_per_generation", "1", "--sample_batches_per_epoch", "1", "--eval_samples", "2"],
     "2 policies, 1 generation of 1 epoch (config: 6, 12, 2)"),
]


def real_world(check, work, w):
    """The real-size pipeline folder (fp16 weights, as RORem releases them), a random discriminator
    folder for it, and 48 toy inputs (64 px, resized to the run's resolution by the loader)."""
    from model.unet_sdxl_discriminator import UNetSDXLDiscriminator
    from myutils.discriminator_files import add_discriminator_lora, save_discriminator
    from toy_world.data import write_scored_toy_dataset, write_toy_dataset
    from toy_world.models import pipeline_from_configs

    if check.args.dry:  # the tiny model's own configs stand in for configs/real/
        unet_cfg, vae_cfg = os.path.join(w["model"], "unet", "config.json"), os.path.join(w["model"], "vae", "config.json")
    else:
        unet_cfg, vae_cfg = (os.path.join(ROOT, "configs", "real", f) for f in ("sdxl_inpaint_unet.json", "sdxl_vae.json"))
    t0 = time.perf_counter()
    pipe = pipeline_from_configs(unet_cfg, vae_cfg, os.path.join(work, "tok_real"), device="cpu" if check.args.dry else check.device)
    folder = os.path.join(work, "real")
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    disc = UNetSDXLDiscriminator.from_unet(pipe.unet)
    add_discriminator_lora(disc)
    save_discriminator(disc, os.path.join(work, "real_disc"), lora=True)
    del pipe, disc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"real-size pipeline written in {time.perf_counter() - t0:.0f} s", flush=True)
    meta = write_toy_dataset(os.path.join(work, "real_toy"), num=48, resolution=64, seed=1)
    root = os.path.dirname(meta)
    pairs = os.path.join(work, "real_pairs.json")
    json.dump([{"source": os.path.join(root, e["source"]), "mask": os.path.join(root, e["mask"]),
                "preferred": os.path.join(root, e["GT"]), "rejected": os.path.join(root, e["source"])} for e in json.load(open(meta))],
              open(pairs, "w"))
    return {"model": folder, "disc": os.path.join(work, "real_disc"), "meta": meta, "pairs": pairs,
            "scored": write_scored_toy_dataset(meta, os.path.join(work, "real_scored"), seed=1), "unet_cfg": unet_cfg, "vae_cfg": vae_cfg}


def planner_rows(check, r, res):
    """plan_memory.py's rows for one GPU of this machine, keyed (script, resolution)."""
    import plan_memory

    total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30 if torch.cuda.is_available() else 80.0
    pargs = plan_memory.plan_args(scripts=[n for n in plan_memory.SCRIPTS if not plan_memory.SCRIPTS[n].get("flux")], resolutions=res,
                                  num_gpus=1, gpu_memory_gb=total, peak_tflops=check.args.peak_tflops,
                                  peak_tflops_fp32=check.args.peak_tflops / 2, unet_config=r["unet_cfg"],
                                  vae_config=r["vae_cfg"])  # TF32 runs at half the bf16 rate
    rows, _ = plan_memory.plan(pargs)
    out = {}
    for row in rows:
        if "ZeRO" not in row["mode"]:
            accumulation = plan_memory.script_args(row["key"]).gradient_accumulation_steps
            out[(row["script"], row["res"])] = {"gib": row["total"], "s_per_step": 3600 / row["steps_per_hour"] / accumulation}
    return out


def real_part(check, work, w):
    import importlib

    import yaml

    from training import checkpoint


    if check.minutes() > check.args.budget_minutes:
        check.rows.append({"part": "real", "name": "real-size pipeline", "status": "not run (past the budget)"})
        return
    r = real_world(check, work, w)
    res = {"lo": 32, "hi": 64} if check.args.dry else {"lo": 512, "hi": 1024}
    # dry: the tiny UNet's planner rows at sizes its discriminator head can take (numbers that mean nothing, the path runs)
    plan_res = {"lo": 128, "hi": 256} if check.args.dry else res
    try:
        plans = planner_rows(check, r, sorted(plan_res.values()))
    except Exception as e:  # the table still has the measurements
        traceback.print_exc()
        check.rows.append({"part": "real", "name": "scripts/plan_memory.py", "status": f"FAILED: {type(e).__name__}: {e}"})
        plans = {}
    for script, config, key, extra, note in REAL_RUNS:
        module = importlib.import_module(script[:-3])
        out = os.path.join(work, "runs", f"real-{script[:-3]}-{res[key]}")
        argv = ["--config", os.path.join(ROOT, "configs", config), "--pretrained_model_name_or_path", r["model"], "--variant", "fp16",
                "--resolution", str(res[key]), "--output_dir", out, "--report_to", "none", "--validation_steps", "0",
                "--checkpointing_steps", "1000000", *extra]
        if script in ("train_RORem.py", "train_RORem_lcm.py", "train_RORem_lcm_rewarded.py"):
            argv += ["--meta_path", r["meta"]]
        elif script == "train_RORem_dpo.py":
            argv += ["--preference_data", r["pairs"]]
        elif script in ("train_RORem_discriminator.py", "train_RORem_kto.py"):
            argv += ["--meta_path", r["scored"]]
        else:
            argv += ["--meta_path", r["meta"], "--discriminator_path", r["disc"]]
        if script == "train_RORem_lcm_rewarded.py":
            argv += ["--discriminator_path", r["disc"]]
        precision = yaml.safe_load(open(os.path.join(ROOT, "configs", config))).get("mixed_precision", "")
        if check.args.dry:  # the simulated GPU, in the config's precision: small batches, few sampling steps
            argv += ["--train_batch_size", "4"]
            if script in ("train_RORem_ddpo.py", "train_RORem_morl.py", "train_RORem_draft.py"):
                argv += ["--sample_steps", "4"]
        patches = [(checkpoint, "save_final", lambda accelerator, *a, **k: accelerator.end_training())] if script == "train_RORem.py" else []
        check.run("real", f"{script} ({config})", module, argv, precision, plan=plans.get((script, plan_res[key])),
                  note=f"{res[key]} px" + (f"; {note}" if note else ""), patches=patches)
        shutil.rmtree(out, ignore_errors=True)


# ----------------------------------------------------------------------------- report

def environment(args):
    import accelerate
    import peft
    import transformers

    try:
        import diffusers
        dv = diffusers.__version__
    except ImportError:
        dv = "missing"
    gpu = "simulated on the CPU (toy_world/sim_gpu.py)" if args.dry else torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"GPU: {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {dv}, transformers {transformers.__version__}, "
            f"accelerate {accelerate.__version__}, peft {peft.__version__}; Python {platform.python_version()}")


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def sync_table(rows):
    """Host syncs per optimizer step in the steady state (training steps with no logging, validation,
    checkpoint or sampling in them), per training command and precision: a dry run's measurement."""
    table = {}
    for r in rows:
        if r["part"] == "tiny" and r.get("syncs_per_step") is not None and not r["name"].endswith(", resumed"):
            table.setdefault(r["name"], {})[r["precision"]] = r["syncs_per_step"]
    lines = ["| training command (tiny models, simulated GPU) | fp16 | bf16 |", "|---|---|---|"]
    lines += [f"| {name} | {v.get('fp16', '-')} | {v.get('bf16', '-')} |" for name, v in table.items()]
    return "\n".join(lines) + "\n"


README_SYNCS = ("<!-- host syncs: written by python scripts/gpu_check.py --update_readme gpu_check_out/gpu_check.json -->\n",
                "<!-- end of host syncs -->\n")


def readme_with_sync_table(readme, rows):
    """The README's text with the host-sync table between its two markers replaced by `rows`'."""
    start, end = readme.index(README_SYNCS[0]) + len(README_SYNCS[0]), readme.index(README_SYNCS[1])
    return readme[:start] + sync_table(rows) + readme[end:]


def report(check, out):
    lines = ["# GPU check", "", environment(check.args), "",
             f"{sum(r.get('status') == 'ok' for r in check.rows)} of {len(check.rows)} runs ok, {check.minutes():.1f} min in all.", "",
             "| part | run | precision | status | s | s/step | peak GiB | planner GiB | planner s/step | syncs/step | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in check.rows:
        plan = r.get("plan") or {}
        lines.append(f"| {r['part']} | {r['name']} | {r.get('precision', '')} | {r.get('status', '')} | {fmt(r.get('seconds'), 1)} | "
                     f"{fmt(r.get('s_per_step'))} | {fmt(r.get('peak_gib'), 1)} | {fmt(plan.get('gib'), 1)} | "
                     f"{fmt(plan.get('s_per_step'))} | {r.get('syncs_per_step', '-') if r.get('syncs_per_step') is not None else '-'} | "
                     f"{r.get('note', '')} |")
    text = "\n".join(lines) + "\n"
    if check.args.dry:
        text += "\n## Host syncs per optimizer step\n\n" + sync_table(check.rows)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump({"environment": environment(check.args), "rows": check.rows}, f, indent=1,
                  default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else str(x))
    print("\n" + text)


def parallel_halves(args, work):
    """--jobs 2 (dry): part 1's fp16 and bf16 halves in two processes on the same tiny world; their rows,
    in order, before this process's own (DeepSpeed and part 2)."""
    procs = []
    for p in ("fp16", "bf16"):
        cmd = [sys.executable, os.path.abspath(__file__), "--dry", "--only", p, "--out", os.path.join(args.out, p), "--work_dir", work,
               "--budget_minutes", str(args.budget_minutes)]
        log = open(os.path.join(args.out, f"gpu_check-{p}.log"), "w")
        procs.append((p, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1")), log))
    rows = []
    for p, proc, log in procs:
        proc.wait()
        log.close()
        path = os.path.join(args.out, p, "gpu_check.json")
        if os.path.isfile(path):
            rows += json.load(open(path))["rows"]
        else:
            rows.append({"part": "tiny", "name": f"part 1 in {p}", "precision": p, "status": f"FAILED: exit {proc.returncode} "
                         f"(see gpu_check-{p}.log)"})
        shutil.rmtree(os.path.join(args.out, p), ignore_errors=True)
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.update_readme:
        path = os.path.join(ROOT, "README.md")
        rows = json.load(open(args.update_readme))["rows"]
        text = readme_with_sync_table(open(path).read(), rows)
        with open(path, "w") as f:
            f.write(text)
        print(sync_table(rows))
        return 0
    if not args.dry and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry for the CPU run", file=sys.stderr)
        return 2
    work = args.work_dir or os.path.join(args.out, "work")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)  # a run stopped half-way left it: results there would count as done
    os.makedirs(work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    check = Check(args)
    print(environment(args), flush=True)
    w = tiny_world(work)
    if args.only in ("fp16", "bf16"):
        torch.set_num_threads(1)
        tiny_part(check, work, w, (args.only,))
    else:
        if args.dry and args.jobs == 2 and args.only is None:
            check.rows += parallel_halves(args, work)
        else:
            tiny_part(check, work, w)
        deepspeed_run(check, work, w)
        if not args.skip_real:
            real_part(check, work, w)
    report(check, args.out)
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.get("status") == "ok" for r in check.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
