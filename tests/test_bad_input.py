"""Bad numbers and --config values stop every tool before any work, with the argument's own name (or the
YAML file and key) in one line: argparse's `error: argument --x: ...` or our `error: ...`."""
import importlib
import json
import os
import sys

import pytest

from myutils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

TRAIN = ["--meta_path", "m.json", "--output_dir", "o"]
RL = TRAIN + ["--discriminator_path", "d"]

# (module, its required arguments, a bad argument, its value, what the message says)
CASES = [
    ("train_RORem", TRAIN, "--resolution", "0", "--resolution: must be at least 8, got 0"),
    ("train_RORem", TRAIN, "--max_train_steps", "0", "--max_train_steps: must be at least 1, got 0"),
    ("train_RORem", TRAIN, "--train_batch_size", "-2", "--train_batch_size: must be at least 1, got -2"),
    ("train_RORem", TRAIN, "--learning_rate", "nan", "--learning_rate: expected a finite number, got 'nan'"),
    ("train_RORem", TRAIN, "--learning_rate", "-1", "--learning_rate: must be at least 0, got -1"),
    ("train_RORem", TRAIN, "--adam_beta2", "1", "--adam_beta2: must be below 1, got 1"),
    ("train_RORem", TRAIN, "--ema_decay", "1.5", "--ema_decay: must be at most 1, got 1.5"),
    ("train_RORem", TRAIN, "--checkpoints_total_limit", "0", "--checkpoints_total_limit: must be at least 1, got 0"),
    ("train_RORem", TRAIN, "--validation_strength", "0", "--validation_strength: must be above 0, got 0"),
    ("train_RORem", TRAIN, "--ddp_timeout", "0", "--ddp_timeout: must be above 0, got 0"),
    ("train_RORem", TRAIN, "--seed", "-1", "--seed: must be at least 0, got -1"),
    ("train_RORem", TRAIN, "--lora_rank", "2.5", "--lora_rank: expected an integer, got '2.5'"),
    ("train_RORem_discriminator", TRAIN, "--val_fraction", "1", "--val_fraction: must be below 1, got 1"),
    ("train_RORem_discriminator", TRAIN, "--threshold", "inf", "--threshold: expected a finite number, got 'inf'"),
    ("train_RORem_dpo", ["--preference_data", "p.json", "--output_dir", "o"], "--beta", "-5", "--beta: must be above 0, got -5"),
    ("train_RORem_dpo", ["--preference_data", "p.json", "--output_dir", "o"], "--beta_end", "0", "--beta_end: must be above 0, got 0"),
    ("train_RORem_lcm", TRAIN, "--num_ddim_timesteps", "0", "--num_ddim_timesteps: must be at least 1, got 0"),
    ("train_RORem_lcm", TRAIN, "--reward_temperature", "0", "--reward_temperature: must be above 0, got 0"),
    ("train_RORem_lcm", TRAIN, "--score_every", "0", "--score_every: must be at least 1, got 0"),
    ("train_RORem_ddpo", RL, "--sample_steps", "0", "--sample_steps: must be at least 1, got 0"),
    ("train_RORem_ddpo", RL, "--strength", "1.5", "--strength: must be at most 1, got 1.5"),
    ("train_RORem_ddpo", RL, "--timestep_fraction", "0", "--timestep_fraction: must be above 0, got 0"),
    ("train_RORem_ddpo", RL, "--kl_coef", "-0.1", "--kl_coef: must be at least 0, got -0.1"),
    ("train_RORem_ddpo", RL, "--eval_batch_size", "0", "--eval_batch_size: must be at least 1, got 0"),
    ("train_RORem_morl", RL, "--population", "0", "--population: must be at least 1, got 0"),
    ("evaluate_RORem", ["--meta_path", "m.json", "--output_dir", "o"], "--limit", "-1", "--limit: must be at least 1, got -1"),
    ("evaluate_RORem", ["--meta_path", "m.json", "--output_dir", "o"], "--batch_size", "0", "--batch_size: must be at least 1, got 0"),
    ("evaluate_RORem", ["--meta_path", "m.json", "--output_dir", "o"], "--inference_steps", "0", "--inference_steps: must be at least 1"),
    ("inference_RORem", [], "--resolution", "0", "--resolution: must be at least 8, got 0"),
    ("inference_RORem", [], "--dilate_size", "-3", "--dilate_size: must be at least 0, got -3"),
    ("inference_RORem", [], "--guidance_scale", "nan", "--guidance_scale: expected a finite number, got 'nan'"),
    ("inference_RORem_discriminator", ["--RORem_discriminator", "d"], "--threshold", "nan", "--threshold: expected a finite number"),
    ("build_preference_pairs", ["--output_dir", "o"], "--num_candidates", "1", "--num_candidates: must be at least 2, got 1"),
    ("build_preference_pairs", ["--output_dir", "o"], "--min_margin", "nan", "--min_margin: expected a finite number, got 'nan'"),
    ("sweep_dpo", [], "--betas", "0", "--betas: must be above 0, got 0"),
    ("sweep_lcm", [], "--thresholds", "inf", "--thresholds: expected a finite number, got 'inf'"),
    ("train_RORem", TRAIN, "--lr_scheduler", "cosine_warm", "--lr_scheduler: invalid choice: 'cosine_warm'"),
    ("train_RORem", TRAIN, "--seed", str(2 ** 70), f"--seed: must be at most 4294967295, got {2 ** 70}"),
    ("inference_RORem", [], "--seed", str(2 ** 70), f"--seed: must be at most 4294967295, got {2 ** 70}"),
    ("inference_RORem_discriminator", ["--RORem_discriminator", "d"], "--resolution", "60", "--resolution: must be a multiple of 8, got 60"),
    ("inference_RORem", [], "--resolution", "60", "--resolution: must be a multiple of 8, got 60"),
    ("annotate_RORem", ["--meta_path", "m.json"], "--discriminator_threshold", "nan", "--discriminator_threshold: expected a finite number"),
    ("annotate_RORem", ["--meta_path", "m.json"], "--port", "70000", "--port: must be at most 65535, got 70000"),
    ("app_RORem", [], "--port", "0", "--port: must be at least 1, got 0"),
    ("app_RORem", [], "--port", "http", "--port: expected an integer, got 'http'"),
]


