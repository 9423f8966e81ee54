"""Every command in the README runs. Each ```bash block is split into commands, each a test, which run
in one sandbox folder where the README's placeholder paths (path/to/RORem_unet, data/meta.json,
diffusers/stable-diffusion-xl-1.0-inpainting-0.1, ...) are the tiny fixtures. A command that reads what
an earlier one wrote (experiment/disc, pairs/meta.json, ...) first runs the commands that wrote it
(DEPENDS, worked out from the README's own paths), each at most once per session, so any one test runs
alone, under -k, in any order and on any xdist worker. The only changes, all below: `accelerate launch
<launcher flags>` runs the script in this process (one rank: the 8-GPU configs run on two CPU ranks in
test_multiprocess.py), the shell launchers run with NUM_GPUS=1 on the CPU, sweeps launch with this
Python, and TINY's arguments are appended (32 px, a step or two: the configs are real-scale; two where a
config warms the lr up, since the first update of a warm-up runs at lr 0) or, before a sweep's `--`,
shrink the sweep. Each command is checked, as it runs, for what the README says it produces
(check_products: trained weights that stock diffusers loads and that change the UNet, results the size
of their inputs, scores and pairs consistent with their inputs, tables that match their runs). `make
test` is CI itself and `make demo` runs scripts/demo.py: both are run here (the demo at toy scale)."""
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

pytestmark = pytest.mark.xdist_group("readme")  # one sandbox: these tests share a worker (make test: --dist loadfile)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TRAIN = ["--resolution", "32", "--report_to", "none", "--mixed_precision", "no", "--dataloader_num_workers", "0",
          "--gradient_accumulation_steps", "1"]
_RL = [*_TRAIN, "--sample_steps", "3", "--sample_batch_size", "2", "--sample_batches_per_epoch", "1", "--train_batch_size", "2",
       "--num_train_epochs", "1", "--eval_samples", "2", "--num_validation_images", "2", "--max_sequence_length", "16"]
TINY = {
    "train_RORem.py": [*_TRAIN, "--max_train_steps", "1", "--train_batch_size", "2", "--validation_steps", "0"],
    "train_RORem_discriminator.py": [*_TRAIN, "--max_train_steps", "2", "--train_batch_size", "2", "--validation_steps", "0"],
    "train_RORem_dpo.py": [*_TRAIN, "--max_train_steps", "2", "--train_batch_size", "2", "--win_rate_samples", "2",
                           "--num_validation_images", "2", "--validation_steps", "1"],
    "train_RORem_kto.py": [*_TRAIN, "--max_train_steps", "2", "--train_batch_size", "2", "--win_rate_samples", "2",
                           "--num_validation_images", "2", "--validation_steps", "1"],
    "train_RORem_draft.py": [*_TRAIN, "--max_train_steps", "2", "--train_batch_size", "2", "--sample_steps", "3", "--validation_steps", "2",
                             "--eval_samples", "2", "--num_validation_images", "2"],
    "train_RORem_lcm.py": [*_TRAIN, "--max_train_steps", "2", "--train_batch_size", "2", "--validation_steps", "0"],
    "train_RORem_lcm_rewarded.py": [*_TRAIN, "--max_train_steps", "2", "--train_batch_size", "2", "--validation_steps", "0"],
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
    "annotate_RORem.py": [],
    "data_round.py": ["--resolution", "32", "--inference_steps", "2"],
    "app_RORem.py": ["--resolution", "32", "--inference_steps", "2"],
    "plan_memory.py": ["--resolutions", "64", "--unet_config", "diffusers/stable-diffusion-xl-1.0-inpainting-0.1/unet/config.json",
                       "--vae_config", "diffusers/stable-diffusion-xl-1.0-inpainting-0.1/vae/config.json",  # the tiny models'
                       "--flux_config", "black-forest-labs/FLUX.1-Fill-dev/transformer/config.json",
                       "--flux_vae_config", "black-forest-labs/FLUX.1-Fill-dev/vae/config.json"],
}
SWEEP_TINY = {"sweep_dpo.py": ["--betas", "0.1", "--variants", "lora"], "sweep_lcm.py": ["--thresholds", "--temperatures"]}
SWEEP_RUN_TINY = ["--validation_steps", "1", "--win_rate_samples", "2", "--num_validation_images", "2"]  # each run validated
EVAL_WEIGHTS = ("--inception_weights", "--lpips_backbone_weights", "--clip_weights")  # downloads: tested with stand-ins


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


