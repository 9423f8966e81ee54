"""The discriminator: encoder half of the UNet by reference, same features as the full UNet,
a head that ends at one value per image at several resolutions, scores >= 0."""
import torch
from diffusers import UNet2DConditionModel

from model.unet_sdxl_discriminator import UNetSDXLDiscriminator


def _inputs(b, hw, cross=64, pooled=32):
    return (torch.randn(b, 9, hw, hw), torch.zeros(b, dtype=torch.long), torch.randn(b, 77, cross),
            {"text_embeds": torch.randn(b, pooled), "time_ids": torch.tensor([[hw * 2, hw * 2, 0, 0, hw * 2, hw * 2]] * b, dtype=torch.float32)})


def test_mid_block_feature_equals_the_full_unet(tiny_model_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    captured = {}
    unet.mid_block.register_forward_hook(lambda m, i, o: captured.setdefault("mid", o))
    x, t, ehs, added = _inputs(2, 16)
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added)
        disc = UNetSDXLDiscriminator(unet)
        ours = disc.encode(x, t, ehs, added)
    assert torch.allclose(ours, captured["mid"], atol=1e-5)
    assert disc.conv_in is unet.conv_in and disc.mid_block is unet.mid_block  # shared, not copied


def test_scores_shape_nonnegative_at_two_resolutions(tiny_model_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    disc = UNetSDXLDiscriminator.from_unet(unet)
    assert unet.up_blocks is None and not any("up_blocks" in n for n, _ in disc.named_parameters())
    for hw in (16, 32):  # mid feature 8x8 and 16x16
        with torch.no_grad():
            s = disc(*_inputs(3, hw))
        assert s.shape == (3,) and (s >= 0).all()
    feature = torch.randn(2, 64, 16, 16)  # the 512 px case: the fixed strides alone reach 1x1
    h = disc.cls_pred_branch(feature)
    assert h.shape == (2, 1, 1, 1) and torch.allclose(disc.logits(feature), h.flatten(), atol=1e-6)
    assert disc.cls_pred_branch(torch.randn(1, 64, 32, 32)).shape[-1] == 2  # 1024 px: strides stop at 2x2 ...
    assert disc.logits(torch.randn(1, 64, 32, 32)).shape == (1,)  # ... so the head pools to one value


def test_score_is_the_head_activation_of_the_logit(tiny_model_dir):
    """softplus (RORem's, >= 0, unbounded above) and sigmoid heads apply their formula to the same logit:
    checked by hand-written formulas on the logits."""
    import math

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    inputs = _inputs(4, 16)
    for activation, formula in (("softplus", lambda z: math.log1p(math.exp(z))), ("sigmoid", lambda z: 1 / (1 + math.exp(-z)))):
        disc = UNetSDXLDiscriminator.from_unet(unet, head_activation=activation)
        with torch.no_grad():
            logits = disc(*inputs, return_logits=True)
            scores = disc(*inputs)
        assert logits.std() > 0
        assert torch.allclose(scores, torch.tensor([formula(z) for z in logits.tolist()]), atol=1e-6)