@pytest.mark.parametrize("module, required, flag, value, message", CASES, ids=[f"{c[0]}{c[2]}={c[3]}" for c in CASES])
def test_bad_numbers_are_refused_by_name(module, required, flag, value, message, capsys):
    parse = importlib.import_module(module).parse_args
    with pytest.raises(SystemExit) as stop:
        parse(required + [flag, value])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f"error: argument {message}") or message in last, last


@pytest.mark.parametrize("yaml_text, message", [
    ("resolution: 0\n", "resolution: must be at least 8, got 0"),
    ("random_flip: 'no'\n", "random_flip: expected true or false, got 'no'"),
    ("train_batch_size: [4, 8]\n", "train_batch_size: expected one value, got [4, 8]"),
    ("mixed_precision: fp8\n", "mixed_precision: 'fp8' is not one of no, fp16, bf16"),
    ("learning_rate: .nan\n", "learning_rate: expected a finite number, got 'nan'"),
    ("lora_target_modules: to_q\n", "lora_target_modules: expected a list, got 'to_q'"),
    ("max_train_steps: ten\n", "max_train_steps: expected an integer, got 'ten'"),
])
def test_config_values_get_the_command_line_checks_naming_the_file(tmp_path, yaml_text, message):
    import train_RORem

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(UserError) as err:
        train_RORem.parse_args(["--config", str(cfg)] + TRAIN)
    assert str(err.value) == f"{cfg}: {message}"


def test_good_config_values_convert_as_on_the_command_line(tmp_path):
    import train_RORem

    cfg = tmp_path / "good.yaml"
    cfg.write_text("resolution: 256\nlearning_rate: 1.0e-4\nrandom_flip: true\nmixed_precision: bf16\nlora_target_modules: [to_q, to_k]\n"
                   "max_train_steps: '12'\n")
    args = train_RORem.parse_args(["--config", str(cfg)] + TRAIN)
    assert (args.resolution, args.learning_rate, args.random_flip, args.mixed_precision) == (256, 1e-4, True, "bf16")
    assert args.lora_target_modules == ["to_q", "to_k"] and args.max_train_steps == 12


