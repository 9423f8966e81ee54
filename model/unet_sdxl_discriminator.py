"""The RORem discriminator: an SDXL-inpainting UNet's encoder half plus a small convolutional head.

It keeps the UNet's conv_in, time and added (text_time) embeddings, down blocks and mid block, by
reference (no copy), and nothing of the up path. The head reduces the mid-block feature
(1280 x 16 x 16 at 512 px) to one number per image:
    conv 4x4/2 -> GN -> SiLU -> conv 4x4/2 -> GN -> SiLU -> conv 4x4/4 -> GN -> SiLU -> conv 1x1
and the score is softplus(logit) >= 0 (RORem, trained by MSE to 0/1 labels), or sigmoid(logit) for a
head trained with BCE. Where the feature is not 16x16 (1024 px: 32x32; tiny test models: 8x8),
the input of the last strided conv is adaptively pooled to 4x4 so the head still ends at 1x1.
The head's module names match RORem's `cls_pred_branch.pt`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# a discriminator folder: the encoder's LoRA (or the full weights), the head, the settings
LORA_FILE, HEAD_FILE, FULL_FILE, CONFIG_FILE = ("pytorch_lora_weights.safetensors", "cls_pred_branch.pt",
                                                "discriminator.safetensors", "discriminator_config.json")
HEAD_ACTIVATIONS = {"softplus": F.softplus, "sigmoid": torch.sigmoid}


def make_head(channels):
    """RORem's head. GroupNorm(32) at SDXL's 1280 channels; narrower (test) models keep 16 channels
    per group instead, since GroupNorm over 2 channels of a 1x1 map is a sign function. The group
    count is not part of the state dict, so RORem's cls_pred_branch.pt loads either way."""
    groups = 32 if channels >= 32 * 16 else max(1, channels // 16)
    return nn.Sequential(
        nn.Conv2d(channels, channels, 4, 2, 1), nn.GroupNorm(groups, channels), nn.SiLU(),
        nn.Conv2d(channels, channels, 4, 2, 1), nn.GroupNorm(groups, channels), nn.SiLU(),
        nn.Conv2d(channels, channels, 4, 4, 0), nn.GroupNorm(groups, channels), nn.SiLU(),
        nn.Conv2d(channels, 1, 1, 1, 0),
    )


class UNetSDXLDiscriminator(nn.Module):
    def __init__(self, unet, head_activation="softplus"):
        """Take the encoder modules of `unet` (shared, not copied); drop your reference to the
        UNet afterwards so its up blocks can be freed (see `from_unet`)."""
        super().__init__()
        if head_activation not in HEAD_ACTIVATIONS:
            raise ValueError(f"head_activation must be one of {sorted(HEAD_ACTIVATIONS)}")
        if unet.config.addition_embed_type != "text_time":
            raise ValueError("expected an SDXL UNet (addition_embed_type 'text_time')")
        self.config = unet.config
        self.head_activation = head_activation
        self.conv_in, self.time_proj, self.time_embedding = unet.conv_in, unet.time_proj, unet.time_embedding
        self.add_time_proj, self.add_embedding = unet.add_time_proj, unet.add_embedding
        self.down_blocks, self.mid_block = unet.down_blocks, unet.mid_block
        self.cls_pred_branch = make_head(unet.config.block_out_channels[-1])

    @classmethod
    def from_unet(cls, unet, head_activation="softplus"):
        """Build from a UNet and release everything the discriminator does not use."""
        disc = cls(unet, head_activation)
        for name in ("up_blocks", "conv_norm_out", "conv_act", "conv_out"):
            if hasattr(unet, name):
                setattr(unet, name, None)
        return disc

    @property
    def dtype(self):
        return self.conv_in.weight.dtype

    @property
    def device(self):
        return self.conv_in.weight.device

    def encode(self, sample, timestep, encoder_hidden_states, added_cond_kwargs):
        """The UNet's forward up to and including the mid block (same computation, same order)."""
        b = sample.shape[0]
        if torch.is_tensor(timestep) and timestep.device == sample.device:
            t = timestep.reshape(-1).expand(b)
        else:  # a number (RORem scores at t = 0): filled in on the device, not copied from the host
            t = torch.full((b,), torch.as_tensor(timestep).item(), device=sample.device)
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        time_ids = added_cond_kwargs["time_ids"]
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(b, -1).to(emb.dtype)
        emb = emb + self.add_embedding(torch.cat([added_cond_kwargs["text_embeds"], time_embeds], dim=-1).to(emb.dtype))
        h = self.conv_in(sample)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        return self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)

    def logits(self, feature):
        head = self.cls_pred_branch
        h = head[:6](feature.to(head[0].weight.dtype))  # the trainable head may be fp32 over an fp16 encoder
        if h.shape[-1] != 4 or h.shape[-2] != 4:  # not 512 px: pool so the 4x4/4 conv ends at 1x1
            h = F.adaptive_avg_pool2d(h, 4)
        return head[6:](h).mean(dim=(1, 2, 3))

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, return_logits=False):
        """sample: cat([edited latents, mask, source latents]) (9 channels). Returns scores (B,), or
        the raw logits for training (through forward, so DDP sees the call)."""
        logits = self.logits(self.encode(sample, timestep, encoder_hidden_states, added_cond_kwargs)).float()
        return logits if return_logits else HEAD_ACTIVATIONS[self.head_activation](logits)
