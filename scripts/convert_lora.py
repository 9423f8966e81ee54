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
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from myutils.errors import UserError, run_cli  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("lora", help="a LoRA file or the folder holding pytorch_lora_weights.safetensors")
    p.add_argument("output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace a LoRA file already in output_dir")
    args = p.parse_args(argv)
    from diffusers import StableDiffusionXLInpaintPipeline

    from myutils.errors import output_folder
    from myutils.models import LORA_WEIGHTS, MODEL_RECORD, read_lora

    state, metadata = read_lora(args.lora, flag="lora")
    source = os.path.realpath(args.lora if os.path.isfile(args.lora) else os.path.join(args.lora, LORA_WEIGHTS))
    out = os.path.join(args.output_dir, LORA_WEIGHTS)
    if os.path.realpath(out) == source:  # through a link too: the input would be rewritten as it is read
        raise UserError(f"{args.output_dir}: the output would overwrite the input {source}; give another folder")
    output_folder(args.output_dir, "output_dir")
    if os.path.lexists(out) and not args.overwrite:
        raise UserError(f"{out}: exists; --overwrite replaces it")
    config = {k[len("unet."):]: v for k, v in (metadata or {}).items() if k.startswith("unet.")} or None
    StableDiffusionXLInpaintPipeline.save_lora_weights(args.output_dir, unet_lora_layers=state, unet_lora_adapter_metadata=config)
    record = os.path.join(os.path.dirname(source), MODEL_RECORD)
    if os.path.isfile(record):  # still the same kind of model (an LCM student stays one)
        shutil.copyfile(record, os.path.join(args.output_dir, MODEL_RECORD))
    print(f"{len(state)} LoRA weights -> {out}")
    return out


if __name__ == "__main__":
    run_cli(main)
