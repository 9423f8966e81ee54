"""train_RORem.py end to end on the tiny model: weights change, outputs load in stock diffusers,
resume continues exactly, LoRA output loads with load_lora_weights, the latent cache is reused."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_RORem
from myutils.errors import UserError


def _args(model, meta, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--meta_path", meta, "--output_dir", out,
            "--resolution", "32", "--train_batch_size", "2", "--report_to", "none", "--validation_steps", "0",
            "--learning_rate", "1e-3", "--checkpointing_steps", "100", *extra]


def _unet_state(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder).state_dict()


def _inpaint(pipe, seed=0):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    out = pipe(prompt="", image=img, mask_image=mask, height=32, width=32, num_inference_steps=3, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    return out


def test_full_finetune_changes_weights_and_loads_in_stock_pipeline(tmp_path, tiny_model_dir, toy_meta, run_script):
    from diffusers import AutoPipelineForInpainting, UNet2DConditionModel

    out = str(tmp_path / "run")
    run_script(train_RORem, _args(tiny_model_dir, toy_meta, out, "--max_train_steps", "3", "--validation_steps", "3",
                                  "--num_validation_images", "2", "--validation_inference_steps", "2", "--use_ema",
                                  "--ema_decay", "0.5", "--report_to", "tensorboard"))
    before = _unet_state(os.path.join(tiny_model_dir, "unet"))
    after = _unet_state(os.path.join(out, "unet"))
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-4
    grid = Image.open(os.path.join(out, "validation", "step-000003.png"))
    assert grid.size == (2 * 128, 4 * 128)  # columns = samples; rows = source, mask, result, GT (32 px shown 4x)
    assert any(f.startswith("events.out.tfevents") for _, _, fs in os.walk(os.path.join(out, "logs")) for f in fs)

    pipe = AutoPipelineForInpainting.from_pretrained(tiny_model_dir, unet=UNet2DConditionModel.from_pretrained(out, subfolder="unet"))
    result = _inpaint(pipe)
    assert result.shape == (32, 32, 3) and np.isfinite(result).all()


def test_accumulation_equals_a_larger_batch_and_the_final_save_is_the_ema(tmp_path, tiny_model_dir, toy_meta, run_script, monkeypatch):
    """2 micro-batches of 2 accumulated equal one batch of 4 (to 1e-6); the lr of each update follows
    the warmup + linear decay by hand; with --use_ema the saved UNet is the EMA of the weights after each
    update, with diffusers' decay min(ema_decay, (1 + s) / (10 + s)), s counting from 0 at the first update."""
    from diffusers.training_utils import EMAModel
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tight = ["--learning_rate", "1e-2", "--adam_epsilon", "1.0", "--adam_weight_decay", "0", "--max_train_steps", "4",
             "--lr_scheduler", "linear", "--lr_warmup_steps", "2", "--report_to", "tensorboard", "--logging_steps", "1"]
    trajectory = []
    real_step = EMAModel.step

    def record(self, parameters):
        parameters = list(parameters)
        trajectory.append([p.detach().clone() for p in parameters])
        return real_step(self, parameters)

    monkeypatch.setattr(EMAModel, "step", record)
    accumulated, large = str(tmp_path / "acc"), str(tmp_path / "large")
    run_script(train_RORem, _args(tiny_model_dir, toy_meta, accumulated, *tight, "--gradient_accumulation_steps", "2", "--use_ema",
                                  "--ema_decay", "0.5"))
    run_script(train_RORem, _args(tiny_model_dir, toy_meta, large, *tight, "--train_batch_size", "4", "--use_ema", "--ema_decay", "0.5"))
    assert len(trajectory) == 8  # one EMA update per optimizer step, 4 per run

    def folded(weights):
        ema = [w.clone() for w in weights[0]]
        for s, online in enumerate(weights):
            d = min(0.5, (1 + s) / (10 + s)) if s else 0.0
            ema = [d * e + (1 - d) * w for e, w in zip(ema, online)]
        return ema

    a, b = _unet_state(os.path.join(accumulated, "unet")), _unet_state(os.path.join(large, "unet"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    names = [n for n, p in train_RORem_unet_params(tiny_model_dir)]
    want = dict(zip(names, folded(trajectory[:4])))
    assert max((a[k] - want[k]).abs().max().item() for k in names) <= 1e-6  # the EMA, not the last online weights
    assert max((a[k] - trajectory[3][i]).abs().max().item() for i, k in enumerate(names)) > 1e-5
    logs = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(accumulated, "logs")) for f in fs if f.startswith("events")]
    acc = EventAccumulator(logs[0])
    acc.Reload()
    # the lr update k used: transformers' linear schedule at k - 1: warmup (k - 1) / 2, then (4 - (k - 1)) / (4 - 2)
    want = [1e-2 * ((k - 1) / 2 if k - 1 < 2 else (4 - (k - 1)) / 2) for k in range(1, 5)]
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx(want) == [0, 0.005, 0.01, 0.005]


