"""Reward utilities: normalisations against hand-computed values, RORem's file format round trip,
pixel and latent scoring agree."""
import os

import pytest
import torch

from myutils.discriminator_files import add_discriminator_lora, load_discriminator_weights, save_discriminator
from myutils.errors import UserError
from myutils.reward_utils import (DiscriminatorReward, clamp01, load_reference, load_reward_model, percentile_rank,
                                  save_reference, squash01, zscore)


def test_normalisations_by_hand(tmp_path):
    s = torch.tensor([0.2, 1.4, -0.1, 0.5])
    assert clamp01(s).tolist() == pytest.approx([0.2, 1.0, 0.0, 0.5])
    assert squash01(torch.tensor([0.5, 0.6])).tolist() == pytest.approx([0.5, 1 / (1 + 2.718281828 ** -1)], rel=1e-6)
    z = zscore(torch.tensor([1.0, 2.0, 3.0]))  # mean 2, population std sqrt(2/3)
    assert z.tolist() == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-3)
    assert zscore(torch.tensor([4.0, 4.0])).tolist() == [0.0, 0.0]
    assert percentile_rank(torch.tensor([3.0, 1.0, 2.0, 2.0])).tolist() == pytest.approx([1.0, 0.0, 0.5, 0.5])
    ref = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert percentile_rank(torch.tensor([1.5, 2.0, 9.0]), ref).tolist() == pytest.approx([0.5, 0.625, 1.0])
    save_reference(ref, tmp_path / "ref.safetensors")
    assert torch.equal(load_reference(tmp_path / "ref.safetensors"), ref)


