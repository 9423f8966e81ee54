"""Two CPU ranks under `accelerate launch` (DESIGN.md section 10) train exactly like one rank with
the same global batch: both ranks run, gradients are averaged, and the weights agree."""
import json
import os
import socket
import subprocess
import sys

import pytest

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


def launch_deepspeed_one_rank(tmp_path, script, args, extensions_dir):
    """One rank under the shipped ZeRO-2 launch config (accelerate runs DeepSpeed only on a non-CPU
    device, and its multi-process CPU path excludes DeepSpeed, so two CPU ranks cannot be driven here)."""
    import yaml

    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "deepspeed_zero2.yaml")))
    assert cfg["distributed_type"] == "DEEPSPEED" and cfg["deepspeed_config"]["zero_stage"] == 2
    cfg.update(num_processes=1, mixed_precision="no")
    cfg_path = tmp_path / "ds.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=extensions_dir)
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg_path),
           "--main_process_port", str(_free_port()), script, *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _unet_state(path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(path).state_dict()


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_deepspeed_zero2_trains_saves_and_resumes(tmp_path, tiny_model_dir, toy_meta, run_script, torch_extensions_dir):
    """Checkpoints hold DeepSpeed's state and our diffusers UNet; resume continues; ZeRO-2 equals
    plain AdamW."""
    out = str(tmp_path / "ds")

    def launch(steps, *extra):
        args = _common(tiny_model_dir, toy_meta, out) + ["--train_batch_size", "2", "--checkpointing_steps", "2", *extra]
        args[args.index("--max_train_steps") + 1] = str(steps)
        return launch_deepspeed_one_rank(tmp_path, os.path.join(ROOT, "train_RORem.py"), args, torch_extensions_dir)

    res = launch(2)
    assert "DeepSpeed Model and Optimizer saved" in res.stderr
    assert os.path.isdir(os.path.join(out, "checkpoint-2", "pytorch_model"))  # DeepSpeed's own state
    launch(4, "--resume_from_checkpoint", "latest")
    plain = str(tmp_path / "plain")
    run_script(train_RORem, _common(tiny_model_dir, toy_meta, plain) + ["--train_batch_size", "2", "--max_train_steps", "4"])
    assert _max_diff(_unet_state(os.path.join(out, "unet")), _unet_state(os.path.join(plain, "unet"))) <= 1e-5


NAN_MICRO_BATCHES = (2, 3)  # with accumulation 2: the end of window 1 (after a backward) and the start of window 2


def nan_at(loss_fn, calls_to_spoil):
    calls = {"n": 0}

    def spoiled(*a, **k):
        calls["n"] += 1
        loss = loss_fn(*a, **k)
        return loss * float("nan") if calls["n"] in calls_to_spoil else loss
    return spoiled


def test_deepspeed_skips_whole_windows_with_accumulation(tmp_path, tiny_model_dir, toy_meta, run_script, monkeypatch,
                                                         torch_extensions_dir):
    """Under DeepSpeed the engine updates inside backward. A NaN loss at the end of a window must not
    let the window's first micro-batch leak into the next one, and one at the start must not let the
    window's second micro-batch update alone: with accumulation 2, windows 1 and 2 are both skipped
    and window 3 trains at its own lr, exactly as without DeepSpeed."""
    args = ["--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--lr_scheduler", "linear"]
    wrapper = tmp_path / "train_with_nans.py"
    wrapper.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\nimport train_RORem\n"
                       f"from myutils.errors import run_cli\nfrom tests.test_multiprocess import nan_at\n"
                       f"train_RORem.diffusion_loss = nan_at(train_RORem.diffusion_loss, {NAN_MICRO_BATCHES!r})\n"
                       f"run_cli(train_RORem.main)\n")
    ds = str(tmp_path / "ds")
    res = launch_deepspeed_one_rank(tmp_path, str(wrapper), _common(tiny_model_dir, toy_meta, ds) + args, torch_extensions_dir)
    assert res.stderr.count("non-finite loss, update skipped") == 2

    monkeypatch.setattr(train_RORem, "diffusion_loss", nan_at(train_RORem.diffusion_loss, NAN_MICRO_BATCHES))
    plain = str(tmp_path / "plain")
    run_script(train_RORem, _common(tiny_model_dir, toy_meta, plain) + args)
    a, b = _unet_state(os.path.join(ds, "unet")), _unet_state(os.path.join(plain, "unet"))
    assert _max_diff(a, _unet_state(os.path.join(tiny_model_dir, "unet"))) > 1e-4  # window 3 trained
    assert _max_diff(a, b) <= 1e-5


