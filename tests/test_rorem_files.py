"""RORem's released files load, with their weights applied, in every loader.

The fixtures are written here the way RORem's own scripts wrote them (diffusers 0.30, peft 0.12), by
hand and without our readers: `convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`
renamed only the attention LoRA keys (to_q/to_k/to_v/to_out.0: lora_A/lora_B -> lora.down/lora.up),
`save_lora_weights` prefixed `unet.`, and the discriminator head was a torch.save of the UNet state-dict
entries whose key contains cls_pred_branch (prefix kept). Each loader must take the file as it is, hold
exactly its tensors, and give another result than the same file with its up (B) weights zeroed.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from myutils.errors import UserError

LCM_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
               "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
ATTENTION = (".to_q.", ".to_k.", ".to_v.", ".to_out.0.")


def rorem_naming(peft_state):
    """diffusers 0.30's convert_state_dict_to_diffusers on a UNet: attention keys renamed, the rest kept;
    then save_lora_weights' `unet.` prefix."""
    out = {}
    for k, v in peft_state.items():
        if any(a in k for a in ATTENTION):
            k = k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")
        out[f"unet.{k}"] = v.contiguous()
    return out


def _randomised_peft_state(model, targets, rank, seed):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, device=g.device) * 0.3)
    return get_peft_model_state_dict(model)


def zeroed_up(src, dst):
    """The same LoRA file with every up/B weight zeroed: the LoRA then changes nothing."""
    state = load_file(src)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    save_file({k: torch.zeros_like(v) if (".lora.up." in k or ".lora_B." in k) else v for k, v in state.items()}, dst)
    return dst


@pytest.fixture(scope="module")
def rorem_lcm_lora(tmp_path_factory, tiny_model_dir):
    """RORem's 4-step LoRA layout (rank = alpha, 14 target kinds, one file mixing both namings)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    state = rorem_naming(_randomised_peft_state(unet, LCM_TARGETS, rank=4, seed=0))
    path = str(tmp_path_factory.mktemp("rorem_lcm") / "pytorch_lora_weights.safetensors")
    save_file(state, path, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def rorem_discriminator(tmp_path_factory, tiny_model_dir):
    """RORem's discriminator folder: rank-4 attention LoRA in lora.down/lora.up naming, the head with
    its cls_pred_branch. prefix, no config file of ours."""
    from diffusers import UNet2DConditionModel

    from model.unet_sdxl_discriminator import UNetSDXLDiscriminator

    disc = UNetSDXLDiscriminator.from_unet(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"))
    lora = rorem_naming(_randomised_peft_state(disc, ["to_q", "to_k", "to_v", "to_out.0"], rank=4, seed=1))
    folder = tmp_path_factory.mktemp("rorem_disc")
    save_file(lora, str(folder / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    g = torch.Generator().manual_seed(2)
    head = {f"cls_pred_branch.{k}": torch.randn(v.shape, generator=g, device=g.device) * 0.2
            for k, v in disc.cls_pred_branch.state_dict().items()}
    torch.save(head, str(folder / "cls_pred_branch.pt"))
    return str(folder)


def _peft_keys(file_state):
    return {k[len("unet."):].replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v for k, v in file_state.items()}


def test_the_fixture_mixes_namings_and_stock_diffusers_drops_its_attention_lora(rorem_lcm_lora, tiny_model_dir):
    """Why our reader exists: diffusers converts a file's keys only when its first key lacks lora_A,
    and this file's first key is a resnet's lora_A. (If a later diffusers fixes this, drop the second half.)"""
    from diffusers import StableDiffusionXLInpaintPipeline
    from peft.utils import get_peft_model_state_dict

    keys = list(load_file(rorem_lcm_lora))
    assert "lora_A" in keys[0] and any(".to_q.lora.down." in k for k in keys) and any(".conv1.lora_A." in k for k in keys)
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(os.path.dirname(rorem_lcm_lora))
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=list(pipe.unet.peft_config)[0])
    assert not any(".to_q." in k for k in loaded)


def test_converted_lora_loads_whole_in_stock_diffusers(rorem_lcm_lora, tiny_model_dir, tmp_path):
    """scripts/convert_lora.py rewrites the mixed file in peft naming: stock load_lora_weights then
    holds every weight of the original."""
    import importlib.util

    from diffusers import StableDiffusionXLInpaintPipeline
    from peft.utils import get_peft_model_state_dict

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("convert_lora", os.path.join(ROOT, "scripts", "convert_lora.py"))
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    convert.main([rorem_lcm_lora, str(tmp_path / "peft")])
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(str(tmp_path / "peft"))
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=list(pipe.unet.peft_config)[0])
    want = _peft_keys(load_file(rorem_lcm_lora))
    assert set(loaded) == set(want) and all(torch.equal(loaded[k], v) for k, v in want.items())
    with pytest.raises(UserError, match="would overwrite the input"):
        convert.main([str(tmp_path / "peft"), str(tmp_path / "peft")])


def test_lcm_lora_loads_every_weight_in_the_remover(rorem_lcm_lora, tiny_model_dir):
    from types import SimpleNamespace

    from peft.utils import get_peft_model_state_dict

    from pipelines.inpaint import load_remover

    spec = SimpleNamespace(pretrained_model=tiny_model_dir, RORem_unet=None, variant=None, lora_path=rorem_lcm_lora, fuse_lora=False,
                           scheduler="lcm", prompt="", negative_prompt="")
    pipe, _, _ = load_remover(spec, "cpu", torch.float32)
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=list(pipe.unet.peft_config)[0])
    want = _peft_keys(load_file(rorem_lcm_lora))
    assert set(loaded) == set(want) and all(torch.equal(loaded[k], v) for k, v in want.items())
    assert pipe.unet.peft_config[list(pipe.unet.peft_config)[0]].lora_alpha == 4  # rank = alpha: scale 1


def _photo_and_mask(folder):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / "in.png")
    m = Image.new("L", (32, 32), 0)
    m.paste(255, (8, 8, 24, 24))
    m.save(folder / "m.png")


def test_four_step_inference_applies_the_lora(rorem_lcm_lora, tiny_model_dir, tmp_path):
    """inference_RORem_4S fuses the file: its result differs from the zeroed file's, which equals the
    base model's (a zero LoRA fuses to nothing). That every weight lands is checked above, in
    load_remover, which the 4-step script and the evaluation's lora/lcm systems go through."""
    import inference_RORem_4S

    _photo_and_mask(tmp_path)
    zero = zeroed_up(rorem_lcm_lora, str(tmp_path / "zero" / "pytorch_lora_weights.safetensors"))
    out = {}
    for name, lora in (("lora", rorem_lcm_lora), ("zero", zero)):
        inference_RORem_4S.main(["--pretrained_model", tiny_model_dir, "--RORem_LoRA", lora, "--image_path", str(tmp_path / "in.png"),
                                 "--mask_path", str(tmp_path / "m.png"), "--resolution", "32", "--save_path", str(tmp_path / f"{name}.png")])
        out[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), float)
    import inference_RORem

    inference_RORem.main(["--pretrained_model", tiny_model_dir, "--scheduler", "lcm", "--inference_steps", "4", "--strength", "1.0",
                          "--image_path", str(tmp_path / "in.png"), "--mask_path", str(tmp_path / "m.png"), "--resolution", "32",
                          "--save_path", str(tmp_path / "base.png")])
    assert np.abs(out["lora"] - out["zero"]).max() > 10
    assert np.array_equal(out["zero"], np.asarray(Image.open(tmp_path / "base.png"), float))


