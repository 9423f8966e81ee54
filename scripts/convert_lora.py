#!/usr/bin/env python
"""Rewrite a LoRA file in one key naming, so stock diffusers loads all of it.

    python scripts/convert_lora.py path/to/RORem_LCM_LoRA experiment/RORem_LCM_LoRA_peft

RORem's 4-step LCM LoRA (saved by diffusers 0.30) names its attention weights lora.down/lora.up and
every other weight lora_A/lora_B; today's pipe.load_lora_weights converts a file only when its first
key lacks lora_A, and then drops every attention LoRA with a warning. Our scripts read such files as
they are (myutils/models.read_lora); this writes <output>/pytorch_lora_weights.safetensors in peft
naming (the adapter metadata kept) for code that uses diffusers directly.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from myutils.errors import UserError, run_cli  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("lora", help="a LoRA file or the folder holding pytorch_lora_weights.safetensors")
    p.add_argument("output_dir")
    args = p.parse_args(argv)
    from diffusers import StableDiffusionXLInpaintPipeline

    from myutils.models import LORA_WEIGHTS, read_lora

    state, metadata = read_lora(args.lora, flag="lora")
    if os.path.abspath(os.path.join(args.output_dir, LORA_WEIGHTS)) == os.path.abspath(
            args.lora if os.path.isfile(args.lora) else os.path.join(args.lora, LORA_WEIGHTS)):
        raise UserError(f"{args.output_dir}: the output would overwrite the input; give another folder")
    config = {k[len("unet."):]: v for k, v in (metadata or {}).items() if k.startswith("unet.")} or None
    StableDiffusionXLInpaintPipeline.save_lora_weights(args.output_dir, unet_lora_layers=state, unet_lora_adapter_metadata=config)
    print(f"{len(state)} LoRA weights -> {os.path.join(args.output_dir, LORA_WEIGHTS)}")
    return os.path.join(args.output_dir, LORA_WEIGHTS)


if __name__ == "__main__":
    run_cli(main)