# What a command writes: the paths after these flags, its leading positional output, and where the
# annotation app keeps its labels (beside the data it is given).
WRITE_FLAGS = {"--output_dir", "--save_path", "--output_root", "--round_dir", "--export_pairs", "--output_path"}
SCRIPT_WRITE_FLAGS = {"inference_RORem_discriminator.py": {"--scored_meta_path"}, "annotate_RORem.py": {"--meta_path", "--pairs_path"}}
POSITIONAL_OUTPUT = {"run_train_RORem.sh": 1, "run_train_dpo.sh": 2, "run_train_kto.sh": 2, "run_train_lcm_rewarded.sh": 3,
                     "run_train_draft.sh": 3, "convert_lora.py": 1}


def _is_path(word):
    return bool(re.fullmatch(r"[\w./-]+", word)) and not word.startswith("-") and ("/" in word or bool(re.search(r"\.(png|jpg|json|csv)$", word)))


def _related(p, q):
    return p == q or p.startswith(q + "/") or q.startswith(p + "/")


def _written_paths(words):
    script, args = _script_and_args(words)
    name = os.path.basename(script)
    flags = WRITE_FLAGS | SCRIPT_WRITE_FLAGS.get(name, set())
    out = [args[i + 1] for i, a in enumerate(args[:-1]) if a in flags]
    if name in POSITIONAL_OUTPUT:  # among the arguments before the first flag
        out.append(args[POSITIONAL_OUTPUT[name]])
    return [os.path.normpath(p) for p in out]


def _dependencies(commands, python_blocks):
    """For each command (and, last, the README's Python), the earlier commands it needs: for every path it
    names, the last command before it that wrote that path, a folder above it or a path inside it."""
    writers, depends = [], []

    def needs(paths, before):
        latest = {}
        for j, q in writers:
            if j < before and any(_related(p, q) for p in paths):
                latest[q] = max(latest.get(q, j), j)
        return set(latest.values())

    for i, (env, words) in enumerate(commands):
        if words[0] == "make":
            depends.append(set())
            continue
        named = [piece for w in words for piece in re.split(r"[=:,]", w)]  # --system RORem+DPO=lora:experiment/RORem_DPO
        depends.append(needs([os.path.normpath(w) for w in named if _is_path(w)], i))
        writers += [(i, p) for p in _written_paths(words)]
    quoted = [os.path.normpath(s) for code in python_blocks for s in re.findall(r"\"([^\"]+)\"", code) if _is_path(s)]
    depends.append(needs(quoted, len(commands)))
    return depends


DEPENDS = _dependencies(COMMANDS, readme_python_blocks())


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory, tiny_model_dir, tiny_flux_dir, toy_meta, disc_dir):
    """A folder laid out like the README's examples, every input a tiny fixture."""
    box = tmp_path_factory.mktemp("readme")
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name in ("configs", "scripts", "model", "myutils", "pipelines", "training", "toy_world"):
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
    for name, key in (("photo.jpg", "source"), ("source.png", "source"), ("input.png", "source"), ("mask.png", "mask")):
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


# ----------------------------------------------------------------------------- what each command produces

