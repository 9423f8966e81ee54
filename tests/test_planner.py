"""The memory/compute planner: its parameter, gradient and optimizer-state bytes equal what a real
training setup on the tiny model holds, exactly (full fine-tune and LoRA); meta-device FLOPs and
saved-activation bytes equal a real run's; the script prints a table for every training script."""
import json
import os

import pytest
import torch

from myutils import planner as pl


def _tiny_config(tiny_model_dir, tmp_path):
    cfg = json.load(open(os.path.join(tiny_model_dir, "unet", "config.json")))
    path = tmp_path / "unet.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _optimizer_bytes(opt):
    return sum(v.numel() * v.element_size() for state in opt.state.values() for v in state.values() if torch.is_tensor(v))


def _step(unet):
    from myutils.planner import unet_inputs

    args, kwargs = unet_inputs(unet, 2, 32, "cpu")
    unet(*args, **kwargs).sample.float().mean().backward()


def test_full_fine_tune_bytes_are_exact(tiny_model_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    params = list(unet.parameters())
    n, tensors = pl.count(pl.meta_unet(_tiny_config(tiny_model_dir, tmp_path)).parameters())
    assert (n, tensors) == pl.count(params)  # the meta model has exactly the real one's parameters
    opt = torch.optim.AdamW(params, lr=1e-4)
    _step(unet)
    opt.step()
    want = pl.training_state_bytes(n, tensors, 0, "fp16", "full")
    assert want == {"weights": _bytes(params), "gradients": _bytes(p.grad for p in params), "optimizer": _optimizer_bytes(opt)}


def test_lora_bytes_are_exact(tiny_model_dir, tmp_path):
    from diffusers import UNet2DConditionModel
    from types import SimpleNamespace

    from myutils import train_util as tu

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    lora = tu.add_lora(unet, SimpleNamespace(lora_rank=4, lora_alpha=None, lora_target_modules=tu.LORA_TARGETS), torch.float16)
    meta = pl.meta_unet(_tiny_config(tiny_model_dir, tmp_path))
    n_lora, n_tensors = pl.count(pl.add_meta_lora(meta, 4))
    assert (n_lora, n_tensors) == pl.count(lora)
    frozen = sum(p.numel() for p in unet.parameters()) - n_lora
    opt = torch.optim.AdamW(lora, lr=1e-4)
    for p in lora:
        p.grad = torch.zeros_like(p)  # (an fp16 CPU forward is not the point here: grads are fp32 like the weights)
    opt.step()
    want = pl.training_state_bytes(n_lora, n_tensors, frozen, "fp16", "lora")
    assert want == {"weights": _bytes(unet.parameters()), "gradients": _bytes(p.grad for p in lora), "optimizer": _optimizer_bytes(opt)}


def test_zero2_shards_gradients_and_optimizer_states():
    one = pl.training_state_bytes(1000, 10, 0, "bf16", "full", zero2=True, num_gpus=1)
    eight = pl.training_state_bytes(1000, 10, 0, "bf16", "full", zero2=True, num_gpus=8)
    assert one == {"weights": 2000, "gradients": 2000, "optimizer": 12040}
    assert eight == {"weights": 2000, "gradients": 250, "optimizer": 12040 / 8}


def test_meta_measurement_equals_a_real_run(tiny_model_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from diffusers.models.attention_processor import AttnProcessor

    real = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    meta = pl.meta_unet(_tiny_config(tiny_model_dir, tmp_path))
    for m in (real, meta):  # the same attention kernel on both (CPU and meta pick different SDPA backends)
        m.set_attn_processor(AttnProcessor())
    for ckpt in (False, True):
        a, b = pl.measure_unet(real, 64, 2, True, ckpt), pl.measure_unet(meta, 64, 2, True, ckpt)
        assert a == b and a["saved_bytes"] > 0 and a["step_flops"] > a["forward_flops"] > 0
    no_ckpt, ckpt = pl.measure_unet(meta, 64, 1, True, False), pl.measure_unet(meta, 64, 1, True, True)
    assert ckpt["saved_bytes"] < no_ckpt["saved_bytes"] and ckpt["step_flops"] > no_ckpt["step_flops"]  # recompute costs FLOPs


def test_plan_script_prints_every_training_script(tiny_model_dir, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_memory", os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                                                             "scripts", "plan_memory.py"))
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    vae = json.load(open(os.path.join(tiny_model_dir, "vae", "config.json")))
    (tmp_path / "vae.json").write_text(json.dumps(vae))
    rows, counts = plan.main(["--unet_config", _tiny_config(tiny_model_dir, tmp_path), "--vae_config", str(tmp_path / "vae.json"),
                              "--resolutions", "64", "--output", str(tmp_path / "plan.md")])
    assert {r["script"] for r in rows} == set(plan.SCRIPTS)
    assert all(r["total"] > 0 and r["tflop"] > 0 for r in rows) and all(r["fits"] for r in rows)
    assert "| train_RORem_dpo.py | 64 | LoRA" in open(tmp_path / "plan.md").read()
    with pytest.raises(Exception, match="multiple of 64"):
        plan.main(["--resolutions", "100"])