def train_RORem_unet_params(model_dir):
    from diffusers import UNet2DConditionModel

    return list(UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").named_parameters())


class _Killed(Exception):
    pass


def test_resume_continues_exactly(tmp_path, tiny_model_dir, toy_meta, run_script, monkeypatch):
    """4 steps straight == killed right after checkpoint-3, resumed from latest for the rest
    (random flips, gradient accumulation, a warmup + linear decay schedule and the EMA that must be restored).
    Step 3 with accumulation 2: the restored micro-batch counter must be step x accumulation, which a
    checkpoint at an even step would not show.
    The straight run loads in the training process, the split one with 2 persistent loader processes."""
    common = ["--random_flip", "--gradient_accumulation_steps", "2", "--lr_scheduler", "linear",
              "--lr_warmup_steps", "2", "--checkpointing_steps", "3", "--max_train_steps", "4", "--use_ema", "--ema_decay", "0.5"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_script(train_RORem, _args(tiny_model_dir, toy_meta, straight, "--dataloader_num_workers", "0") + common)
    common += ["--dataloader_num_workers", "2", "--dataloader_prefetch_factor", "2"]

    from training import checkpoint

    real_save = checkpoint.save_checkpoint

    def save_then_die(accelerator, args, step, extra=None):
        real_save(accelerator, args, step, extra)
        raise _Killed()

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        run_script(train_RORem, _args(tiny_model_dir, toy_meta, split) + common)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert os.path.isdir(os.path.join(split, "checkpoint-3", "unet")) and not os.path.isdir(os.path.join(split, "unet"))
    run_script(train_RORem, _args(tiny_model_dir, toy_meta, split, "--resume_from_checkpoint", "latest") + common)
    a, b = _unet_state(os.path.join(straight, "unet")), _unet_state(os.path.join(split, "unet"))
    start = _unet_state(os.path.join(tiny_model_dir, "unet"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4


def test_checkpoint_limit_and_bad_resume_path(tmp_path, tiny_model_dir, toy_meta, run_script):
    out = str(tmp_path / "run")
    run_script(train_RORem, _args(tiny_model_dir, toy_meta, out, "--max_train_steps", "3", "--checkpointing_steps", "1",
                                  "--checkpoints_total_limit", "2"))
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-3"]
    with pytest.raises(UserError, match="not a checkpoint folder"):
        run_script(train_RORem, _args(tiny_model_dir, toy_meta, out, "--max_train_steps", "3", "--resume_from_checkpoint", str(tmp_path)))


def test_lora_output_loads_with_load_lora_weights(tmp_path, tiny_model_dir, toy_meta, run_script):
    from diffusers import AutoPipelineForInpainting
    from safetensors.torch import load_file

    out = str(tmp_path / "lora")
    run_script(train_RORem, _args(tiny_model_dir, toy_meta, out, "--max_train_steps", "3", "--use_lora", "--lora_rank", "4",
                                  "--learning_rate", "1e-2", "--checkpointing_steps", "2", "--mixed_precision", "bf16",
                                  "--gradient_checkpointing"))
    path = os.path.join(out, "pytorch_lora_weights.safetensors")
    keys = list(load_file(path))
    assert keys and all(k.startswith("unet.") for k in keys) and any(".to_q.lora" in k for k in keys)
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "pytorch_lora_weights.safetensors"))
    assert not os.path.isdir(os.path.join(out, "unet"))
    pipe = AutoPipelineForInpainting.from_pretrained(tiny_model_dir)
    base = _inpaint(pipe)
    pipe.load_lora_weights(out)
    assert np.abs(_inpaint(pipe) - base).max() > 1e-4  # the trained adapter changes the result


def test_latent_cache_written_reused_and_refreshed(tmp_path, tiny_model_dir, toy_meta, run_script):
    from myutils.data import RemovalDataset, read_meta, to_device
    from myutils.latent_cache import CachedLatentDataset, LatentCache
    from myutils.sdxl_inpaint import batch_latent_params
    from diffusers import AutoencoderKL

    import shutil

    # a copy of the toy data: a file of it is changed below, and the session's toy data is every test's
    shutil.copytree(os.path.dirname(toy_meta), tmp_path / "toy")
    toy_meta = str(tmp_path / "toy" / os.path.basename(toy_meta))
    out = str(tmp_path / "cached")
    args = _args(tiny_model_dir, toy_meta, out, "--max_train_steps", "2", "--cache_latents", "--random_flip")
    run_script(train_RORem, args)
    cache_dir = os.path.join(out, "latent_cache")
    files = sorted(os.listdir(cache_dir))
    assert len(files) == 12
    stamps = {f: os.stat(os.path.join(cache_dir, f)).st_mtime_ns for f in files}
    run_script(train_RORem, args)  # second run: nothing re-encoded
    assert {f: os.stat(os.path.join(cache_dir, f)).st_mtime_ns for f in os.listdir(cache_dir)} == stamps

    entries = read_meta(toy_meta, "triplet")
    gt = entries[0].paths["GT"]
    Image.open(gt).transpose(Image.FLIP_TOP_BOTTOM).save(gt)  # a changed file gets a new key
    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae")
    ds = RemovalDataset(entries, "triplet", 32, random_flip=True)
    cache = LatentCache(ds, ("GT", "masked"), cache_dir, vae)
    assert not os.path.exists(cache.path(0)) and os.path.exists(cache.path(1))

    class _Acc:
        process_index, num_processes, is_local_main_process = 0, 1, True

        def wait_for_everyone(self):
            pass

    cache.build(_Acc())
    cached = CachedLatentDataset(cache)
    for epoch in range(4):  # cached posteriors equal live encoding, flips included
        live = ds[(epoch, 0)]
        batch = {k: v[None] for k, v in live.items() if torch.is_tensor(v) and v.dim() == 3}
        ref = batch_latent_params(vae, batch, ["GT", "masked"])
        sent = cached[(epoch, 0)]  # travels as stored (fp16, the mask uint8), fp32 on the device
        assert sent["params:GT"].dtype == torch.float16 and sent["mask_latent"].dtype == torch.uint8
        item = to_device(sent, "cpu")
        for key in ("params:GT", "params:masked", "mask_latent"):  # live encoding, rounded to the fp16 the cache stores
            assert torch.allclose(item[key], ref[key][0].half().float(), rtol=0, atol=1e-6), key
        assert torch.equal(item["crop_top_left"], live["crop_top_left"])
    stored = load_file(cache.path(0))
    assert stored["params:GT"].dtype == torch.float16 and stored["mask_latent:flip"].dtype == torch.uint8

    # invalidation: the same VAE loaded again reuses every file; another VAE or resolution reuses none
    same = LatentCache(ds, ("GT", "masked"), cache_dir, AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae"))
    assert same.paths == cache.paths
    tuned = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae")
    with torch.no_grad():
        tuned.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3  # a fine-tuned VAE of the same config
    rescaled = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae")
    rescaled.register_to_config(scaling_factor=0.5)
    larger = RemovalDataset(entries, "triplet", 64, random_flip=True)
    for other in (LatentCache(ds, ("GT", "masked"), cache_dir, tuned), LatentCache(ds, ("GT", "masked"), cache_dir, rescaled),
                  LatentCache(larger, ("GT", "masked"), cache_dir, vae)):
        assert not set(other.paths) & set(cache.paths)
        assert not any(os.path.exists(p) for p in other.paths)


def test_config_file_sets_defaults_and_cli_overrides(tmp_path, tiny_model_dir, toy_meta):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"meta_path: [{toy_meta}]\noutput_dir: {tmp_path / 'o'}\nlearning_rate: 0.123\nlora_rank: 7\n")
    args = train_RORem.parse_args(["--config", str(cfg), "--lora_rank", "3", "--use_lora"])
    assert args.learning_rate == 0.123 and args.lora_rank == 3 and args.meta_path == [toy_meta]
    cfg.write_text("learning_rat: 1\n")
    with pytest.raises(UserError, match=r"c.yaml: unknown option 'learning_rat'"):
        train_RORem.parse_args(["--config", str(cfg)])
    with pytest.raises(UserError, match="--meta_path is required"):
        train_RORem.parse_args(["--output_dir", "x"])


def test_wandb_offline_logs_under_output_dir(tmp_path, tiny_model_dir, toy_meta, run_script, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = str(tmp_path / "wb")
    run_script(train_RORem, _args(tiny_model_dir, toy_meta, out, "--max_train_steps", "2", "--validation_steps", "2",
                                  "--num_validation_images", "1", "--validation_inference_steps", "2", "--report_to", "wandb"))
    runs = [d for d in os.listdir(os.path.join(out, "wandb")) if d.startswith("offline-run-")]
    assert len(runs) == 1
    files = [f for _, _, fs in os.walk(os.path.join(out, "wandb", runs[0])) for f in fs]
    assert any(f.endswith(".wandb") for f in files) and any(f.endswith(".png") for f in files)  # history + grid


def test_missing_model_folder_is_a_clear_error(tmp_path, toy_meta, run_script):
    with pytest.raises(UserError, match="folder not found: ./no/such/model"):
        run_script(train_RORem, _args("./no/such/model", toy_meta, str(tmp_path / "o"), "--max_train_steps", "1"))


CONFIG_SCRIPTS = {"train_RORem.yaml": "train_RORem", "toy_RORem.yaml": "train_RORem",
                  "train_RORem_discriminator.yaml": "train_RORem_discriminator", "toy_RORem_discriminator.yaml": "train_RORem_discriminator",
                  "dpo_config.yaml": "train_RORem_dpo", "toy_dpo.yaml": "train_RORem_dpo",
                  "kto_config.yaml": "train_RORem_kto", "toy_kto.yaml": "train_RORem_kto",
                  "lcm_config.yaml": "train_RORem_lcm", "toy_lcm.yaml": "train_RORem_lcm", "lcm_rewarded_config.yaml": "train_RORem_lcm_rewarded",
                  "ddpo_config.yaml": "train_RORem_ddpo", "toy_ddpo.yaml": "train_RORem_ddpo", "flow_grpo_config.yaml": "train_RORem_ddpo",
                  "toy_flow_grpo.yaml": "train_RORem_ddpo", "morl_config.yaml": "train_RORem_morl", "toy_morl.yaml": "train_RORem_morl",
                  "draft_config.yaml": "train_RORem_draft", "toy_draft.yaml": "train_RORem_draft",
                  "draft_lcm_config.yaml": "train_RORem_draft", "toy_draft_lcm.yaml": "train_RORem_draft"}


def test_every_training_config_is_mapped():
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    training = {n for n in os.listdir(folder) if n.endswith(".yaml") and not n.startswith(("accelerate", "deepspeed"))}
    assert training == set(CONFIG_SCRIPTS)


@pytest.mark.parametrize("name", sorted(CONFIG_SCRIPTS))
def test_shipped_config_sets_each_default_and_the_command_line_wins(name):
    """Every key of a shipped config becomes that argument's value (through the argument's own type);
    a flag on the command line overrides the file."""
    import importlib

    import yaml

    cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", name)
    script = importlib.import_module(CONFIG_SCRIPTS[name])
    if name == "lcm_rewarded_config.yaml":
        script = importlib.import_module("train_RORem_lcm")
    required = {"train_RORem_dpo": ["--preference_data", "p.json", "--output_dir", "o"],
                "train_RORem_kto": ["--meta_path", "m.json", "--output_dir", "o"]}.get(
        CONFIG_SCRIPTS[name], ["--meta_path", "m.json", "--output_dir", "o", "--discriminator_path", "d"])
    if CONFIG_SCRIPTS[name] in ("train_RORem", "train_RORem_discriminator", "train_RORem_lcm"):
        required = required[:4]

    def parse(extra=()):
        kw = {"rewarded": True} if name == "lcm_rewarded_config.yaml" else {}
        return script.parse_args(["--config", cfg, *required, *extra], **kw)

    values = yaml.safe_load(open(cfg))
    args = parse()
    for key, value in values.items():
        got = getattr(args, key)
        if isinstance(got, float):
            assert got == pytest.approx(float(value)), key
        else:
            assert got == value, key
    assert parse(["--seed", "12345"]).seed == 12345 != values.get("seed")


def test_gpu_only_options_fail_clearly_on_this_machine(toy_meta, tmp_path):
    import importlib.util

    from training.config import check_args

    base = ["--meta_path", toy_meta, "--output_dir", str(tmp_path)]
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(UserError, match="--use_8bit_adam needs bitsandbytes"):
            check_args(train_RORem.parse_args(base + ["--use_8bit_adam"]))
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(UserError, match="needs xformers"):
            check_args(train_RORem.parse_args(base + ["--enable_xformers_memory_efficient_attention"]))
    with pytest.raises(SystemExit):  # argparse's "argument --resolution: must be a multiple of 8, got 500"
        train_RORem.parse_args(base + ["--resolution", "500"])
    with pytest.raises(UserError, match="--cache_latents needs central crops"):
        check_args(train_RORem.parse_args(base + ["--cache_latents", "--random_crop"]))
    with pytest.raises(UserError, match="runs no denoising step"):
        check_args(train_RORem.parse_args(base + ["--validation_inference_steps", "1"]))
    with pytest.raises(UserError, match="--use_ema applies to full fine-tuning"):
        train_RORem.parse_args(base + ["--use_ema", "--use_lora"])