def _make(target, *overrides, tmp_path, dry=False):
    """`make <target>` in the repository, with this interpreter's environment as the one it installs (a
    stamp newer than requirements.txt: CI's own `make test` did the install from a fresh clone)."""
    stamp = tmp_path / "installed"
    stamp.touch()
    command = ["make", "--no-print-directory", "-C", ROOT, *(["-n"] if dry else []), target,
               f"BIN={os.path.dirname(sys.executable)}", f"STAMP={stamp}", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def check_make_target(target, tmp_path):
    """`make demo` runs the demo: here its first stages at toy scale (the data, the tiny models, two steps
    of the remover: the first of its warm-up runs at lr 0) into a folder of the test's. `make test` runs
    every test file here, in an order its seed draws (two seeds, two orders), on both cores."""
    if target == "demo":
        work = tmp_path / "demo"
        res = _make("demo", f"DEMO_DIR={work}", "DEMO_ARGS=--only data 'tiny models' remover --train_samples 32 "
                    "--heldout_samples 4 --vae_steps 1 --remover_steps 2", tmp_path=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        assert len(_json(work / "data/train/meta.json")) == 32 and len(_json(work / "data/heldout/meta.json")) == 4
        assert _json(work / "remover/final_metrics.json")["args"]["max_train_steps"] == 2
        start, trained = (_tensors(work / f"{m}/unet/diffusion_pytorch_model.safetensors") for m in ("models/toy_sdxl_inpaint", "remover"))
        assert max((trained[k] - start[k]).abs().max().item() for k in start) > 0  # the remover trained
        return
    res = _make("test", tmp_path=tmp_path, dry=True)
    assert res.returncode == 0, res.stderr
    (line,) = [ln for ln in res.stdout.splitlines() if " -m pytest " in ln]
    words = shlex.split(line)
    assert words[0] == os.path.join(os.path.dirname(sys.executable), "python")
    orders = []
    for seed in (1, 2):
        collected = subprocess.run([sys.executable, *words[1:], "--collect-only", "-n", "0", "-p", "no:cacheprovider",
                                    f"--randomly-seed={seed}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert collected.returncode == 0, collected.stdout[-3000:]
        orders.append([ln for ln in collected.stdout.splitlines() if "::" in ln])
    files = {ln.split("::")[0] for ln in orders[0]}
    assert files == {f"tests/{f}" for f in os.listdir(os.path.join(ROOT, "tests")) if re.fullmatch(r"test_.*\.py", f)}
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]  # the same tests, in another order
    assert words[words.index("-n") + 1] == "2"  # both cores
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "make test" in f.read()  # CI is this command


def _json(path):
    with open(path) as f:
        return json.load(f)


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _lora_trained(folder, rank=None):
    """A LoRA file whose up/B weights moved off zero; every down/A weight of the given rank."""
    w = _tensors(os.path.join(folder, "pytorch_lora_weights.safetensors"))
    ups = [v for k, v in w.items() if "lora_B" in k or "lora.up" in k]
    assert ups and max(v.abs().max().item() for v in ups) > 0, f"{folder}: the LoRA did not train"
    if rank is not None:
        assert {v.shape[0] for k, v in w.items() if "lora_A" in k or "lora.down" in k} == {rank}
    return w


def _lora_changes_the_unet(box, folder):
    """Stock diffusers loads the LoRA onto the pipeline and the UNet's output changes."""
    import torch
    from diffusers import StableDiffusionXLInpaintPipeline

    from myutils.planner import unet_inputs

    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(str(box / "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"))
    torch.manual_seed(0)
    args, kwargs = unet_inputs(pipe.unet, 1, 32, "cpu")
    with torch.no_grad():
        before = pipe.unet(*args, **kwargs).sample
        pipe.load_lora_weights(str(folder))
        after = pipe.unet(*args, **kwargs).sample
    assert (after - before).abs().max() > 0, f"{folder}: loading the LoRA changed nothing"


def _unet_trained(box, folder):
    from diffusers import UNet2DConditionModel

    start = UNet2DConditionModel.from_pretrained(str(box / "path/to/RORem_unet")).state_dict()
    trained = UNet2DConditionModel.from_pretrained(str(folder)).state_dict()
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 0, f"{folder}: the UNet did not change"


def _image(path):
    from PIL import Image

    return Image.open(path)


def _value(args, flag):
    return args[args.index(flag) + 1]


def check_products(name, args, box, result, out, monkeypatch=None, run_script=None):
    """What the README says each command produces, checked on what it wrote."""
    import numpy as np

    if name in ("train_RORem.py", "run_train_RORem.sh"):
        folder = box / (_value(args, "--output_dir") if "--output_dir" in args else args[-1])
        assert _json(folder / "final_metrics.json")["args"]["resolution"] == 32
        if "--use_lora" in args:  # the README: rank 64, loaded by stock diffusers onto the pipeline
            _lora_trained(folder, rank=int(_value(args, "--lora_rank")))
            _lora_changes_the_unet(box, folder)
        else:
            _unet_trained(box, folder / "unet")
    elif name in ("inference_RORem.py", "inference_RORem_4S.py") and _value(args, "--save_path").endswith(".png"):
        source = _image(box / _value(args, "--image_path"))
        result_image = _image(box / _value(args, "--save_path"))
        assert result_image.size == source.size and result_image.mode == "RGB"
        a, b = (np.asarray(im.convert("RGB"), np.float32) for im in (source, result_image))
        hole = np.asarray(_image(box / _value(args, "--mask_path")).convert("L")) > 127
        assert np.abs(a - b)[hole].max() > 0  # the masked region was repainted
    elif name == "inference_RORem.py":  # batch modes: one result per input and a scorable meta.json
        folder = box / _value(args, "--save_path")
        meta = _json(folder / "meta.json")
        if "--meta_path" in args:
            inputs = _json(box / _value(args, "--meta_path"))
        else:
            inputs = [{"source": str(box / _value(args, "--image_path") / f)} for f in sorted(os.listdir(box / _value(args, "--image_path")))]
        mine = {os.path.realpath(e["source"]): e for e in meta}
        assert all(os.path.realpath(e["source"] if os.path.isabs(e["source"]) else box / e["source"]) in mine for e in inputs)
        assert all(os.path.isfile(folder / e["GT"]) and {"source", "mask", "GT"} <= set(e) for e in meta)
        assert os.path.isfile(folder / "made_by.json")
    elif name == "train_RORem_discriminator.py":
        folder = box / _value(args, "--output_dir")
        assert {"cls_pred_branch.pt", "discriminator_config.json"} <= set(os.listdir(folder))
        _lora_trained(folder)
    elif name == "inference_RORem_discriminator.py" and "--edited_path" in args:
        import inference_RORem_discriminator

        (score,) = result
        assert f"score {score:.4f}" in out
        swapped = [a if a != _value(args, "--edited_path") else _value(args, "--image_path") for a in args]
        (unremoved,) = run_script(inference_RORem_discriminator, swapped)  # the object left in: another score
        assert unremoved != score
        # the same triples through the batch mode (its own loader and batching): the same scores
        meta = box / "one_triple" / "meta.json"
        meta.parent.mkdir(exist_ok=True)
        meta.write_text(json.dumps([{"source": str(box / _value(args, "--image_path")), "mask": str(box / _value(args, "--mask_path")),
                                     "GT": str(box / g)} for g in (_value(args, "--edited_path"), _value(args, "--image_path"))]))
        batch = [a for i, a in enumerate(args) if a not in ("--image_path", "--mask_path", "--edited_path")
                 and args[i - 1] not in ("--image_path", "--mask_path", "--edited_path")]
        assert run_script(inference_RORem_discriminator, [*batch, "--meta_path", meta, "--output_path", meta.parent / "s.json"]) == (
            pytest.approx([score, unremoved], abs=1e-5))
    elif name == "inference_RORem_discriminator.py":
        import csv

        rows = list(csv.DictReader(open(box / _value(args, "--output_path"))))
        meta = _json(box / _value(args, "--meta_path"))
        assert len(rows) == len(meta) == len(result) and [float(r["score"]) for r in rows] == pytest.approx(list(result), abs=1e-6)
        scored = _json(box / _value(args, "--scored_meta_path"))
        assert [e["discriminator_score"] for e in scored] == pytest.approx([float(r["score"]) for r in rows])
        assert [e["score"] for e in scored] == [int(e["discriminator_score"] >= 0.5) for e in scored]  # the verdict at --threshold 0.5
    elif name == "build_preference_pairs.py":
        folder = box / _value(args, "--output_dir")
        pairs, report = _json(folder / "meta.json"), _json(folder / "report.json")
        assert len(pairs) == report["natural"]["pairs"] + report.get("generated", {}).get("pairs", 0) > 0
        assert all(p["preferred_score"] > p["rejected_score"] for p in pairs)
        if "--meta_path" not in args:  # the sandbox's annotations: score 1 = the GT, score 0 = the source left as it was
            assert all(p["preferred"] != p["rejected"] and p["rejected"] == p["source"] for p in pairs)
        else:
            assert os.path.isfile(folder / "candidates.json")
    elif name == "run_train_dpo.sh":
        folder = box / args[2]
        metrics = _json(folder / "final_metrics.json")["metrics"]
        assert {"val_preference_accuracy", "val_win_rate", "val_win_rate_low", "val_win_rate_high"} <= set(metrics)
        _lora_trained(folder)
        _lora_changes_the_unet(box, folder)
        if "--safeguard_mu" in args:  # Diffusion-SDPO: the run used the safeguard
            assert _json(folder / "final_metrics.json")["args"]["safeguard_mu"] == float(_value(args, "--safeguard_mu"))
    elif name in ("train_RORem_kto.py", "run_train_kto.sh"):  # the README: a LoRA of the config's rank 8, validated as DPO is
        folder = box / (args[2] if name.endswith(".sh") else _value(args, "--output_dir"))
        metrics = _json(folder / "final_metrics.json")["metrics"]
        assert {"val_preference_accuracy", "val_masked_mse", "val_win_rate", "val_win_rate_low"} <= set(metrics)
        _lora_trained(folder, rank=8)
        _lora_changes_the_unet(box, folder)
    elif name == "train_RORem_draft.py":  # a LoRA of the config's rank 8; the GT metric beside the reward, for the start too
        folder = box / _value(args, "--output_dir")
        metrics = _json(folder / "final_metrics.json")["metrics"]
        assert {"val_reward", "val_reward_discriminator", "val_reward_preserve", "val_masked_mse", "val_start_masked_mse"} <= set(metrics)
        _lora_trained(folder, rank=8)
        _lora_changes_the_unet(box, folder)
    elif name == "run_train_draft.sh" and "experiment/RORem_LCM" in args:  # the student's own LoRA, trained on
        folder = box / args[3]
        metrics = _json(folder / "final_metrics.json")["metrics"]
        assert {"val_reward", "val_reward_discriminator", "val_masked_mse", "val_start_masked_mse"} <= set(metrics)
        student = _tensors(box / "experiment/RORem_LCM" / "pytorch_lora_weights.safetensors")
        trained = _tensors(folder / "pytorch_lora_weights.safetensors")
        assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in student.items()}
        assert max((trained[k] - student[k]).abs().max().item() for k in student) > 0
    elif name in ("sweep_dpo.py", "sweep_lcm.py"):
        root = box / _value(args, "--output_root")
        rows = _json(root / "sweep_results.json")
        assert rows == result and os.path.isfile(root / "sweep_results.md") and os.path.isfile(root / "sweep_results.csv")
        assert ("kto" in [r["run"] for r in rows]) == ("kto" in args)
        for row in rows[1:]:  # after the reference/teacher row, each run's own final validation
            m = _json(root / row["run"] / "final_metrics.json")["metrics"]
            assert row["win_rate"] == m["val_win_rate"]
        import csv

        with open(root / "sweep_results.csv") as f:  # the three tables are one table
            assert [r["run"] for r in csv.DictReader(f)] == [r["run"] for r in rows]
        table = (root / "sweep_results.md").read_text()
        assert all(f"| {r['run']} |" in table for r in rows)
        if name == "sweep_dpo.py":  # each DPO run was trained at the beta of its row, in the command's unit
            betas = args[len(args) - args[::-1].index("--betas"):]
            betas = betas[:next((i for i, b in enumerate(betas) if b.startswith("-")), len(betas))]
            unit = _value(args, "--beta_unit")
            dpo_rows = [r for r in rows if r["loss"] == "sigmoid"]
            assert dpo_rows
            for row in dpo_rows:
                trained = _json(root / row["run"] / "final_metrics.json")["args"]
                assert (trained["beta"], trained["beta_unit"]) == (float(betas[0]), unit) and row["beta"] == f"{float(betas[0]):g} ({unit})"
    elif name in ("train_RORem_lcm.py", "run_train_lcm_rewarded.sh"):
        folder = box / (_value(args, "--output_dir") if "--output_dir" in args else args[-1])
        _lora_trained(folder)
        _lora_changes_the_unet(box, folder)
        if "--reward_guidance" in args:  # RG-LCD: the run was guided, and its data not scored for weights it does not use
            assert _json(folder / "final_metrics.json")["args"]["reward_guidance"] == _value(args, "--reward_guidance")
            assert not os.path.exists(folder / "data_scores.json")
        if name == "run_train_lcm_rewarded.sh":
            assert len(_json(folder / "data_scores.json")) == len(_json(box / args[1]))  # each training GT scored once
    elif name == "convert_lora.py":
        before = _tensors(box / args[0] / "pytorch_lora_weights.safetensors")
        after = _tensors(box / args[1] / "pytorch_lora_weights.safetensors")
        assert len(after) == len(before) and not any("lora.up" in k or "lora.down" in k for k in after)
        assert sorted(v.sum().item() for v in after.values()) == pytest.approx(sorted(v.sum().item() for v in before.values()))
    elif name == "train_RORem_ddpo.py" and "--export_pairs" in args:
        doc = _json(box / _value(args, "--export_pairs") / "pairs.json")
        assert doc["pairs"] and all(p["label"] is None for p in doc["pairs"])
        assert all(os.path.isfile(box / _value(args, "--export_pairs") / f"pair-{p['pair']:05d}.png") for p in doc["pairs"])
    elif name == "train_RORem_ddpo.py":
        folder = box / _value(args, "--output_dir")
        metrics = _json(folder / "final_metrics.json")["metrics"]
        rewards = [r.split("=")[0] for r in _value(args, "--reward").split(",")] if "--reward" in args else []
        assert {f"eval_reward_{r}" for r in rewards} <= set(metrics) and "eval_kl_to_start" in metrics
        w = _lora_trained(folder)
        if "flow_grpo" in _value(args, "--config"):
            assert all(k.startswith("transformer.") for k in w)
        else:
            _lora_changes_the_unet(box, folder)
    elif name == "train_RORem_morl.py":
        folder = box / _value(args, "--output_dir")
        summary = _json(folder / "policies.json")
        population = int([a for i, a in enumerate(args) if i and args[i - 1] == "--population"][-1])
        assert [p["name"] for p in summary["policies"][:population]] == [f"policy_{k}" for k in range(population)]
        assert summary["objectives"] == _value(args, "--objectives").split(",") and os.path.isfile(folder / "front.png")
        assert len(summary["hypervolume_per_generation"]) == _json(folder / "final_metrics.json")["history"].__len__()
    elif name == "evaluate_RORem.py":
        folder = box / _value(args, "--output_dir")
        systems = [a.split("=")[0] for i, a in enumerate(args) if i and args[i - 1] == "--system"]
        rows = {r["system"]: r for r in _json(folder / "results.json")["systems"]}
        assert list(rows) == systems and all(r["masked_mse"] >= 0 for r in rows.values())
        assert rows["other"]["masked_mse"] == 0  # the sandbox's "their results" are the GT images themselves
        assert rows["RORem-4S"]["unet_calls_per_image"] == 4
        assert {w["a"] for w in _json(folder / "results.json")["win_rates"]} <= set(systems)
    elif name == "bench_train_step.py":
        assert re.search(r"\| 16x16 \| 32px \| \d+\.\d\d \|", out)  # the cached / uncached ratio row
    elif name == "bench_lcm.py":
        assert re.search(r"ratio \d+\.\dx", out) and "x plain" in out
    elif name == "bench_data.py":  # each row's ratios are its loader rate over the GPU step's intake, as the header says
        (row,) = [ln for ln in result if ln.startswith("| 64 | jpg")]
        cells = [c.strip() for c in row.strip("|").split("|")]
        zero, one, eats, ratio_one, ratio_rank = (float(cells[i]) for i in (2, 3, 4, 5, 6))
        assert "64 px jpg: 0 workers" in out and zero > 0 and eats > 0
        assert ratio_one == pytest.approx(one / eats, abs=0.006 + 0.05 * one / eats)  # printed rounded
        assert ratio_rank == pytest.approx(one * 8 / eats, abs=0.006 + 0.05 * one * 8 / eats)
    elif name == "bench_data_check.py":  # what it prints is what it measured: the ratio and the table's seconds
        entries = int(_value(args, "--entries"))
        assert f"2 threads {result['rate_2']:.0f} ({result['rate_2'] / result['rate_1']:.2f}x)" in out
        assert f"one thread (the old rank-0 check was 8 threads of one process) | {entries / result['rate_1']:.0f} |" in out
        assert f"| {result['first_node_s']:.0f} |" in out and f"| {result['fingerprint_s']:.1f} |" in out
    elif name == "plan_memory.py":  # its parameter counts are those of the models its configs build
        from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel

        rows, counts = result
        for key, cls, flag in (("unet", UNet2DConditionModel, "--unet_config"), ("vae", AutoencoderKL, "--vae_config"),
                               ("flux", FluxTransformer2DModel, "--flux_config")):
            model = cls.from_config(cls.load_config(str(box / os.path.dirname(_value(args, flag)))))
            assert counts[key] == sum(p.numel() for p in model.parameters()), key
        assert rows and all(r["total"] > r["weights"] and r["tflop"] > 0 for r in rows)
    elif name == "annotate_RORem.py" and "--report" in args:  # alice labelled every result (the command before)
        labelled = len(_json(box / _value(args, "--meta_path")))
        assert re.search(rf"^alice: {labelled} labels$", out, re.M) and "alice vs the discriminator" not in out  # no discriminator scores here
    elif name == "annotate_RORem.py":
        _annotate_everything(box, args, *result)
    elif name == "data_round.py" and "waiting" in result:  # the round stops for people: the annotation set is written
        rd = box / _value(args, "--round_dir")
        settings = _json(rd / "round.json")["settings"]
        scores = {int(i): s for f in os.listdir(rd / "scores") for i, s in _json(rd / "scores" / f).items()}
        accept, reject, fraction = settings["accept"], settings["reject"], settings["audit_fraction"]
        uncertain = sorted(i for i, s in scores.items() if reject <= s < accept)
        confident = [sum(s >= accept for s in scores.values()), sum(s < reject for s in scores.values())]
        audited = sum(max(1, round(fraction * n)) for n in confident if n)  # the README: every uncertain one and an audit sample
        chosen = _json(rd / "annotate" / "meta.json")
        assert len(scores) == len(_json(box / _value(args, "--inputs_meta")))  # every input's result scored
        assert result["waiting"] == len(chosen) == len(uncertain) + audited
        assert [e["round_index"] for e in chosen if e["why"] == "uncertain"] == uncertain
    elif name == "data_round.py":  # the same command after the annotation: the next training data and the report
        rd = box / _value(args, "--round_dir")
        assert len(_json(rd / "train" / "meta.json")) == result["train_entries"] == len(_json(box / "data/meta.json")) + result["kept"]
        assert result["annotators"] == {"alice": result["to_annotation"]} and (rd / "report.md").is_file()
    elif name == "app_RORem.py":
        from app_RORem import FOUR

        import inference_RORem_discriminator

        remover, _ = result
        image, mask = _image(box / "photo.jpg"), _image(box / "mask.png")
        removed, path, score = remover.remove(image, mask, FOUR, 0)
        assert removed.size == image.size and _image(path).size == image.size
        # the score shown is the one the discriminator's own command gives the saved result
        (want,) = run_script(inference_RORem_discriminator, [
            "--RORem_discriminator", _value(args, "--RORem_discriminator"), "--pretrained_model", "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
            "--image_path", "photo.jpg", "--mask_path", "mask.png", "--edited_path", path, "--resolution", _value(args, "--resolution")])
        assert score == pytest.approx(want, abs=1e-5)
    else:
        raise AssertionError(f"no check of what {name} produces")


def _annotate_everything(box, args, labels, app):
    """An annotator at work through the page's API: every item labelled (pairs by their recorded
    reward, results alternately good and bad); the file the README names then holds every label."""
    from fastapi.testclient import TestClient

    client, who = TestClient(app, base_url="http://127.0.0.1:7860"), _value(args, "--annotator")
    state = client.get("/api/state", params={"annotator": who}).json()
    while state["item"]:
        item = labels.items[state["item"]["key"]]
        label = (("a" if item["reward_a"] >= item["reward_b"] else "b") if labels.mode == "pairs"
                 else ("good", "bad")[state["item"]["index"] % 2])
        nxt = client.post("/api/label", json={"annotator": who, "index": state["item"]["index"], "label": label}).json()["next"]
        state = client.get("/api/state", params={"annotator": who, **({"index": nxt} if nxt is not None else {"after": 0})}).json()
    if labels.mode == "pairs":
        doc = _json(box / _value(args, "--pairs_path") / f"pairs-{who}.json")
        assert doc["pairs"] and all(p["label"] in ("a", "b") for p in doc["pairs"])
    else:
        scored = _json(os.path.join(labels.output_dir, who, "meta.json"))
        assert len(scored) == len(labels.keys) and [e["score"] for e in scored] == [1 - n % 2 for n in range(len(scored))]


@pytest.fixture(scope="session")
def readme_ran():
    """{command index: None once it ran and its checks held, else what went wrong}, for the session's sandbox."""
    return {}


def _ensure_ran(index, ran, run_one):
    """Run what command `index` needs (each at most once), then the command itself; fail with its error."""
    for d in sorted(DEPENDS[index]):
        _ensure_ran(d, ran, run_one)
    if index < len(COMMANDS) and index not in ran:
        try:
            run_one(COMMANDS[index])
            ran[index] = None
        except (Exception, SystemExit, pytest.fail.Exception) as e:
            ran[index] = f"{type(e).__name__}: {e}"
            raise
    failed = [d for d in sorted(DEPENDS[index]) if ran.get(d)] + ([index] if ran.get(index) else [])
    if failed:
        pytest.fail("; ".join(f"README command {d:02d} ({_id(COMMANDS[d])}) failed: {ran[d][:3000]}" for d in failed))


@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[f"{i:02d}-{_id(c)}" for i, c in enumerate(COMMANDS)])
def test_readme_command_runs(index, sandbox, readme_ran, monkeypatch, run_script, capsys, tmp_path):
    _ensure_ran(index, readme_ran, lambda cmd: _run_readme_command(cmd, sandbox, monkeypatch, run_script, capsys, tmp_path))


def _run_readme_command(cmd, sandbox, monkeypatch, run_script, capsys, tmp_path):
    env, words = cmd
    if words[0] == "make":
        check_make_target(words[1], tmp_path)
        return
    script, args = _script_and_args(words)
    name = os.path.basename(script)
    if name in SWEEP_TINY:  # shrink the sweep, launch with this Python, keep the runs' own arguments
        i = args.index("--launch")
        args[i + 1] = sys.executable
        cut = args.index("--")
        tiny = SWEEP_TINY[name] + (["kto"] if "kto" in args[:cut] else [])  # one DPO run, and KTO's when the command has it
        args = args[:cut] + tiny + args[cut:] + TINY["train_RORem_dpo.py" if "dpo" in name else "train_RORem_lcm.py"]
        args += SWEEP_RUN_TINY
    elif words[0] == "bash" and name == "gpu_check.sh":  # its dry run (no GPU here) is tests/test_gpu_check.py
        pytest.skip("run (in its --dry mode) by tests/test_gpu_check.py")
    elif words[0] == "bash":
        trainer = {"run_train_RORem.sh": "train_RORem.py", "run_train_dpo.sh": "train_RORem_dpo.py",
                   "run_train_kto.sh": "train_RORem_kto.py", "run_train_lcm_rewarded.sh": "train_RORem_lcm_rewarded.py",
                   "run_train_draft.sh": "train_RORem_draft.py"}[name]
        run_env = dict(os.environ, **env, NUM_GPUS="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1",
                       PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
        res = subprocess.run(["bash", str(sandbox / script), *args, *TINY[trainer]], cwd=sandbox, env=run_env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{' '.join(words)}\n{res.stderr[-3000:]}"
        check_products(name, [a for a in args if not a.startswith("-")], sandbox, None, res.stdout)
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
    served = {}  # the apps: built as the command says; the server is not started (a person would use it, here the check does)
    if name in ("annotate_RORem.py", "app_RORem.py"):
        import uvicorn

        monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    capsys.readouterr()
    result = _run_in_process(script, args, sandbox, monkeypatch, run_script)
    if served:
        assert served["host"] == "127.0.0.1"
        result = (result, served["app"])
    check_products(name, args, sandbox, result, capsys.readouterr().out, monkeypatch=monkeypatch, run_script=run_script)


def test_readme_python_runs_in_the_sandbox(sandbox, readme_ran, monkeypatch, run_script, capsys, tmp_path):
    """The README's Python (loading results with stock diffusers), after the commands that write them."""
    _ensure_ran(len(COMMANDS), readme_ran, lambda cmd: _run_readme_command(cmd, sandbox, monkeypatch, run_script, capsys, tmp_path))
    blocks = readme_python_blocks()
    assert blocks
    monkeypatch.chdir(sandbox)
    for code in blocks:
        namespace = {}
        exec(code, namespace)
        assert namespace["pipe"].unet.active_adapters()  # the LoRA loaded onto the fine-tuned UNet