def test_evaluation_lcm_system_applies_the_lora(rorem_lcm_lora, tiny_model_dir, toy_meta, tmp_path):
    import evaluate_RORem as ev
    from myutils.data import read_meta

    zero = zeroed_up(rorem_lcm_lora, str(tmp_path / "zero" / "pytorch_lora_weights.safetensors"))
    args = ev.parse_args(["--meta_path", toy_meta, "--system", f"rorem=lcm:{rorem_lcm_lora}", "--system", f"zeroed=lcm:{zero}",
                          "--output_dir", str(tmp_path / "eval"), "--pretrained_model", tiny_model_dir, "--resolution", "32"])
    entries = read_meta(toy_meta, "triplet")[:2]
    images = []
    for system in args.systems:
        ev.generate(args, system, entries, "cpu", torch.float32)
        images.append([np.asarray(im, float) for im in ev.load_results(args, system, entries)])
    assert all(np.abs(a - b).max() > 10 for a, b in zip(*images))


def test_rorem_discriminator_holds_the_files_tensors_and_scores_as_rorem_did(rorem_discriminator, tiny_model_dir, toy_meta, tmp_path):
    """Loaded with RORem's conditioning (no config of ours in the folder): the score equals the head on
    the encoder of [sqrt(a0) x + sqrt(1 - a0) n, mask, source] with time ids (512, 512, 0, 0, 512, 512),
    computed here by hand; zeroing the LoRA's up weights changes it."""
    import shutil

    from diffusers import DDPMScheduler
    from peft.utils import get_peft_model_state_dict

    from myutils.data import RemovalDataset, read_meta, stack_samples
    from myutils.reward_utils import load_reward_model
    from myutils.sdxl_inpaint import downsample_mask, posterior_mean_latents, unet_input, vae_latent_params

    reward = load_reward_model(tiny_model_dir, rorem_discriminator, 32)
    assert reward.conditioning == "rorem"
    head = torch.load(os.path.join(rorem_discriminator, "cls_pred_branch.pt"))
    assert all(torch.equal(reward.disc.cls_pred_branch.state_dict()[k[len("cls_pred_branch."):]], v) for k, v in head.items())
    loaded = get_peft_model_state_dict(reward.disc)
    want = _peft_keys(load_file(os.path.join(rorem_discriminator, "pytorch_lora_weights.safetensors")))
    assert set(loaded) == set(want) and all(torch.equal(loaded[k], v) for k, v in want.items())

    b = stack_samples([RemovalDataset(read_meta(toy_meta, "triplet"), "triplet", 32)[i] for i in range(3)])
    scores = reward.score_pixels(b["source"], b["mask"], b["GT"], b["original_size"], b["crop_top_left"])
    # by hand
    vae, cfg = reward.vae, reward.vae.config
    edited = posterior_mean_latents(vae_latent_params(vae, b["GT"]), cfg)
    source = posterior_mean_latents(vae_latent_params(vae, b["source"]), cfg)
    a0 = float(DDPMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler").alphas_cumprod[0])
    noise = torch.randn(edited.shape[1:], generator=torch.Generator().manual_seed(0))
    x = unet_input(a0 ** 0.5 * edited + (1 - a0) ** 0.5 * noise, downsample_mask(b["mask"], edited.shape[-2:]), source)
    ids = torch.tensor([[512.0, 512.0, 0.0, 0.0, 512.0, 512.0]] * 3)
    c = reward.condition
    by_hand = reward.disc(x, 0, c.prompt_embeds.expand(3, -1, -1), {"text_embeds": c.pooled_prompt_embeds.expand(3, -1), "time_ids": ids})
    assert torch.allclose(scores, by_hand, atol=1e-6)

    zero_dir = tmp_path / "zero"
    shutil.copytree(rorem_discriminator, zero_dir)
    zeroed_up(os.path.join(rorem_discriminator, "pytorch_lora_weights.safetensors"), str(zero_dir / "pytorch_lora_weights.safetensors"))
    zero_scores = load_reward_model(tiny_model_dir, str(zero_dir), 32).score_pixels(b["source"], b["mask"], b["GT"])
    assert (scores - zero_scores).abs().max() > 1e-4


def test_discriminator_cli_and_rewards_take_the_rorem_folder(rorem_discriminator, tiny_model_dir, toy_meta, tmp_path):
    """The scoring CLI (RORem's conditioning by default, per-sample on request) and the RL reward loader."""
    import argparse

    import inference_RORem_discriminator as infd
    from training import rl_loop

    argv = ["--pretrained_model", tiny_model_dir, "--RORem_discriminator", rorem_discriminator, "--meta_path", toy_meta,
            "--resolution", "32", "--device", "cpu", "--output_path", str(tmp_path / "s.json")]
    rorem = infd.main(argv)
    per_sample = infd.main(argv + ["--conditioning", "per_sample"])
    assert len(rorem) == 12 and not np.allclose(rorem, per_sample)
    args = argparse.Namespace(discriminator_path=rorem_discriminator, discriminator_base_model=None,
                              pretrained_model_name_or_path=tiny_model_dir, resolution=32, variant=None)
    reward = rl_loop.load_reward(args, argparse.Namespace(device=torch.device("cpu")), torch.float32)
    assert reward.conditioning == "rorem"


def test_our_discriminator_head_loads_in_rorems_code_path(disc_dir, tiny_model_dir):
    """RORem loads the head with load_state_dict(strict=False) on the whole model: our file's keys must
    carry the cls_pred_branch. prefix to land (and no other key may be unexpected)."""
    from diffusers import UNet2DConditionModel

    from model.unet_sdxl_discriminator import UNetSDXLDiscriminator

    disc = UNetSDXLDiscriminator.from_unet(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"))
    head = torch.load(os.path.join(disc_dir, "cls_pred_branch.pt"))
    missing, unexpected = disc.load_state_dict(head, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("cls_pred_branch.")]
    assert all(torch.equal(disc.state_dict()[k], v) for k, v in head.items())
    with open(os.path.join(disc_dir, "discriminator_config.json")) as f:
        assert json.load(f)["conditioning"] == "per_sample"


def test_rorem_validation_data_folder_layout(tmp_path, tiny_model_dir):
    """RORem's validation_data/: 1.jpg beside mask_1.png (an RGB mask) in one folder; --mask_path defaults to it."""
    import inference_RORem

    folder = tmp_path / "validation_data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("1", "2"):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(folder / f"{name}.jpg")
        m = Image.new("RGB", (40, 32), (0, 0, 0))
        m.paste((255, 255, 255), (8, 8, 24, 24))
        m.save(folder / f"mask_{name}.png")
    inference_RORem.main(["--pretrained_model", tiny_model_dir, "--image_path", str(folder), "--save_path", str(tmp_path / "out"),
                          "--resolution", "32", "--inference_steps", "2"])
    assert sorted(os.listdir(tmp_path / "out")) == ["1.png", "2.png", "made_by.json", "meta.json"]
    meta = json.load(open(tmp_path / "out" / "meta.json"))
    assert [os.path.basename(e["mask"]) for e in meta] == ["mask_1.png", "mask_2.png"]
    src, out = (np.asarray(Image.open(p), float) for p in (folder / "1.jpg", tmp_path / "out" / "1.png"))
    assert out.shape == src.shape and np.array_equal(out[:4], src[:4])  # outside the (undilated) mask: the input
    (folder / "mask_2.png").unlink()
    with pytest.raises(UserError, match=r"no mask for '2.jpg' \(looked for 2.\* and mask_2.\*"):
        inference_RORem.main(["--pretrained_model", tiny_model_dir, "--image_path", str(folder), "--save_path", str(tmp_path / "o2"),
                              "--resolution", "32"])
