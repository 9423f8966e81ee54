"""Model loading: local folders, RORem UNet folders (plain, nested unet/, fp16 variant), and clear errors."""
import os

import pytest
import torch

from myutils.errors import UserError
from myutils.models import load_inpaint_pipeline, load_unet


def test_rorem_unet_folder_formats(tmp_path, tiny_model_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    unet.to(torch.float16).save_pretrained(tmp_path / "rorem_fp16", variant="fp16")  # as RORem releases it
    assert os.path.isfile(tmp_path / "rorem_fp16" / "diffusion_pytorch_model.fp16.safetensors")
    loaded = load_unet(str(tmp_path / "rorem_fp16"), variant="fp16", dtype=torch.float32)
    w = dict(loaded.named_parameters())["conv_in.weight"]
    assert w.dtype == torch.float32 and torch.allclose(w, unet.conv_in.weight.half().float())
    unet.save_pretrained(tmp_path / "run" / "unet")  # a training output folder that holds unet/
    assert torch.equal(load_unet(str(tmp_path / "run")).conv_in.weight, unet.conv_in.weight)
    pipe = load_inpaint_pipeline(tiny_model_dir, pretrained_unet=str(tmp_path / "run"))
    assert torch.equal(pipe.unet.conv_in.weight, unet.conv_in.weight)


def test_clear_errors_for_missing_models(tmp_path):
    with pytest.raises(UserError, match="--pretrained_unet: folder not found"):
        load_unet(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_unet(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="not a local folder and could not be loaded from the Hugging Face hub"):
        load_inpaint_pipeline("nobody-here/no-such-model-rorem")  # HF_HUB_OFFLINE=1 in the tests
    with pytest.raises(UserError, match="not a loadable SDXL-inpainting folder"):
        load_inpaint_pipeline(str(tmp_path / "empty"))


def test_rorem_pipeline_with_fp16_variant(tmp_path, tiny_model_dir):
    """The hub release is a whole pipeline whose files carry the fp16 variant."""
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float16)
    pipe.save_pretrained(tmp_path / "rorem", variant="fp16")
    assert os.path.isfile(tmp_path / "rorem" / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    loaded = load_inpaint_pipeline(str(tmp_path / "rorem"), variant="fp16", dtype=torch.float16)
    assert loaded.unet.dtype == torch.float16
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)