def test_a_new_run_never_writes_into_another_runs_checkpoints(tmp_path, tiny_model_dir, toy_meta, run_script):
    """An --output_dir holding checkpoints is refused without --resume_from_checkpoint, before anything
    is written there (a new run overwrote some of them and `latest` then mixed the two runs)."""
    import train_RORem

    out = tmp_path / "run"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-8").mkdir()
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(UserError, match=r"holds checkpoints of an earlier run \(checkpoint-4, checkpoint-8\).*--resume_from_checkpoint latest"):
        run_script(train_RORem, ["--pretrained_model_name_or_path", tiny_model_dir, "--meta_path", toy_meta, "--output_dir", out,
                                 "--resolution", "32", "--max_train_steps", "1", "--report_to", "none"])
    assert sorted(p.name for p in out.iterdir()) == before


def _truncated_copy(toy_meta, tmp_path, index=3):
    """The toy data with entry `index`'s source as a JPEG cut to 60% of its bytes."""
    import json
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(os.path.dirname(toy_meta), data)
    rows = json.load(open(toy_meta))
    jpeg = data / "broken.jpg"
    Image.open(data / rows[index]["source"]).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[: int(jpeg.stat().st_size * 0.6)])
    rows[index]["source"] = "broken.jpg"
    meta = data / "meta.json"
    meta.write_text(json.dumps(rows))
    return meta, jpeg


def test_a_truncated_jpeg_is_found_by_the_check_and_named_where_it_is_decoded(tmp_path, toy_meta):
    """Image.verify passes a truncated JPEG: the data check decodes a JPEG without its end marker, and
    decoding anywhere later (a file broken after the check) names the entry and the file."""
    from myutils.data import RemovalDataset, check_entries, read_meta

    meta, jpeg = _truncated_copy(toy_meta, tmp_path)
    with pytest.raises(UserError, match=r"entry 3: 'source' file is not a readable image: .*broken.jpg \(OSError: image file is truncated"):
        check_entries(read_meta(str(meta), "triplet"))
    dataset = RemovalDataset(read_meta(str(meta), "triplet"), "triplet", 32)
    with pytest.raises(UserError, match=r"^.*meta.json: entry 3: .*broken.jpg: cannot decode the image \(image file is truncated"):
        dataset[3]


def test_training_that_meets_a_broken_image_in_a_loader_worker_ends_in_one_line(tmp_path, tiny_model_dir, toy_meta):
    import subprocess

    meta, jpeg = _truncated_copy(toy_meta, tmp_path)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train_RORem.py"), "--pretrained_model_name_or_path", tiny_model_dir,
                          "--meta_path", str(meta), "--output_dir", str(tmp_path / "out"), "--resolution", "32", "--train_batch_size", "12",
                          "--max_train_steps", "2", "--report_to", "none", "--skip_data_check", "--dataloader_num_workers", "1",
                          "--validation_steps", "0"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "meta.json: entry 3: " in last and "broken.jpg: cannot decode the image" in last, last


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without a GPU")
def test_gpu_only_settings_on_a_machine_without_one(tmp_path):
    import train_RORem
    from training import prepare
    from myutils.models import resolve_device_dtype
    from tests.conftest import reset_accelerate

    reset_accelerate()
    with pytest.raises(UserError, match="--mixed_precision fp16 needs a CUDA GPU and none is visible here"):
        prepare.make_accelerator(train_RORem.parse_args(TRAIN[:2] + ["--output_dir", str(tmp_path), "--mixed_precision", "fp16"]))
    reset_accelerate()
    with pytest.raises(UserError, match="--device cuda:1: no CUDA GPU is visible here"):
        resolve_device_dtype("cuda:1")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, toy_meta):
    import train_RORem
    from tests.conftest import reset_accelerate

    out = tmp_path_factory.mktemp("run") / "out"
    reset_accelerate()
    train_RORem.main(_train_argv(tiny_model_dir, toy_meta, out, "2"))
    reset_accelerate()
    return out


def _train_argv(model, meta, out, steps, *extra):
    return ["--pretrained_model_name_or_path", model, "--meta_path", meta, "--output_dir", str(out), "--resolution", "32",
            "--train_batch_size", "4", "--max_train_steps", steps, "--checkpointing_steps", "2", "--report_to", "none",
            "--validation_steps", "0", *extra]


