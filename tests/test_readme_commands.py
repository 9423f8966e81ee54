"""Every command in the README runs. Each ```bash block is split into commands, which run in README
order in a sandbox folder where the README's placeholder paths (path/to/RORem_unet, data/meta.json,
diffusers/stable-diffusion-xl-1.0-inpainting-0.1, ...) are the tiny fixtures, so later commands use
what earlier ones wrote (experiment/disc, pairs/meta.json, ...). The only changes, all below:
`accelerate launch <launcher flags>` runs the script in this process (one rank: the 8-GPU configs
run on two CPU ranks in test_multiprocess.py), the shell launchers run with NUM_GPUS=1 on the CPU,
sweeps launch with this Python, and TINY's arguments are appended (32 px, a step or two: the configs
are real-scale) or, before a sweep's `--`, shrink the sweep. `make demo` / `make test` are the demo
and CI themselves."""
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TRAIN = ["--resolution", "32", "--report_to", "none", "--mixed_precision", "no", "--dataloader_num_workers", "0",
          "--gradient_accumulation_steps", "1"]
_RL = [*_TRAIN, "--sample_steps", "3", "--sample_batch_size", "2", "--sample_batches_per_epoch", "1", "--train_batch_size", "2",
       "--num_train_epochs", "1", "--eval_samples", "2", "--num_validation_images", "2", "--max_sequence_length", "16"]
TINY = {
    "train_RORem.py": [*_TRAIN, "--max_train_steps", "1", "--train_batch_size", "2", "--validation_steps", "0"],
    "train_RORem_discriminator.py": [*_TRAIN, "--max_train_steps", "2", "--train_batch_size", "2", "--validation_steps", "0"],
    "train_RORem_dpo.py": [*_TRAIN, "--max_train_steps", "1", "--train_batch_size", "2", "--win_rate_samples", "2",
                           "--num_validation_images", "2", "--validation_steps", "1"],
    "train_RORem_lcm.py": [*_TRAIN, "--max_train_steps", "1", "--train_batch_size", "2", "--validation_steps", "0"],
    "train_RORem_lcm_rewarded.py": [*_TRAIN, "--max_train_steps", "1", "--train_batch_size", "2", "--validation_steps", "0"],
    "train_RORem_ddpo.py": _RL,
    "train_RORem_morl.py": [*_RL, "--population", "2", "--generations", "2", "--warmup_generations", "1"],
    "build_preference_pairs.py": ["--resolution", "32", "--inference_steps", "2", "--num_candidates", "2"],
    "inference_RORem.py": ["--inference_steps", "2", "--resolution", "32"],
    "inference_RORem_4S.py": ["--resolution", "32"],
    "inference_RORem_discriminator.py": ["--resolution", "32"],
    "evaluate_RORem.py": ["--resolution", "32", "--inference_steps", "2", "--batch_size", "4"],
    "bench_train_step.py": ["--latent_sizes", "16", "--steps", "1", "--batch_size", "2"],
    "bench_data.py": ["--resolutions", "64", "--samples", "6", "--batch_size", "2", "--batches", "2", "--workers", "0", "1",
                      "--formats", "jpg"],
    "bench_data_check.py": ["--entries", "400", "--pool", "4", "--sample", "40", "--resolution", "64"],
    "bench_lcm.py": ["--resolution", "32", "--batch", "2", "--many_steps", "3", "--images", "2", "--steps", "1", "2"],
    "convert_lora.py": [],
    "plan_memory.py": ["--resolutions", "64", "--unet_config", "diffusers/stable-diffusion-xl-1.0-inpainting-0.1/unet/config.json",
                       "--vae_config", "diffusers/stable-diffusion-xl-1.0-inpainting-0.1/vae/config.json",  # the tiny models'
                       "--flux_config", "black-forest-labs/FLUX.1-Fill-dev/transformer/config.json",
                       "--flux_vae_config", "black-forest-labs/FLUX.1-Fill-dev/vae/config.json"],
}
SWEEP_TINY = {"sweep_dpo.py": ["--betas", "0.1", "--variants", "lora"], "sweep_lcm.py": ["--thresholds", "--temperatures"]}
SWEEP_RUN_TINY = ["--validation_steps", "1", "--win_rate_samples", "2", "--num_validation_images", "2"]  # each run validated
EVAL_WEIGHTS = ("--inception_weights", "--lpips_backbone_weights", "--clip_weights")  # downloads: tested with stand-ins


OUTPUT_FLAGS = ("--output_dir", "--save_path", "--output_path", "--output_root", "--export_pairs")


