"""Checkpoints and resume (accelerate state + our model files, rotation, one-line errors for a
broken checkpoint) and the final save. Not here: when to checkpoint (loop.py).
"""
import json
import logging
import os
import pickle
import shutil

import torch

from myutils.errors import UserError, read_json_object

logger = logging.getLogger("rorem")


CHECKPOINT_PREFIX = "checkpoint-"
# what a run's folder and each checkpoint hold: which script made it, the kind of model (myutils.models
# MODEL_KINDS) and what it started from, so another script's run or another model's never replaces it
MODEL_ARGS = ("pretrained_model_name_or_path", "pretrained_unet", "use_lora", "student_lora")


def run_record(args, script, kind):
    def norm(v):  # one folder named two ways is one folder
        return os.path.realpath(v) if isinstance(v, str) and os.path.exists(v) else v

    return {"kind": kind, "script": script, "model": {k: norm(getattr(args, k)) for k in MODEL_ARGS if hasattr(args, k)}}


def claim_output_dir(accelerator, args, script, kind):
    """Refuse to start in a folder (or from a checkpoint) that holds another script's run, or a run of
    another model: resuming it would replace its final model and metrics, or load weights of another
    kind. Then record this run in the folder (before anything else is written there)."""
    mine = run_record(args, script, kind)
    places = [args.output_dir] + ([args.resume_from_checkpoint] if args.resume_from_checkpoint not in (None, "latest") else [])
    for folder in places:
        theirs = read_record(folder)
        if theirs is None:
            continue
        where = "--output_dir" if folder == args.output_dir else "--resume_from_checkpoint"
        if theirs.get("script") != script:
            raise UserError(f"{where} {folder}: holds a {theirs.get('script')} run ({theirs.get('kind')}); {script} would replace "
                            "or misread it: give another --output_dir")
        changed = [k for k, v in mine["model"].items() if k in theirs.get("model", {}) and theirs["model"][k] != v]
        if changed and (folder != args.output_dir or list_checkpoints(folder) or has_final_model(folder)):
            k = changed[0]
            raise UserError(f"{where} {folder}: holds a run with --{k} {theirs['model'][k]}, this one has --{k} {mine['model'][k]}; "
                            "give another --output_dir")
    if accelerator.is_main_process:
        write_record(args.output_dir, mine)
    return mine


def has_final_model(folder):
    from myutils.models import LORA_WEIGHTS

    return any(os.path.exists(os.path.join(folder, n)) for n in (LORA_WEIGHTS, "unet", "final_metrics.json"))


def read_record(folder):
    from myutils.models import MODEL_RECORD

    path = os.path.join(folder, MODEL_RECORD)
    if not os.path.isfile(path):
        return None
    return read_json_object(path, "unreadable", "; it says which run made this folder: restore or delete it")


def write_record(folder, record):
    from myutils.annotation import write_json_atomic
    from myutils.models import MODEL_RECORD

    os.makedirs(folder, exist_ok=True)
    write_json_atomic(os.path.join(folder, MODEL_RECORD), record)


def register_hooks(accelerator, save_model, load_model, ema=None):
    """Checkpoints hold the trained model in the same format as the final output (save_model(model,
    folder) / load_model(model, folder)), so any checkpoint is usable on its own; accelerate adds
    optimizer, lr scheduler and RNG states (under DeepSpeed it saves and restores the engine itself)."""
    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                save_model(accelerator.unwrap_model(model), output_dir)
        weights.clear()

    def load_hook(models, input_dir):
        while models:
            load_model(accelerator.unwrap_model(models.pop()), input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)


