"""SDXL-inpainting conditioning: channel order, masked-image rule, nearest mask, time ids, and the
whole input checked against what diffusers' own inpainting pipeline feeds its UNet."""
import numpy as np
import pytest
import torch
from PIL import Image

from myutils.sdxl_inpaint import (PromptCondition, add_time_ids, downsample_mask, encode_prompt_once, masked_image,
                                  unet_input, vae_latent_params, sample_latents)


def test_channel_order():
    x = unet_input(torch.full((1, 4, 2, 2), 1.0), torch.full((1, 1, 2, 2), 2.0), torch.full((1, 4, 2, 2), 3.0))
    assert x.shape == (1, 9, 2, 2)
    assert x[0, :, 0, 0].tolist() == [1, 1, 1, 1, 2, 3, 3, 3, 3]


def test_masked_image_rule():
    pix = torch.tensor([[[[0.5, -0.7], [0.9, 1.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert torch.equal(masked_image(pix, mask), torch.tensor([[[[0.0, -0.7], [0.9, 0.0]]]]))  # hole -> 0 (mid grey)


def test_mask_downsampling_is_nearest():
    m = torch.zeros(1, 1, 4, 4)
    m[..., 0, 0] = 1  # nearest picks the top-left pixel of each 2x2 cell
    m[..., 3, 3] = 1  # not picked
    assert downsample_mask(m, (2, 2)).tolist() == [[[[1.0, 0.0], [0.0, 0.0]]]]


def test_time_ids_for_a_crop():
    ids = add_time_ids([[600, 800], [512, 512]], [[10, 20], [0, 0]], (512, 512))
    assert ids.tolist() == [[600, 800, 10, 20, 512, 512], [512, 512, 0, 0, 512, 512]]
    assert add_time_ids([[600, 800]], [[10, 20]], None, aesthetic_score=6.0).tolist() == [[600, 800, 10, 20, 6.0]]


def test_time_ids_match_diffusers(tiny_model_dir):
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_model_dir)
    ref, _ = pipe._get_add_time_ids((600, 800), (10, 20), (512, 512), 6.0, 2.5, (600, 800), (10, 20), (512, 512),
                                    torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(add_time_ids([[600, 800]], [[10, 20]], (512, 512)), ref)


def test_unet_input_matches_the_pipeline(tiny_model_dir):
    """Run the stock pipeline for one step, record what its UNet receives, and rebuild it with ours."""
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_model_dir)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask_arr = np.zeros((32, 32), np.uint8)
    mask_arr[5:19, 9:27] = 255
    mask = Image.fromarray(mask_arr, mode="L")
    seen, encoded = {}, []
    real_forward, real_encode = pipe.unet.forward, pipe.vae.encode
    pipe.unet.forward = lambda sample, t, **kw: seen.setdefault("call", (sample, kw)) and real_forward(sample, t, **kw)
    pipe.vae.encode = lambda x, *a, **k: (encoded.append(x.clone()), real_encode(x, *a, **k))[1]
    pipe(prompt="", image=image, mask_image=mask, height=32, width=32, num_inference_steps=1, strength=1.0,
         guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    sample, kw = seen["call"]

    pixels = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    bin_mask = torch.from_numpy((mask_arr >= 128).astype(np.float32))[None, None]
    assert torch.allclose(encoded[-1], masked_image(pixels, bin_mask), atol=1e-6)  # masked image rule
    assert torch.equal(sample[:, 4:5], downsample_mask(bin_mask, (16, 16)))  # mask channel
    cond = encode_prompt_once(pipe, "")
    ours = cond.unet_kwargs([[32, 32]], [[0, 0]], (32, 32))
    assert torch.allclose(ours["encoder_hidden_states"], kw["encoder_hidden_states"])
    assert torch.allclose(ours["added_cond_kwargs"]["text_embeds"], kw["added_cond_kwargs"]["text_embeds"])
    assert torch.equal(ours["added_cond_kwargs"]["time_ids"], kw["added_cond_kwargs"]["time_ids"])
    assert ours["encoder_hidden_states"].shape == (1, 77, 64)  # penultimate states of both encoders, 32 + 32


def test_prompt_condition_batches():
    """One prompt for a batch whose samples differ in size and crop: every row its own time ids."""
    cond = PromptCondition(torch.randn(1, 77, 8), torch.randn(1, 4))
    kw = cond.unet_kwargs(torch.tensor([[40, 50], [32, 32], [64, 64]]), torch.tensor([[3, 0], [0, 0], [0, 7]]), (32, 32))
    assert kw["added_cond_kwargs"]["time_ids"].tolist() == [[40, 50, 3, 0, 32, 32], [32, 32, 0, 0, 32, 32],
                                                            [64, 64, 0, 7, 32, 32]]
    assert kw["encoder_hidden_states"].shape == (3, 77, 8)
    assert all(torch.equal(kw["encoder_hidden_states"][i], cond.prompt_embeds[0]) for i in range(3))
    assert all(torch.equal(kw["added_cond_kwargs"]["text_embeds"][i], cond.pooled_prompt_embeds[0]) for i in range(3))
    aesthetic = PromptCondition(torch.randn(1, 77, 8), torch.randn(1, 4), requires_aesthetics_score=True, aesthetic_score=6.5)
    assert aesthetic.unet_kwargs(torch.tensor([[40, 50]]), torch.tensor([[1, 2]]), (32, 32))["added_cond_kwargs"][
        "time_ids"].tolist() == [[40, 50, 1, 2, 6.5]]


@pytest.mark.parametrize("shift", [0.0, 0.1159])  # SDXL's VAE has no shift; FLUX's has 0.1159
def test_latents_are_shifted_then_scaled_and_decoded_back(tiny_model_dir, shift):
    from diffusers import AutoencoderKL

    from myutils.sdxl_inpaint import decode_latents, posterior_mean_latents

    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae")
    vae.register_to_config(shift_factor=shift, scaling_factor=0.7)
    params = vae_latent_params(vae, torch.rand(2, 3, 32, 32) * 2 - 1)
    mean, logvar = params.chunk(2, dim=1)
    params_det = torch.cat([mean, torch.full_like(logvar, -30.0)], 1)  # std ~ 0: only shift and scaling are left
    z = sample_latents(params_det, vae.config)
    assert torch.allclose(z, (mean - shift) * 0.7, atol=1e-5)
    assert torch.allclose(posterior_mean_latents(params, vae.config), (mean - shift) * 0.7, atol=1e-6)
    with torch.no_grad():  # decoding undoes both: the VAE sees the unscaled, unshifted latents
        want = vae.decode(mean).sample.clamp(-1, 1)
    assert torch.allclose(decode_latents(vae, z), want, atol=1e-5)


def test_vae_encodes_in_bounded_chunks_with_the_same_latents(tiny_model_dir):
    """A batch is encoded VAE_ENCODE_CHUNK images at a time (bounded temporaries at 1024 px), giving the
    posterior of encoding it whole."""
    from diffusers import AutoencoderKL

    from myutils.sdxl_inpaint import VAE_ENCODE_CHUNK, vae_latent_params

    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae")
    pixels = torch.rand(10, 3, 32, 32) * 2 - 1
    seen = []
    hook = vae.encoder.conv_in.register_forward_pre_hook(lambda m, i: seen.append(i[0].shape[0]))
    try:
        params = vae_latent_params(vae, pixels)
    finally:
        hook.remove()
    assert seen == [VAE_ENCODE_CHUNK, VAE_ENCODE_CHUNK, 10 - 2 * VAE_ENCODE_CHUNK]
    with torch.no_grad():
        whole = vae.encode(pixels).latent_dist.parameters
    assert params.shape == whole.shape and torch.allclose(params, whole, atol=1e-5)