def _cut(path):
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "optimizer.bin").write_bytes(b""), r"checkpoint-2/optimizer.bin is empty \(a write cut short\)"),
    (lambda c: _cut(c / "optimizer.bin"), r"cannot be loaded \(RuntimeError: PytorchStreamReader failed"),
    (lambda c: (c / "random_states_0.pkl").write_bytes(b""), r"random_states_0.pkl is empty"),
    (lambda c: (c / "random_states_0.pkl").unlink(), r"random_states_0.pkl cannot be read \(FileNotFoundError\), so the resumed run"),
    (lambda c: _cut(c / "random_states_0.pkl"), r"random_states_0.pkl cannot be read"),
    (lambda c: (c / "training_state.json").write_text("{"), r"training_state.json: unreadable"),
], ids=["empty optimizer", "cut optimizer", "empty rng", "missing rng", "cut rng", "bad state json"])
def test_a_damaged_checkpoint_is_refused_by_name(finished_run, tmp_path, tiny_model_dir, toy_meta, run_script, damage, message):
    """A resume from a damaged checkpoint stops with what is wrong (it went on without its RNG state,
    no longer exact, with an INFO line, or died in a traceback), and nothing there is written."""
    import shutil

    import train_RORem

    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    damage(out / "checkpoint-2")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(UserError, match=message):
        run_script(train_RORem, _train_argv(tiny_model_dir, toy_meta, out, "3", "--resume_from_checkpoint", "latest"))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_a_discriminator_is_not_taken_for_a_remover_lora(disc_dir, tiny_model_dir):
    """Refused where a remover LoRA is loaded; the discriminator itself still loads its own LoRA."""
    from myutils.models import load_inpaint_pipeline, load_lora_into_pipeline
    from myutils.reward_utils import load_reward_model

    pipe = load_inpaint_pipeline(tiny_model_dir)
    for path in (disc_dir, os.path.join(disc_dir, "pytorch_lora_weights.safetensors")):
        with pytest.raises(UserError, match=r"--RORem_LoRA .*: a discriminator \(its folder holds cls_pred_branch.pt\), not a remover"):
            load_lora_into_pipeline(pipe, path)
    assert load_reward_model(tiny_model_dir, disc_dir, 32) is not None


@pytest.mark.parametrize("flag, message", [("--RORem_unet", "--RORem_unet: folder not found: /no/such/unet"),
                                           ("--pretrained_model", "--pretrained_model: folder not found: /no/such/unet")])
def test_messages_name_the_flag_the_user_typed(tmp_path, toy_meta, tiny_model_dir, flag, message):
    """Not an internal alias (--pretrained_unet, --pretrained_model_name_or_path)."""
    import json

    import inference_RORem

    root = os.path.dirname(toy_meta)
    e = json.load(open(toy_meta))[0]
    argv = ["--pretrained_model", tiny_model_dir, "--image_path", os.path.join(root, e["source"]), "--mask_path",
            os.path.join(root, e["mask"]), "--save_path", str(tmp_path / "o.png"), flag, "/no/such/unet"]
    with pytest.raises(UserError, match=message):
        inference_RORem.main(argv)


def test_options_that_would_do_nothing_without_their_partner(tmp_path):
    import train_RORem
    import train_RORem_dpo
    from training import prepare
    from tests.conftest import reset_accelerate

    dpo = ["--preference_data", "p.json", "--output_dir", "o"]
    for extra in (["--beta_schedule", "linear"], ["--beta_end", "10"]):
        with pytest.raises(UserError, match="a linear or cosine schedule needs --beta_end, and --beta_end needs one"):
            train_RORem_dpo.parse_args(dpo + extra)
    (tmp_path / "file").write_text("x")
    reset_accelerate()
    with pytest.raises(UserError, match="--output_dir .*file: a file, not a folder"):
        prepare.make_accelerator(train_RORem.parse_args(["--meta_path", "m.json", "--output_dir", str(tmp_path / "file")]))
    reset_accelerate()


