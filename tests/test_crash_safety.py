"""Nothing lost: SIGTERM saves and exits cleanly, a kill while saving leaves no checkpoint that
`latest` would pick, non-finite losses skip their step and stop a run that keeps producing them."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_RORem
from myutils.errors import UserError
from myutils.models import save_unet
from training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(model, meta, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--meta_path", meta, "--output_dir", out, "--resolution", "32",
            "--train_batch_size", "2", "--report_to", "none", "--validation_steps", "0", "--learning_rate", "1e-3",
            "--checkpointing_steps", "100", *extra]


def _state(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder).state_dict()


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_sigterm_saves_exits_cleanly_and_resumes_exactly(tmp_path, tiny_model_dir, toy_meta, run_script):
    out = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_RORem.py"),
                             *_args(tiny_model_dir, toy_meta, out, "--max_train_steps", "100000", "--checkpointing_steps", "3")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    # waits for the run's progress, not for a time: however loaded the machine, until checkpoint-3 exists or
    # the run ends; the hour is a guard against a hung run only
    deadline = time.time() + 3600
    while not os.path.isdir(os.path.join(out, "checkpoint-3")):
        assert proc.poll() is None, proc.stderr.read()
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint-3 after an hour: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=3600)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "continue with --resume_from_checkpoint latest" in err
    steps = sorted(int(d.split("-")[1]) for d in os.listdir(out) if d.startswith("checkpoint-") and d[11:].isdigit())
    stopped = steps[-1]
    assert stopped >= 3 and not any(".incomplete" in d for d in os.listdir(out))

    # resume the killed run for 2 more steps; it must equal a straight run of the same length
    run_script(train_RORem, _args(tiny_model_dir, toy_meta, out, "--max_train_steps", str(stopped + 2),
                                  "--resume_from_checkpoint", "latest"))
    straight = str(tmp_path / "straight")
    run_script(train_RORem, _args(tiny_model_dir, toy_meta, straight, "--max_train_steps", str(stopped + 2)))
    assert _max_diff(_state(os.path.join(out, "unet")), _state(os.path.join(straight, "unet"))) <= 1e-6


def test_kill_while_saving_leaves_latest_on_the_last_complete_checkpoint(tmp_path, tiny_model_dir, toy_meta, run_script, monkeypatch):
    out = str(tmp_path / "run")
    real_save_unet = save_unet
    calls = {"n": 0}

    def dies_on_second_checkpoint(unet, output_dir, lora):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process dies half way through writing checkpoint-4
        real_save_unet(unet, output_dir, lora)

    monkeypatch.setattr(train_RORem, "save_unet", dies_on_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_script(train_RORem, _args(tiny_model_dir, toy_meta, out, "--max_train_steps", "6", "--checkpointing_steps", "2"))
    monkeypatch.setattr(train_RORem, "save_unet", real_save_unet)
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4.incomplete"]
    assert checkpoint.list_checkpoints(out) == ["checkpoint-2"]
    run_script(train_RORem, _args(tiny_model_dir, toy_meta, out, "--max_train_steps", "6", "--checkpointing_steps", "2",
                                  "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest"))
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-6"]  # newest kept, stale tmp gone


def test_nonfinite_loss_skips_the_update_then_stops(tmp_path, tiny_model_dir, toy_meta, run_script, monkeypatch):
    real_loss = train_RORem.diffusion_loss
    calls = {"n": 0}

    def nan_on_second_step(*a, **k):
        calls["n"] += 1
        loss = real_loss(*a, **k)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(train_RORem, "diffusion_loss", nan_on_second_step)
    skip = str(tmp_path / "skip")
    run_script(train_RORem, _args(tiny_model_dir, toy_meta, skip, "--max_train_steps", "3"))
    monkeypatch.setattr(train_RORem, "diffusion_loss", real_loss)
    after = _state(os.path.join(skip, "unet"))  # steps 1 and 3 trained, step 2 skipped: finite and changed
    assert all(torch.isfinite(v).all() for v in after.values())
    assert _max_diff(after, _state(os.path.join(tiny_model_dir, "unet"))) > 1e-4

    monkeypatch.setattr(train_RORem, "diffusion_loss", lambda *a, **k: real_loss(*a, **k) * float("inf"))
    with pytest.raises(UserError, match=r"not finite for 3 steps in a row \(up to step 3\).*Last checkpoint: none"):
        run_script(train_RORem, _args(tiny_model_dir, toy_meta, str(tmp_path / "bad"), "--max_train_steps", "50",
                                      "--max_nonfinite_steps", "3"))


def test_skipped_step_changes_nothing(tmp_path, tiny_model_dir, toy_meta, run_script, monkeypatch):
    """One step whose loss is NaN leaves the weights exactly as they were (its checkpoint is the start);
    the next, finite, step trains."""
    real_loss, calls = train_RORem.diffusion_loss, []

    def first_nan(*a, **k):
        calls.append(1)
        return real_loss(*a, **k) * (float("nan") if len(calls) == 1 else 1.0)

    monkeypatch.setattr(train_RORem, "diffusion_loss", first_nan)
    out = str(tmp_path / "one")
    run_script(train_RORem, _args(tiny_model_dir, toy_meta, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    start = _state(os.path.join(tiny_model_dir, "unet"))
    assert _max_diff(_state(os.path.join(out, "checkpoint-1", "unet")), start) == 0.0
    assert _max_diff(_state(os.path.join(out, "unet")), start) > 0.0


def test_process_group_timeout_comes_from_the_argument(tmp_path):
    """Ranks wait --ddp_timeout minutes (default 120) in a collective, not NCCL's 10: what the main
    process does alone (validation, evaluation, saving a full UNet) must fit in it."""
    from datetime import timedelta

    import train_RORem
    from tests.conftest import reset_accelerate
    from training import prepare

    base = ["--meta_path", "m.json", "--output_dir", str(tmp_path), "--report_to", "none"]
    for extra, minutes in (([], 120), (["--ddp_timeout", "45"], 45)):
        reset_accelerate()
        accelerator = prepare.make_accelerator(train_RORem.parse_args(base + extra))
        assert accelerator.init_handler.timeout == timedelta(minutes=minutes)
        assert accelerator.init_handler.to_kwargs() == {"timeout": timedelta(minutes=minutes)}  # what init_process_group gets
        # DDP keeps the gradients in its buckets (one copy, as the planner counts them)
        assert accelerator.ddp_handler.to_kwargs() == {"gradient_as_bucket_view": True}
    reset_accelerate()


@pytest.mark.parametrize("script", ["supervised", "rl"])
def test_a_run_that_fails_mid_step_leaves_nothing_behind(tmp_path, tiny_model_dir, toy_meta, run_script, monkeypatch, script):
    """An error inside a step (a CUDA out-of-memory, say) ends the run; the signal handlers it set are
    given back and its model is freed, so the next run in the same process (the GPU check's next row, a
    notebook's next cell) starts clean. The RL loop does not use run.batches(), so both kinds are tried."""
    import gc
    import weakref

    import train_RORem_ddpo
    from training import rl_loop

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    models = []

    def out_of_memory(*args, **kwargs):
        models.append(weakref.ref(args[0] if script == "supervised" else kwargs.get("unet", args[4])))
        raise RuntimeError("CUDA out of memory (simulated)")

    if script == "supervised":
        monkeypatch.setattr(train_RORem, "diffusion_loss", out_of_memory)
        module, argv = train_RORem, _args(tiny_model_dir, toy_meta, str(tmp_path / "run"), "--max_train_steps", "3", "--use_lora")
    else:
        monkeypatch.setattr(rl_loop, "policy_update", out_of_memory)
        module = train_RORem_ddpo
        argv = ["--pretrained_model_name_or_path", tiny_model_dir, "--meta_path", toy_meta, "--output_dir", str(tmp_path / "run"),
                "--resolution", "32", "--report_to", "none", "--sample_steps", "3", "--sample_batch_size", "2",
                "--sample_batches_per_epoch", "1", "--train_batch_size", "2", "--num_train_epochs", "1", "--eval_samples", "2",
                "--reward", "preserve=1", "--lora_rank", "4"]
    try:
        run_script(module, argv)
    except RuntimeError as e:
        message = str(e)
    assert message == "CUDA out of memory (simulated)" and len(models) == 1
    gc.collect()
    assert {s: signal.getsignal(s) for s in before} == before
    assert models[0]() is None, "the failed run's model is still alive"
