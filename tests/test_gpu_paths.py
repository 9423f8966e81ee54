"""The dtype rules that only mixed precision shows, on real tensors: LoRA weights stay fp32 when several
adapters are added, and validation encodes and decodes with the VAE in fp32 under fp16 autocast; and
a static rule on random draws. Whole programs on a simulated GPU (every script, fp16 and bf16, resumed)
are the GPU check's dry run (tests/test_gpu_check.py, toy_world/sim_gpu.py)."""
import os

import torch

import train_RORem
import train_RORem_ddpo
from myutils.data import read_meta
from training import adapters, prepare, validation


def _common(model, out):
    return ["--pretrained_model_name_or_path", model, "--output_dir", out, "--resolution", "32", "--report_to", "none"]


# ----------------------------------------------------------------------------- dtypes under mixed precision (real tensors)

def test_several_adapters_under_fp16_keep_every_lora_weight_fp32(tiny_model_dir):
    """MORL adds one adapter per policy: adding the third must not recast the first two (fp16 LoRA
    weights make the grad scaler fail: 'Attempting to unscale FP16 gradients')."""
    from diffusers import UNet2DConditionModel

    args = train_RORem_ddpo.parse_args(["--meta_path", "m", "--output_dir", "o", "--lora_rank", "4", "--reward", "preserve=1"])
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    params = [adapters.add_lora(unet, args, torch.float16, adapter_name=f"policy_{k}") for k in range(3)]
    lora = {n: p.dtype for n, p in unet.named_parameters() if "lora_" in n}
    assert len(lora) == sum(len(p) for p in params) and set(lora.values()) == {torch.float32}
    assert {p.dtype for n, p in unet.named_parameters() if "lora_" not in n} == {torch.float16}


def test_validation_under_fp16_autocast_runs_the_vae_in_fp32_and_leaves_it_fp32(tiny_model_dir, toy_meta, tmp_path):
    """Only the UNet runs under the training's autocast; the SDXL VAE (which overflows in fp16)
    encodes and decodes in fp32 and stays fp32 for the training steps after validation."""
    import contextlib
    import types

    args = train_RORem.parse_args(_common(tiny_model_dir, str(tmp_path)) + ["--meta_path", toy_meta, "--use_lora",
                                                                             "--validation_inference_steps", "2"])
    acc = types.SimpleNamespace(device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", dtype=torch.float16))
    comps = prepare.Components(args, acc, torch.float16)
    adapters.add_lora(comps.unet, args, torch.float16)
    seen = {"vae": set(), "unet": set()}

    def record(name):
        def hook(module, inputs):
            seen[name].add((inputs[0].dtype, torch.is_autocast_enabled("cpu")))
        return hook

    handles = [comps.vae.encoder.conv_in.register_forward_pre_hook(record("vae")),
               comps.vae.decoder.conv_in.register_forward_pre_hook(record("vae")),
               comps.unet.conv_in.register_forward_pre_hook(record("unet"))]
    try:
        samples = validation.validation_samples(args, read_meta(toy_meta, "triplet"), count=2)
        with contextlib.nullcontext():
            results = validation.sample_validation(acc, args, comps, comps.unet, samples)
    finally:
        for h in handles:
            h.remove()
    assert seen["vae"] == {(torch.float32, False)}  # encoder and decoder: fp32 input, no autocast
    assert {enabled for _, enabled in seen["unet"]} == {True}  # the UNet in the training's precision
    assert comps.vae.dtype == torch.float32 and len(results) == 2


# ----------------------------------------------------------------------------- random draws (a static rule)

DRAWS = {"rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson"}


def _source_files():
    from tests.conftest import ROOT

    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__") and not d.endswith(".egg-info")]
        yield from (os.path.join(folder, f) for f in files if f.endswith(".py"))


def test_every_draw_with_a_generator_names_its_device_and_generators_live_on_the_cpu():
    """torch.rand(..., generator=g) without device= draws on the CPU whatever g is, and fails on the first
    step for a CUDA generator ("Expected a 'cpu' device type for generator"). Every draw names its
    device, and generators are made on the CPU (myutils/rng.py), where no GPU is needed to make them."""
    import ast

    bad = []
    for path in _source_files():
        for node in ast.walk(ast.parse(open(path).read())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"):
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            where = f"{os.path.relpath(path)}:{node.lineno}"
            if node.func.attr in DRAWS and "generator" in keywords and "device" not in keywords:
                bad.append(f"{where}: torch.{node.func.attr}(generator=...) without device=")
            if node.func.attr == "Generator":
                device = (node.args or [keywords.get("device")])[0]
                if device is not None and not (isinstance(device, ast.Constant) and device.value == "cpu"):
                    bad.append(f"{where}: torch.Generator({ast.unparse(device)}): generators live on the CPU")
    assert not bad, "\n".join(bad)