def readme_python_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def readme_commands():
    """[(env, words)] of every command in the README's bash blocks (continuations joined, comments dropped)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            env = {}
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                k, v = words.pop(0).split("=", 1)
                env[k] = v
            if words:
                commands.append((env, words))
    return commands


COMMANDS = readme_commands()


def _script_and_args(words):
    """(script path as written, its arguments) of a python / accelerate launch / bash command."""
    if words[0] == "accelerate":
        i = next(i for i, w in enumerate(words) if w.endswith(".py"))
        return words[i], words[i + 1:]
    assert words[0] in ("python", "bash"), f"README command of an unknown kind: {' '.join(words)}"
    return words[1], words[2:]


def _id(cmd):
    env, words = cmd
    return words[1] if words[0] in ("make", "python", "bash") else _script_and_args(words)[0]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_model_dir, tiny_flux_dir, toy_meta, disc_dir):
    """A folder laid out like the README's examples, every input a tiny fixture."""
    box = tmp_path_factory.mktemp("readme")
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name in ("configs", "scripts", "model", "myutils", "pipelines"):
            os.symlink(os.path.join(ROOT, name), box / name)

    def link(target, *names):
        for name in names:
            (box / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, box / name)

    link(tiny_model_dir, "diffusers/stable-diffusion-xl-1.0-inpainting-0.1")
    link(tiny_flux_dir, "black-forest-labs/FLUX.1-Fill-dev")
    link(os.path.join(tiny_model_dir, "unet"), "path/to/RORem_unet")
    link(disc_dir, "path/to/disc")
    root = os.path.dirname(toy_meta)
    entries = [{k: os.path.join(root, v) for k, v in e.items()} for e in json.load(open(toy_meta))]

    def write(name, rows):
        (box / name).parent.mkdir(parents=True, exist_ok=True)
        (box / name).write_text(json.dumps(rows))

    for name in ("data/meta.json", "inputs/meta.json", "test/meta.json", "data/heldout.json"):
        write(name, entries)
    scored = [{**e, "score": 1} for e in entries] + [{**e, "GT": e["source"], "score": 0} for e in entries]
    for name in ("scored/meta.json", "annotations/meta.json"):
        write(name, scored)
    (box / "path/to/their_results").mkdir()
    for i, e in enumerate(entries):  # another method's results, by input index
        shutil.copy(e["GT"], box / "path/to/their_results" / f"{i:05d}.png")
    write("heldout_pairs/meta.json", [{"source": e["source"], "mask": e["mask"], "preferred": e["GT"], "rejected": e["source"]}
                                      for e in entries])
    e = entries[0]
    for name, key in (("photo.jpg", "source"), ("source.png", "source"), ("input.png", "source"), ("mask.png", "mask"),
                      ("result.png", "GT")):
        shutil.copy(e[key], box / name)
    for folder, key in (("photos", "source"), ("masks", "mask")):
        (box / folder).mkdir()
        for i, e in enumerate(entries[:2]):
            shutil.copy(e[key], box / folder / f"{i}.png")
    return box


def _run_in_process(script, argv, box, monkeypatch, run_script):
    path = os.path.join(ROOT, script)
    if "/" in script:  # scripts/, bench/
        spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(script[:-3])
    monkeypatch.chdir(box)
    return run_script(module, argv)


@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"{i:02d}-{_id(c)}" for i, c in enumerate(COMMANDS)])
def test_readme_command_runs(cmd, sandbox, monkeypatch, run_script):
    env, words = cmd
    if words[0] == "make":
        assert words[1:] in (["demo"], ["test"])  # CI runs `make test`; `make demo` is the demo
        return
    script, args = _script_and_args(words)
    name = os.path.basename(script)
    if name in SWEEP_TINY:  # shrink the sweep, launch with this Python, keep the runs' own arguments
        i = args.index("--launch")
        args[i + 1] = sys.executable
        cut = args.index("--")
        args = args[:cut] + SWEEP_TINY[name] + args[cut:] + TINY["train_RORem_dpo.py" if "dpo" in name else "train_RORem_lcm.py"]
        args += SWEEP_RUN_TINY
    elif words[0] == "bash" and name == "gpu_check.sh":  # its dry run (no GPU here) is tests/test_gpu_check.py
        pytest.skip("run (in its --dry mode) by tests/test_gpu_check.py")
    elif words[0] == "bash":
        trainer = {"run_train_RORem.sh": "train_RORem.py", "run_train_dpo.sh": "train_RORem_dpo.py",
                   "run_train_lcm_rewarded.sh": "train_RORem_lcm_rewarded.py"}[name]
        run_env = dict(os.environ, **env, NUM_GPUS="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1",
                       PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
        res = subprocess.run(["bash", str(sandbox / script), *args, *TINY[trainer]], cwd=sandbox, env=run_env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{' '.join(words)}\n{res.stderr[-3000:]}"
        out = sandbox / [a for a in args if not a.startswith("-")][-1 if "--" not in " ".join(args) else 2]
        assert os.listdir(out), f"{' '.join(words)}: wrote nothing to {out}"
        return
    else:
        args = [a for i, a in enumerate(args) if a not in EVAL_WEIGHTS and (i == 0 or args[i - 1] not in EVAL_WEIGHTS)]
        args = args + TINY[name]
    if "--pair_labels" in args:  # README step 2, a person's part: label the exported pairs (here by their reward)
        path = sandbox / args[args.index("--pair_labels") + 1]
        doc = json.loads(path.read_text())
        for p in doc["pairs"]:
            p["label"] = p["label"] or ("a" if p["reward_a"] >= p["reward_b"] else "b")
        path.write_text(json.dumps(doc))
    _run_in_process(script, args, sandbox, monkeypatch, run_script)
    for i, a in enumerate(args[:-1]):
        if a in OUTPUT_FLAGS and not (a == "--output_dir" and "--export_pairs" in args):  # what the command was for was written
            out = sandbox / args[i + 1]
            assert out.is_file() or (out.is_dir() and os.listdir(out)), f"{' '.join(words)}: wrote nothing to {args[i + 1]}"


def test_readme_python_runs_in_the_sandbox(sandbox, monkeypatch):
    """The README's Python (loading results with stock diffusers), after the commands above wrote them."""
    blocks = readme_python_blocks()
    assert blocks
    monkeypatch.chdir(sandbox)
    for code in blocks:
        namespace = {}
        exec(code, namespace)
        assert namespace["pipe"].unet.active_adapters()  # the LoRA loaded onto the fine-tuned UNet