def test_output_folders_that_cannot_be_made_are_named_before_any_work(tmp_path, toy_meta):
    import evaluate_RORem
    import inference_RORem
    from myutils.errors import output_folder

    (tmp_path / "file").write_text("x")
    for path, message in ((tmp_path / "file", "a file, not a folder"), (tmp_path / "file" / "sub", "cannot create the folder")):
        with pytest.raises(UserError, match=f"--x {path}: {message}"):
            output_folder(str(path), "--x")
    with pytest.raises(UserError, match="--output_dir .*file: a file, not a folder"):
        evaluate_RORem.main(["--meta_path", toy_meta, "--output_dir", str(tmp_path / "file"), "--system", "b=base"])
    with pytest.raises(UserError, match="--save_path .*file: a file, but batch modes write a folder"):
        inference_RORem.main(["--meta_path", toy_meta, "--save_path", str(tmp_path / "file")])


def test_files_that_are_broken_or_of_another_kind_are_one_line(tmp_path, tiny_model_dir, toy_meta, disc_dir, capsys):
    """Each of these ended in a traceback: a truncated discriminator_config.json, a weights file that is
    not one for the evaluation, a garbage or foreign model config and a folder as the output for the
    memory planner, a folder given as --meta_path (said to be "not found")."""
    import shutil

    import evaluate_RORem
    import inference_RORem_discriminator
    import plan_memory
    from myutils.data import read_meta

    disc = tmp_path / "disc"
    shutil.copytree(disc_dir, disc)
    (disc / "discriminator_config.json").write_text('{"head_activation": "soft')
    with pytest.raises(UserError, match=r"discriminator_config.json: unreadable \(JSONDecodeError"):
        inference_RORem_discriminator.main(["--pretrained_model", tiny_model_dir, "--RORem_discriminator", str(disc),
                                            "--meta_path", toy_meta, "--resolution", "32"])
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint")
    results = tmp_path / "results"
    results.mkdir()
    (results / "meta.json").write_text(json.dumps([{k: e.paths[k] for k in ("source", "mask", "GT")}
                                                   for e in read_meta(toy_meta, "triplet")[:4]]))
    with pytest.raises(UserError, match=r"^--inception_weights .*garbage.pth: not loadable as fid's weights"):
        evaluate_RORem.main(["--meta_path", toy_meta, "--output_dir", str(tmp_path / "eval"), "--resolution", "32", "--limit", "4",
                             "--pretrained_model", tiny_model_dir, "--system", f"gt=results:{results}", "--no-fetch_weights",
                             "--inception_weights", str(tmp_path / "garbage.pth"), "--fid_dims", "64"])
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"config.json: not a model config.json \(JSONDecodeError"):
        plan_memory.main(["--unet_config", str(tmp_path / "config.json")])
    vae = os.path.join(ROOT, "configs", "real", "sdxl_vae.json")
    with pytest.raises(UserError, match=r"sdxl_vae.json: a config of AutoencoderKL \(\"_class_name\"\), expected UNet2DConditionModel"):
        plan_memory.main(["--unet_config", vae])
    with pytest.raises(UserError, match=r"^--output .*: a folder; give a file name"):
        plan_memory.main(["--output", str(tmp_path)])
    with pytest.raises(UserError, match=r"a folder without meta.json"):
        read_meta(str(tmp_path), "triplet")
    assert len(read_meta(str(results), "triplet")) == 4  # a folder with a meta.json stands for it


def test_flags_that_would_be_silently_ignored_are_refused(tmp_path, toy_meta):
    import train_RORem_draft

    with pytest.raises(UserError, match=r"^--lora_rank with --student_lora: the student LoRA keeps its own rank"):
        train_RORem_draft.parse_args(TRAIN + ["--student_lora", "s", "--reward", "gt=1", "--lora_rank", "8"])
    import train_RORem

    with pytest.raises(UserError, match=r"^--lora_rank without --use_lora: a full fine-tune has no LoRA"):
        train_RORem.parse_args(TRAIN + ["--lora_rank", "8"])
    with pytest.raises(UserError, match=r"^--latent_cache_dir without --cache_latents"):
        train_RORem.parse_args(TRAIN + ["--latent_cache_dir", str(tmp_path)])
    assert train_RORem.parse_args(TRAIN + ["--use_lora", "--lora_rank", "8"]).lora_rank == 8