def list_checkpoints(output_dir):
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if d.startswith(CHECKPOINT_PREFIX) and d[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(names, key=lambda d: int(d[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(accelerator, args, global_step, extra=None):
    """Write checkpoint-<step> atomically: everything goes into a temporary folder that is renamed
    only when complete, so a kill during saving never leaves a checkpoint `latest` would pick. Old
    checkpoints are pruned after the new one exists. Every process calls this (a main-only
    save_state hangs multi-GPU runs); extra(folder), if given, adds each process's own files."""
    final = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
    tmp = final + ".incomplete"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if extra is not None:
        os.makedirs(tmp, exist_ok=True)
        extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "training_state.json"), "w") as f:
            json.dump({"global_step": global_step, "num_processes": accelerator.num_processes}, f)
        record = read_record(args.output_dir)
        if record is not None:  # a checkpoint's model is usable on its own: it says what it is too
            write_record(tmp, record)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if args.checkpoints_total_limit:
            for name in list_checkpoints(args.output_dir)[:-args.checkpoints_total_limit]:
                shutil.rmtree(os.path.join(args.output_dir, name))
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def resume_path(args):
    """The checkpoint folder `--resume_from_checkpoint latest|PATH` names, or None."""
    if args.resume_from_checkpoint != "latest":
        return args.resume_from_checkpoint or None
    found = list_checkpoints(args.output_dir)
    return os.path.join(args.output_dir, found[-1]) if found else None


def resume(accelerator, args, script, kind):
    """Claim --output_dir for this run (claim_output_dir), then load `--resume_from_checkpoint
    latest|PATH`; return the optimizer step to continue from."""
    claim_output_dir(accelerator, args, script, kind)
    path = resume_path(args)
    if path is None:
        if args.resume_from_checkpoint:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting from step 0", args.output_dir)
        return 0
    state_file = os.path.join(path, "training_state.json")
    if not os.path.isfile(state_file):
        raise UserError(f"--resume_from_checkpoint {path}: not a checkpoint folder (no training_state.json)")
    args.resume_from_checkpoint = path  # "latest" pinned: what reads the checkpoint later (RL's epoch samples) sees this one
    try:
        with open(state_file) as f:
            state = json.load(f)
        step = int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{state_file}: unreadable (a checkpoint cut short?); resume from another one") from None
    problem = checkpoint_problem(path, state.get("num_processes", accelerator.num_processes))
    try:
        if problem is None:
            accelerator.load_state(path)
    except (EOFError, RuntimeError, OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
        problem = f"cannot be loaded ({e.__class__.__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'})"
    if problem is not None:
        others = [c for c in list_checkpoints(os.path.dirname(os.path.abspath(path))) if c != os.path.basename(os.path.normpath(path))]
        raise UserError(f"--resume_from_checkpoint {path}: {problem}; resume from "
                        + (f"an earlier one ({', '.join(others[-3:])})" if others else "scratch in another --output_dir"))
    accelerator.step = step * args.gradient_accumulation_steps  # keeps accumulation boundaries where they were
    logger.info("resumed from %s at step %d", path, step)
    return step


def checkpoint_problem(path, num_processes):
    """What makes a checkpoint folder unusable, found before loading it (every rank reads the same
    folder, so all decide alike): an empty file (a write cut short), or a process's RNG state missing
    or unreadable, which accelerate would skip with an INFO line and the resume would no longer be exact."""
    for folder, _, files in os.walk(path):
        for name in files:
            if os.path.getsize(os.path.join(folder, name)) == 0:
                return f"{os.path.join(folder, name)} is empty (a write cut short)"
    for rank in range(num_processes):
        rng = os.path.join(path, f"random_states_{rank}.pkl")
        try:
            torch.load(rng, weights_only=False)
        except Exception as e:  # missing, truncated, not a pickle
            return f"{rng} cannot be read ({e.__class__.__name__}), so the resumed run would not be the same"
    return None


def save_final(accelerator, args, model, save_model, ema=None, metrics=None):
    """Save the final model (EMA weights if kept) and <output_dir>/final_metrics.json: the final
    validation metrics (null without validation) and the arguments, so a sweep can tabulate its runs."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model)
        if ema is not None:
            ema.copy_to(model.parameters())
        save_model(model, args.output_dir)
        # written also without validation (metrics null): a sweep sees the run finished, and with which arguments
        with open(os.path.join(args.output_dir, "final_metrics.json"), "w") as f:
            json.dump({"metrics": metrics, "args": {k: v for k, v in vars(args).items()
                                                    if isinstance(v, (int, float, str, bool, list, type(None)))}}, f, indent=1)
        logger.info("saved the final model to %s", args.output_dir)
    accelerator.end_training()
