"""Two CPU ranks under `accelerate launch` (DESIGN.md section 10) train exactly like one rank with
the same global batch: both ranks run, gradients are averaged, and the weights agree."""
import json
import os
import socket
import subprocess
import sys

import train_RORem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_ranks(script, args, cwd, extra_launch=()):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *extra_launch,
           os.path.join(ROOT, script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def _common(model, meta, out):
    return ["--pretrained_model_name_or_path", model, "--meta_path", meta, "--output_dir", out, "--resolution", "32",
            "--report_to", "none", "--validation_steps", "0", "--max_train_steps", "3", "--checkpointing_steps", "3",
            "--random_flip", "--learning_rate", "1e-2", "--adam_epsilon", "1.0", "--adam_weight_decay", "0"]
    # a large Adam epsilon makes each update proportional to the gradient (Adam's usual +-lr steps turn
    # float noise on near-zero gradients into lr-sized differences), so weights compare tightly


def test_two_ranks_equal_one_rank_with_the_same_global_batch(tmp_path, tiny_model_dir, toy_meta, run_script):
    from diffusers import UNet2DConditionModel

    two = str(tmp_path / "two")
    res = launch_two_ranks("train_RORem.py", _common(tiny_model_dir, toy_meta, two) + ["--train_batch_size", "2"], str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = os.path.join(two, "checkpoint-3")
    assert json.load(open(os.path.join(ckpt, "training_state.json")))["num_processes"] == 2
    assert os.path.isfile(os.path.join(ckpt, "random_states_1.pkl"))  # rank 1 really ran and saved its state

    one = str(tmp_path / "one")
    run_script(train_RORem, _common(tiny_model_dir, toy_meta, one) + ["--train_batch_size", "4"])
    half = str(tmp_path / "half")  # what rank 0 would learn alone, without gradient averaging
    run_script(train_RORem, _common(tiny_model_dir, toy_meta, half) + ["--train_batch_size", "2"])

    def load(folder):
        return UNet2DConditionModel.from_pretrained(folder).state_dict()

    def diff(x, y):
        return max((x[k] - y[k]).abs().max().item() for k in x)

    a, b, c = load(os.path.join(two, "unet")), load(os.path.join(one, "unet")), load(os.path.join(half, "unet"))
    start = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").state_dict()
    assert diff(a, start) > 1e-4
    assert diff(a, b) <= 1e-6
    assert diff(a, c) > 100 * max(diff(a, b), 1e-8)
