"""The toy world's models: tiny random-init SDXL-inpainting and FLUX.1-Fill pipelines in the exact
Hugging Face folder layout (text encoders with tokenizers written here, a 9-channel UNet, a small VAE),
pipelines built from config files, and a short VAE fit so toy images have a latent space that
reconstructs them. Used by the demo, the tests and the benchmarks, never by a training script."""
import json
import os
import time

import numpy as np

from .data import toy_sample

def _bytes_to_unicode():
    """GPT-2/CLIP byte -> printable character table (the standard byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_byte_tokenizer(folder):
    """A CLIP tokenizer with a byte-level vocabulary (256 + 256 end-of-word + 2 special), no merges."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77)


def tiny_pipeline(prediction_type="epsilon", image_size=32, seed=0, tmp_dir=None):
    """A random-init SDXL-inpainting pipeline small enough to train on a CPU in minutes.

    Same classes and config keys as the real model: 9-channel UNet with text_time embeddings, two
    CLIP text encoders (hidden 32 each, so cross_attention_dim 64), a VAE with a factor-2 latent."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = write_byte_tokenizer(tmp_dir or tempfile.mkdtemp())
    text_cfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                              vocab_size=len(tok), max_position_embeddings=77, projection_dim=32,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=16, mid_block_add_attention=False, sample_size=image_size)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2, in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    calibrate_vae_scaling(vae, seed)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
                              prediction_type=prediction_type)
    return StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_cfg), text_encoder_2=CLIPTextModelWithProjection(text_cfg),
        tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=scheduler, requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True, add_watermarker=False)


def pipeline_from_configs(unet_config, vae_config, tmp_dir=None, seed=0, device="cpu"):
    """A random-init SDXL-inpainting pipeline with the UNet and VAE of config files (configs/real/:
    the real 2.57B UNet and SDXL VAE), built on `device` (a GPU builds it in seconds). The two text
    encoders keep the real hidden sizes the UNet needs (cross_attention_dim = both, pooled = the
    second's projection) but one small layer each, and the byte tokenizer: the prompt is encoded once,
    so they add nothing to a training step. For timing and memory, not for images."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from myutils.planner import read_config

    torch.manual_seed(seed)
    ucfg, vcfg = read_config(unet_config, UNet2DConditionModel), read_config(vae_config, AutoencoderKL)
    pooled = ucfg["projection_class_embeddings_input_dim"] - 6 * ucfg["addition_time_embed_dim"]
    hidden = (ucfg["cross_attention_dim"] - pooled, pooled)
    tok = write_byte_tokenizer(tmp_dir or tempfile.mkdtemp())

    def text_cfg(h):
        return CLIPTextConfig(hidden_size=h, intermediate_size=h, num_attention_heads=max(1, h // 64), num_hidden_layers=2,
                              vocab_size=len(tok), max_position_embeddings=77, projection_dim=h, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)

    with torch.device(device):
        unet, vae = UNet2DConditionModel.from_config(ucfg), AutoencoderKL.from_config(vcfg)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading", prediction_type="epsilon")  # SDXL-inpainting's
    return StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_cfg(hidden[0])), text_encoder_2=CLIPTextModelWithProjection(text_cfg(hidden[1])),
        tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=scheduler, requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True, add_watermarker=False)


def calibrate_vae_scaling(vae, seed=0, num=64):
    """Set scaling_factor so latents of toy images have unit variance, as SDXL's 0.13025 does for
    photos (a random tiny VAE at the default 0.18215 gives latents of std ~0.05)."""
    import torch

    rng = np.random.default_rng(seed)
    size = vae.config.sample_size
    images = torch.stack([torch.from_numpy(toy_sample(rng, size)[0]).permute(2, 0, 1) for _ in range(num)]).float() / 127.5 - 1
    with torch.no_grad():
        set_latent_statistics(vae, vae.encode(images).latent_dist.mean)


def set_latent_statistics(vae, means):
    """scaling_factor = 1 / std of the latents; a VAE with a shift (FLUX's convention) also gets
    shift_factor = their mean, so (z - shift) * scale has zero mean and unit variance."""
    if vae.config.get("shift_factor") is not None:
        vae.register_to_config(shift_factor=float(means.mean()))
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))


def train_toy_vae(vae, images, steps=1200, batch_size=32, lr=2e-3, seed=0, held_out=64):
    """Fit the tiny VAE to toy images (L1 + MSE on reconstructions, a tiny KL), then set
    scaling_factor so the latents have unit variance. Returns the held-out PSNR in dB."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    if len(images) < 2:
        raise ValueError(f"the toy VAE needs at least 2 images to fit and measure, got {len(images)}")
    held_out = min(held_out, len(images) // 4 or 1)  # a small toy set (the demo's --train_samples 8) keeps most for fitting
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=g, device=g.device)
    test, train = images[perm[:held_out]], images[perm[held_out:]]
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    vae.train()
    start = time.time()
    for step in tqdm(range(steps), desc="toy VAE"):
        x = train[torch.randint(0, len(train), (batch_size,), generator=g, device=g.device)]
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample(generator=g)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(train[i:i + 256]).latent_dist.mean for i in range(0, len(train), 256)])
        rec = vae.decode(vae.encode(test).latent_dist.mean).sample.clamp(-1, 1)
    set_latent_statistics(vae, means)
    mse = float(((rec - test) / 2).pow(2).mean())  # in [0, 1] units
    return 10 * np.log10(1.0 / mse), time.time() - start


def write_unigram_t5_tokenizer(folder):
    """A T5 tokenizer (Unigram, sentencepiece-style word starts) over printable ASCII, written by
    us: the FLUX text encoder 2's tokenizer class with a vocabulary small enough for a toy model."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=32)
    tok.save_pretrained(folder)
    return tok


def tiny_flux_fill_pipeline(image_size=64, seed=0, tmp_dir=None):
    """A random-init FLUX.1-Fill pipeline (diffusers' FluxFillPipeline, the real folder layout) for
    the flow-matching toy: a 16-channel VAE with the real factor 8 (the Fill mask packing assumes
    it), a 384-channel-input transformer (packed latents 64 + masked-image latents 64 + mask 256),
    guidance embedding, a CLIP and a T5 text encoder with tokenizers written here."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    root = tmp_dir or tempfile.mkdtemp()
    clip_tok = write_byte_tokenizer(os.path.join(root, "tokenizer"))
    t5_tok = write_unigram_t5_tokenizer(os.path.join(root, "tokenizer_2"))
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
                                        vocab_size=len(clip_tok), max_position_embeddings=77, projection_dim=32,
                                        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                                        pad_token_id=clip_tok.eos_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 32), layers_per_block=1,
                        latent_channels=16, norm_num_groups=8, mid_block_add_attention=False, sample_size=image_size,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)  # FLUX's
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=384, out_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return FluxFillPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                            tokenizer_2=t5_tok, transformer=transformer)
