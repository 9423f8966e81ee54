"""Checkpoints and resume (accelerate state + our model files, rotation, one-line errors for a
broken checkpoint) and the final save. Not here: when to checkpoint (loop.py).
"""
import json
import logging
import os
import pickle
import shutil

import torch

from myutils.errors import UserError

logger = logging.getLogger("rorem")


CHECKPOINT_PREFIX = "checkpoint-"


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


def resume(accelerator, args):
    """Load `--resume_from_checkpoint latest|PATH`; return the optimizer step to continue from."""
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