def _disc(model_dir, activation="softplus"):
    from diffusers import UNet2DConditionModel

    from model.unet_sdxl_discriminator import UNetSDXLDiscriminator

    return UNetSDXLDiscriminator.from_unet(UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet"), activation)


def _reward(model_dir, disc):
    from diffusers import AutoencoderKL, StableDiffusionXLInpaintPipeline

    from myutils.sdxl_inpaint import encode_prompt_once

    cond = encode_prompt_once(StableDiffusionXLInpaintPipeline.from_pretrained(model_dir), "")
    return DiscriminatorReward(disc, AutoencoderKL.from_pretrained(model_dir, subfolder="vae"), cond, 32)


def _batch(b=3):
    g = torch.Generator().manual_seed(0)
    src, edited = torch.rand(b, 3, 32, 32, generator=g) * 2 - 1, torch.rand(b, 3, 32, 32, generator=g) * 2 - 1
    mask = torch.zeros(b, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    return src, mask, edited


def test_lora_and_head_round_trip_through_the_rorem_format(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    disc = _disc(tiny_model_dir)
    add_discriminator_lora(disc, rank=4)
    with torch.no_grad():
        for n, p in disc.named_parameters():
            if "lora_B" in n or "cls_pred_branch" in n:
                p.add_(torch.randn_like(p) * 0.1)  # trained-looking, not the init
    save_discriminator(disc, str(tmp_path / "d"), lora=True)
    assert sorted(os.listdir(tmp_path / "d")) == ["cls_pred_branch.pt", "discriminator_config.json", "pytorch_lora_weights.safetensors"]
    keys = list(load_file(tmp_path / "d" / "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("unet.") and ".lora" in k for k in keys)
    # RORem's key names, prefix included: its loader finds the head only under cls_pred_branch.*
    assert set(torch.load(tmp_path / "d" / "cls_pred_branch.pt")) == {f"cls_pred_branch.{i}.{w}" for i in (0, 1, 3, 4, 6, 7, 9)
                                                                       for w in ("weight", "bias")}
    fresh = load_discriminator_weights(_disc(tiny_model_dir), str(tmp_path / "d"))
    src, mask, edited = _batch()
    a, b = _reward(tiny_model_dir, disc).score_pixels(src, mask, edited), _reward(tiny_model_dir, fresh).score_pixels(src, mask, edited)
    assert torch.equal(a, b) and a.shape == (3,) and (a >= 0).all()
    plain = _reward(tiny_model_dir, _disc(tiny_model_dir)).score_pixels(src, mask, edited)
    assert not torch.allclose(a, plain)  # the loaded LoRA and head matter


def test_full_weights_round_trip_and_loader(tmp_path, tiny_model_dir):
    disc = _disc(tiny_model_dir, "sigmoid")
    with torch.no_grad():
        disc.conv_in.weight.mul_(1.5)
    save_discriminator(disc, str(tmp_path / "full"), lora=False)
    reward = load_reward_model(tiny_model_dir, str(tmp_path / "full"), resolution=32)
    assert reward.disc.head_activation == "sigmoid"
    src, mask, edited = _batch(2)
    assert torch.allclose(reward.score_pixels(src, mask, edited), _reward(tiny_model_dir, disc).score_pixels(src, mask, edited))
    with pytest.raises(UserError, match="no cls_pred_branch.pt"):
        load_discriminator_weights(_disc(tiny_model_dir), str(tmp_path))


def test_pixel_and_latent_scores_agree(tiny_model_dir):
    from myutils.sdxl_inpaint import downsample_mask, posterior_mean_latents, vae_latent_params

    reward = _reward(tiny_model_dir, _disc(tiny_model_dir))
    src, mask, edited = _batch(2)
    lat = {k: posterior_mean_latents(vae_latent_params(reward.vae, x), reward.vae.config) for k, x in (("s", src), ("e", edited))}
    on_latents = reward.score_latents(lat["s"], downsample_mask(mask, (16, 16)), lat["e"])
    assert torch.allclose(reward.score_pixels(src, mask, edited), on_latents, atol=1e-6)


def test_reward_weightings_on_a_fixed_score_vector():
    import math

    from myutils.reward_utils import ScoreMemory, reward_weights, weight_stats

    s = torch.tensor([0.2, 0.6, 0.9, 0.4])
    assert reward_weights(s, "none").tolist() == [1, 1, 1, 1]
    # filter at 0.5 keeps 0.6 and 0.9: weights 4 / 2 = 2 each, so the loss is the mean over kept samples
    assert reward_weights(s, "filter", threshold=0.5).tolist() == [0, 2, 2, 0]
    assert reward_weights(s, "filter", threshold=0.95).tolist() == [0, 0, 0, 0]  # nothing kept: the batch is skipped
    soft = reward_weights(s, "softmax", temperature=0.5)
    e = [math.exp(x / 0.5) for x in (0.2, 0.6, 0.9, 0.4)]
    assert soft.tolist() == pytest.approx([4 * v / sum(e) for v in e], rel=1e-5)
    assert reward_weights(s, "softmax", temperature=1e3).tolist() == pytest.approx([1, 1, 1, 1], abs=1e-3)  # hot: uniform
    # percentile within the batch: ranks 0, 2/3, 1, 1/3 (sum 2), rescaled by 4 / 2
    assert reward_weights(s, "percentile").tolist() == pytest.approx([0, 4 / 3, 2, 2 / 3], rel=1e-5)
    assert reward_weights(s, "percentile", reference=torch.tensor([0.5, 1.0])).tolist() == pytest.approx([0, 2, 2, 0])
    stats = weight_stats(torch.tensor([0.0, 2.0, 2.0, 0.0]))
    assert stats["weight_ess"] == pytest.approx(2.0) and stats["filtered_fraction"] == 0.5 and stats["weight_max"] == 2.0
    assert weight_stats(torch.ones(4))["weight_ess_fraction"] == 1.0
    with pytest.raises(ValueError):
        reward_weights(s, "softmax", temperature=0)

    memory = ScoreMemory(every=3)
    idx = torch.tensor([5, 7])
    assert memory.stale(idx, 0).tolist() == [True, True]
    memory.update(idx, torch.tensor([0.1, 0.2]), 0, torch.tensor([True, True]))
    assert memory.stale(idx, 2).tolist() == [False, False] and memory.stale(idx, 3).tolist() == [True, True]
    memory.update(idx, torch.tensor([0.9]), 3, torch.tensor([False, True]))
    assert memory.get(idx).tolist() == pytest.approx([0.1, 0.9])


def test_rl_rewards_by_hand():
    from myutils.reward_utils import gt_reward, jpeg_reward, parse_reward_spec, preservation_reward

    source = torch.zeros(1, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1  # a 2x2 hole: 4 of 16 pixels
    result = torch.zeros(1, 3, 4, 4)
    result[..., 0, 0] = 1.0  # inside the hole
    result[..., 3, 3] = 0.5  # outside: one of 12 pixels off by 0.5
    assert preservation_reward(result, source, mask).item() == pytest.approx(-0.25 / 12)
    assert gt_reward(result, source, mask).item() == pytest.approx(-1.0 / 4)
    flat, noisy = torch.zeros(1, 3, 32, 32), torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert jpeg_reward(flat).item() > jpeg_reward(noisy).item()  # flat images compress: a higher (less negative) reward
    assert parse_reward_spec("discriminator=1, preserve=0.5,jpeg") == {"discriminator": 1.0, "preserve": 0.5, "jpeg": 1.0}
    with pytest.raises(UserError, match="unknown reward"):
        parse_reward_spec("beauty=2")