def _saved_weights(folder, *names):
    import torch
    from safetensors.torch import load_file

    out = {}
    for name in names:
        path = os.path.join(folder, name)
        w = load_file(path) if name.endswith(".safetensors") else torch.load(path, map_location="cpu")
        out.update({f"{name}:{k}": v.float() for k, v in w.items()})
    return out


def _lora_moved(weights):
    """The LoRA's up (B) weights left their zero start: it trained."""
    return max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k or "lora.up" in k) > 0


def _max_weight_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


_TIGHT = ["--learning_rate", "1e-2", "--adam_epsilon", "1.0", "--adam_weight_decay", "0"]  # see _common


def test_discriminator_on_two_ranks_equals_one_rank(tmp_path, tiny_model_dir, run_script):
    """The discriminator goes through DDP's forward: two ranks x batch 2 save the head and LoRA that
    one rank x batch 4 saves."""
    import train_RORem_discriminator
    from toy_world.data import write_scored_toy_dataset, write_toy_dataset

    meta = write_scored_toy_dataset(write_toy_dataset(str(tmp_path / "toy"), 8, 32, seed=2), str(tmp_path / "scored"))

    def args(out, batch):
        return ["--pretrained_model_name_or_path", tiny_model_dir, "--meta_path", meta, "--output_dir", out, "--resolution", "32",
                "--train_batch_size", str(batch), "--max_train_steps", "3", "--checkpointing_steps", "3", "--validation_steps", "0",
                "--val_fraction", "0.25", "--report_to", "none", *_TIGHT]

    two, one = str(tmp_path / "disc2"), str(tmp_path / "disc1")
    res = launch_two_ranks("train_RORem_discriminator.py", args(two, 2), str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.isfile(os.path.join(two, "checkpoint-3", "random_states_1.pkl"))
    run_script(train_RORem_discriminator, args(one, 4))
    names = ("cls_pred_branch.pt", "pytorch_lora_weights.safetensors")
    a, b = _saved_weights(two, *names), _saved_weights(one, *names)
    assert _lora_moved(a)  # the LoRA trained
    assert _max_weight_diff(a, b) <= 1e-6


@pytest.mark.parametrize("extra", [[], ["--safeguard_mu", "0.6"]], ids=["dpo", "sdpo"])
def test_dpo_on_two_ranks_equals_one_rank(tmp_path, tiny_model_dir, toy_meta, run_script, extra):
    """DPO's reference pass (adapters off, no grad) must not upset DDP's gradient synchronisation: two
    ranks x batch 2 save the LoRA of one rank x batch 4. With the SDPO safeguard too, whose scale is
    a ratio over the global batch (summed over ranks; each rank's own would differ)."""
    import train_RORem_dpo

    root = os.path.dirname(toy_meta)
    pairs = [{"source": os.path.join(root, e["source"]), "mask": os.path.join(root, e["mask"]),
              "preferred": os.path.join(root, e["GT"]), "rejected": os.path.join(root, e["source"])}
             for e in json.load(open(toy_meta))]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))

    def args(out, batch):
        return ["--pretrained_model_name_or_path", tiny_model_dir, "--preference_data", str(tmp_path / "pairs.json"),
                "--output_dir", out, "--resolution", "32", "--train_batch_size", str(batch), "--max_train_steps", "3",
                "--checkpointing_steps", "3", "--use_lora", "--report_to", "none", *_TIGHT, *extra]

    two, one = str(tmp_path / "dpo2"), str(tmp_path / "dpo1")
    res = launch_two_ranks("train_RORem_dpo.py", args(two, 2), str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.isfile(os.path.join(two, "checkpoint-3", "random_states_1.pkl"))
    run_script(train_RORem_dpo, args(one, 4))
    a, b = _saved_weights(two, "pytorch_lora_weights.safetensors"), _saved_weights(one, "pytorch_lora_weights.safetensors")
    assert _lora_moved(a)
    assert _max_weight_diff(a, b) <= 1e-6


def test_preference_pairs_split_over_two_ranks_equal_one_rank(tmp_path, tiny_model_dir, toy_meta, disc_dir):
    """Each rank generates and scores every other input; the pairs equal a one-process run's."""
    from tests.test_build_preference_pairs import bpp

    root = os.path.dirname(toy_meta)
    (tmp_path / "inputs.json").write_text(json.dumps([{"source": os.path.join(root, e["source"]), "mask": os.path.join(root, e["mask"])}
                                                      for e in json.load(open(toy_meta))[:4]]))

    def argv(out):
        return ["--pretrained_model", tiny_model_dir, "--RORem_discriminator", disc_dir, "--meta_path", str(tmp_path / "inputs.json"),
                "--output_dir", out, "--num_candidates", "2", "--inference_steps", "2", "--strength", "1.0",
                "--resolution", "32", "--min_margin", "-1", "--device", "cpu"]

    res = launch_two_ranks("scripts/build_preference_pairs.py", argv(str(tmp_path / "two")), str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "candidates (rank 1): 100%|██████████| 2/2" in res.stderr  # the work was split: each rank did 2 of the 4
    bpp.main(argv(str(tmp_path / "one")))
    two, one = (json.load(open(tmp_path / d / "meta.json")) for d in ("two", "one"))
    assert len(two) == len(one) == 4
    for a, b in zip(two, one):
        assert abs(a["preferred_score"] - b["preferred_score"]) < 1e-5 and abs(a["rejected_score"] - b["rejected_score"]) < 1e-5
        assert os.path.basename(a["preferred"]) == os.path.basename(b["preferred"])


def test_node_launchers_run_on_two_cpu_ranks(tmp_path, tiny_model_dir, toy_meta):
    """scripts/run_train_RORem.sh and run_train_dpo.sh with their 8-GPU launch config and training
    configs, on 2 CPU ranks (extra arguments override the configs)."""
    root = os.path.dirname(toy_meta)
    pairs = [{"source": os.path.join(root, e["source"]), "mask": os.path.join(root, e["mask"]),
              "preferred": os.path.join(root, e["GT"]), "rejected": os.path.join(root, e["source"])} for e in json.load(open(toy_meta))]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", NUM_GPUS="2",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    small = ["--pretrained_model_name_or_path", tiny_model_dir, "--resolution", "32", "--max_train_steps", "2", "--checkpointing_steps", "2",
             "--mixed_precision", "no", "--train_batch_size", "2", "--gradient_accumulation_steps", "1", "--report_to", "none",
             "--no-gradient_checkpointing", "--validation_steps", "0"]
    for cmd, made in [(["scripts/run_train_RORem.sh", toy_meta, str(tmp_path / "rorem")], "rorem/unet/config.json"),
                      (["scripts/run_train_dpo.sh", os.path.join(tiny_model_dir, "unet"), str(tmp_path / "pairs.json"), str(tmp_path / "dpo")],
                       "dpo/pytorch_lora_weights.safetensors")]:
        res = subprocess.run(["bash", *cmd, *small], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert os.path.isfile(tmp_path / made)
        ckpt = tmp_path / made.split("/")[0] / "checkpoint-2"
        assert os.path.isfile(ckpt / "random_states_1.pkl")  # rank 1 ran
        state = json.load(open(ckpt / "training_state.json"))
        assert state["num_processes"] == 2 and state["global_step"] == 2  # NUM_GPUS and the --max_train_steps override
    from diffusers import UNet2DConditionModel

    trained = UNet2DConditionModel.from_pretrained(str(tmp_path / "rorem" / "unet")).state_dict()
    start = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").state_dict()
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 0  # the launcher's run trained the UNet
    lora = _saved_weights(str(tmp_path / "dpo"), "pytorch_lora_weights.safetensors")
    assert _lora_moved(lora)


def test_grpo_groups_span_two_ranks(tmp_path, tiny_model_dir, toy_meta, disc_dir, run_script):
    """GRPO gathers rewards and input ids from both ranks; every rank saves its state. The held-out
    evaluation is shared out (each rank 2 of 4 chunks) and gives one process's per-sample rewards."""
    import train_RORem_ddpo

    def argv(out):
        return ["--pretrained_model_name_or_path", tiny_model_dir, "--meta_path", toy_meta, "--output_dir", out,
                "--resolution", "32", "--report_to", "none", "--algorithm", "grpo", "--group_size", "2",
                "--reward", "discriminator=1,preserve=0.5", "--discriminator_path", disc_dir, "--sample_steps", "3",
                "--sample_batch_size", "1", "--sample_batches_per_epoch", "2", "--train_batch_size", "2",
                "--num_train_epochs", "1", "--eval_samples", "4", "--eval_batch_size", "1", "--num_validation_images", "2"]

    out = str(tmp_path / "grpo2")
    res = launch_two_ranks("train_RORem_ddpo.py", argv(out), str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = [d for d in os.listdir(out) if d.startswith("checkpoint-")]
    assert ckpt and os.path.isfile(os.path.join(out, ckpt[0], "random_states_1.pkl"))
    assert json.load(open(os.path.join(out, "final_metrics.json")))["metrics"]["eval_kl_to_start"] > 0
    one = str(tmp_path / "one")
    run_script(train_RORem_ddpo, argv(one))
    start_two, start_one = (json.load(open(os.path.join(d, "reward_history.json")))["evals"][0] for d in (out, one))
    assert len(start_two["per_sample"]) == 4
    for a, b in zip(start_two["per_sample"], start_one["per_sample"]):
        assert a == pytest.approx(b, abs=1e-6)
    assert start_two["eval_sde_reward"] == pytest.approx(start_one["eval_sde_reward"], abs=1e-6)


def test_pairs_for_labelling_on_two_ranks(tmp_path, tiny_model_dir, toy_meta):
    """--export_pairs gathers both ranks' pairs into one pairs.json (rank-major numbering, one
    trajectory file per rank); --pair_labels on two ranks trains on them and saves both ranks' state."""
    out, pairs_dir = str(tmp_path / "pw2"), tmp_path / "pairs"
    common = ["--pretrained_model_name_or_path", tiny_model_dir, "--meta_path", toy_meta, "--output_dir", out, "--resolution", "32",
              "--report_to", "none", "--algorithm", "pairwise", "--group_size", "2", "--reward", "preserve=1", "--sample_steps", "3",
              "--sample_batch_size", "1", "--sample_batches_per_epoch", "2", "--train_batch_size", "2", "--num_train_epochs", "1",
              "--eval_samples", "2", "--num_validation_images", "2"]
    res = launch_two_ranks("train_RORem_ddpo.py", common + ["--export_pairs", str(pairs_dir)], str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.load(open(pairs_dir / "pairs.json"))
    assert [p["pair"] for p in doc["pairs"]] == [0, 1, 2, 3] and doc["num_processes"] == 2
    assert {"trajectories-rank0.pt", "trajectories-rank1.pt", "pair-00003.png"} <= set(os.listdir(pairs_dir))
    for p, label in zip(doc["pairs"], ["a", "b", "b", None]):
        p["label"] = label
    json.dump(doc, open(pairs_dir / "pairs.json", "w"))
    res = launch_two_ranks("train_RORem_ddpo.py", common + ["--pair_labels", str(pairs_dir / "pairs.json")], str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "random_states_1.pkl"))  # 4 samples per rank, batch 2
    lora = _saved_weights(out, "pytorch_lora_weights.safetensors")
    assert _lora_moved(lora)  # the labels trained it


def test_reward_weighted_lcm_two_ranks_equal_one_rank(tmp_path, tiny_model_dir, toy_meta, disc_dir, run_script):
    """Softmax weights are computed over the global batch (scores gathered from both ranks), so two
    ranks x batch 2 train exactly like one rank x batch 4; with RG-LCD's reward guidance on top (the
    discriminator's gradient through each rank's student predictions)."""
    import train_RORem_lcm_rewarded
    from safetensors.torch import load_file

    def argv(out, batch):
        return ["--pretrained_model_name_or_path", tiny_model_dir, "--meta_path", toy_meta, "--output_dir", out, "--resolution", "32",
                "--report_to", "none", "--max_train_steps", "2", "--checkpointing_steps", "2", "--train_batch_size", str(batch),
                "--lora_rank", "4", "--num_ddim_timesteps", "10", "--w_min", "0", "--w_max", "2", "--discriminator_path", disc_dir,
                "--weighting", "softmax", "--reward_temperature", "0.01", "--learning_rate", "1e-2", "--adam_epsilon", "1.0",
                "--adam_weight_decay", "0", "--reward_guidance", "discriminator=1,gt=0.5"]

    two = str(tmp_path / "two")
    res = launch_two_ranks("train_RORem_lcm_rewarded.py", argv(two, 2), str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.isfile(os.path.join(two, "checkpoint-2", "random_states_1.pkl"))
    one = str(tmp_path / "one")
    run_script(train_RORem_lcm_rewarded, argv(one, 4))
    a, b = (load_file(os.path.join(d, "pytorch_lora_weights.safetensors")) for d in (two, one))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_morl_population_on_two_ranks_equals_one_rank(tmp_path, tiny_model_dir, toy_meta, run_script):
    """Every adapter of the population is trained under DDP (only the active one is used per forward)
    and the main process's held-out objectives reach every rank, so both take the same tasks: two
    ranks x 1 input per epoch choose the tasks, reach the objectives and save the LoRAs of one rank x 2."""
    import train_RORem_morl

    def args(out, sample_batch, train_batch):
        return ["--pretrained_model_name_or_path", tiny_model_dir, "--meta_path", toy_meta, "--output_dir", out,
                "--resolution", "32", "--report_to", "none", "--objectives", "preserve,jpeg", "--population", "2",
                "--generations", "2", "--warmup_generations", "1", "--group_size", "2", "--sample_steps", "2",
                "--sample_batch_size", str(sample_batch), "--sample_batches_per_epoch", "1", "--train_batch_size", str(train_batch),
                "--eval_samples", "2", "--weight_partitions", "2", *_TIGHT]

    two, one = str(tmp_path / "morl2"), str(tmp_path / "morl1")
    res = launch_two_ranks("train_RORem_morl.py", args(two, 1, 2), str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.isfile(os.path.join(two, "checkpoint-4", "random_states_1.pkl"))
    run_script(train_RORem_morl, args(one, 2, 4))
    a, b = (json.load(open(os.path.join(d, "policies.json"))) for d in (two, one))
    assert len(a["hypervolume_per_generation"]) == 2
    assert a["hypervolume_per_generation"] == pytest.approx(b["hypervolume_per_generation"], abs=1e-6)
    assert [(p["name"], p["weights"]) for p in a["policies"]] == [(p["name"], p["weights"]) for p in b["policies"]]
    for p, q in zip(a["policies"], b["policies"]):
        assert p["objectives"] == pytest.approx(q["objectives"], abs=1e-5)
    for k in ("policy_0", "policy_1"):
        x = _saved_weights(os.path.join(two, k), "pytorch_lora_weights.safetensors")
        assert _max_weight_diff(x, _saved_weights(os.path.join(one, k), "pytorch_lora_weights.safetensors")) <= 1e-5


def test_the_data_check_is_shared_out_and_every_rank_reports_every_problem(tmp_path, tiny_model_dir, toy_meta):
    """Two real ranks with a bad entry in each one's share: the run stops with one-line errors, no
    traceback, no rank left waiting in a collective (the launcher stops the other rank once one exits,
    so which rank's message shows varies; that each holds every problem is tested in test_data.py)."""
    root = os.path.dirname(toy_meta)
    entries = [{k: os.path.join(root, v) for k, v in e.items()} for e in json.load(open(toy_meta))]
    entries[2]["GT"] = str(tmp_path / "missing.png")  # rank 0's share
    entries[3]["mask"] = str(tmp_path / "missing_mask.png")  # rank 1's
    (tmp_path / "meta.json").write_text(json.dumps(entries))
    res = launch_two_ranks("train_RORem.py", _common(tiny_model_dir, str(tmp_path / "meta.json"), str(tmp_path / "out")), str(tmp_path))
    assert res.returncode != 0 and "train_RORem.py\", line" not in res.stderr  # (the launcher prints its own traceback)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("file not found" in line for line in errors)  # what each rank knows: tests/test_data.py


def test_lr_schedule_counts_updates_under_deepspeed():
    """accelerate steps a prepared scheduler once per process per update, DeepSpeed's engine steps the
    bare one once per update: with 8 processes a 10-update warmup ends after 10 updates either way
    (it took 80 under DeepSpeed, and a linear decay went an eighth of the way)."""
    from types import SimpleNamespace

    import torch
    from accelerate.utils import DistributedType

    from training.prepare import make_lr_scheduler

    args = SimpleNamespace(lr_scheduler="linear", lr_warmup_steps=10)
    for kind, calls_per_update in ((DistributedType.DEEPSPEED, 1), (DistributedType.MULTI_GPU, 8)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make_lr_scheduler(args, opt, 30, SimpleNamespace(distributed_type=kind, num_processes=8))
        for update in range(1, 21):
            for _ in range(calls_per_update):
                sched.step()
            want = update / 10 if update <= 10 else (30 - update) / 20  # warmup, then linear to 0 at update 30
            assert abs(opt.param_groups[0]["lr"] - want) < 1e-9, (kind, update)


def _fake_slurm(tmp_path):
    """srun and scontrol stand-ins: srun starts its command once per node (SLURM_NODEID 0..N-1) on
    this host, so scripts/slurm_train.sh runs as it would on N machines whose first one is 127.0.0.1."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\necho 127.0.0.2\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nwhile [ \"$1\" != bash ]; do shift; done\npids=()\n"
        "for n in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$n \"$@\" > \"$FAKE_SLURM_LOGS/node$n.log\" 2>&1 & pids+=($!); done\n"
        "rc=0\nfor p in \"${pids[@]}\"; do wait $p || rc=$?; done\nexit $rc\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def test_two_machines_train_like_one_through_the_slurm_launcher(tmp_path, tiny_model_dir, toy_meta, run_script):
    """scripts/slurm_train.sh with 2 nodes x 1 rank (`--num_machines 2 --machine_rank 0/1` on this host)
    trains exactly like one rank with the same global batch, through the shipped multi-node config."""
    import yaml

    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "accelerate_multinode.yaml")))
    assert cfg["distributed_type"] == "MULTI_GPU" and cfg["rdzv_backend"] == "static"
    cfg.update(mixed_precision="no", gpu_ids=None)
    cfg_path = tmp_path / "multinode.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PATH=f"{_fake_slurm(tmp_path)}:{os.environ['PATH']}", SLURM_JOB_NODELIST="fake[0-1]", SLURM_NNODES="2",
               SLURM_SUBMIT_DIR=ROOT, GPUS_PER_NODE="1", MAIN_PORT=str(_free_port()), PYTHON=sys.executable,
               ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", FAKE_SLURM_LOGS=str(tmp_path))
    two = str(tmp_path / "two")
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm_train.sh"), str(cfg_path), "train_RORem.py",
                          *_common(tiny_model_dir, toy_meta, two), "--train_batch_size", "2"],
                         capture_output=True, text=True, env=env, timeout=600)
    logs = [open(tmp_path / f"node{n}.log").read() if (tmp_path / f"node{n}.log").exists() else "(no log: srun not reached)"
            for n in range(2)]
    assert res.returncode == 0, res.stderr[-2000:] + logs[0][-2000:] + logs[1][-2000:]
    assert os.path.isfile(os.path.join(two, "checkpoint-3", "random_states_1.pkl"))  # the second machine's rank saved
    one = str(tmp_path / "one")
    run_script(train_RORem, _common(tiny_model_dir, toy_meta, one) + ["--train_batch_size", "4"])
    a, b = _unet_state(os.path.join(two, "unet")), _unet_state(os.path.join(one, "unet"))
    assert _max_diff(a, b) <= 1e-6


def test_machines_that_do_not_share_the_output_dir_stop_with_one_message(tmp_path, tiny_model_dir, toy_meta):
    """Each "machine" runs in its own folder with the same relative --output_dir, as two nodes with
    local disks would: both stop at start-up with the message, neither hangs."""
    port, procs = _free_port(), []
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    for rank in range(2):
        (tmp_path / f"node{rank}").mkdir()
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--mixed_precision", "no", "--dynamo_backend", "no", "--rdzv_backend", "static",
               os.path.join(ROOT, "train_RORem.py"), *_common(tiny_model_dir, toy_meta, "out"), "--train_batch_size", "2"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=str(tmp_path / f"node{rank}"), env=env))
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode != 0
        assert "out: not one folder shared by every machine (1 of 2 ranks could not read" in err, err[-2000:]
    assert not os.path.exists(tmp_path / "node0" / "out" / "checkpoint-3")


def test_the_slurm_launcher_reads_a_long_node_list(tmp_path):
    """A large job's node list: the first name is the main node, and the launcher does not die of its own
    pipe (`scontrol | head -n 1` under pipefail ended jobs before they started, 3 runs in 10 with two
    names and every run with this many)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nfor i in $(seq 1 20000); do echo node$i.cluster.example; done\n")
    (bin_dir / "srun").write_text("#!/bin/bash\necho \"$MAIN_IP\" > \"$FAKE_SLURM_LOGS/main_ip\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node[1-20000]", SLURM_NNODES="20000",
               SLURM_SUBMIT_DIR=ROOT, FAKE_SLURM_LOGS=str(tmp_path))
    env.pop("RORem_NODE_STEP", None)
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm_train.sh"), "cfg.yaml", "train_RORem.py"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "main_ip").read_text().strip() == "node1.cluster.example"
