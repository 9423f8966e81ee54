#!/usr/bin/env python
"""Write a tiny random-init SDXL-inpainting (or FLUX.1-Fill) pipeline in the Hugging Face folder layout.

    python scripts/make_tiny_models.py --out models/tiny                      # random init (tests)
    python scripts/make_tiny_models.py --out models/toy --prediction_type v_prediction \
        --vae_train_meta data/toy_train/meta.json --vae_steps 1200              # toy world (demo)
    python scripts/make_tiny_models.py --out models/toy_flux --family flux-fill \
        --vae_train_meta data/toy_train/meta.json --vae_steps 300               # flow-matching toy

The folder loads with AutoPipelineForInpainting.from_pretrained(out) (FluxFillPipeline for flux-fill). With --vae_train_meta the VAE
is first fitted to the toy images so latents reconstruct them (random VAE latents carry no image).
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from myutils.args import NONNEGATIVE, SEED, integer  # noqa: E402
from myutils.errors import UserError, run_cli  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--out", required=True)
    p.add_argument("--family", choices=["sdxl", "flux-fill"], default="sdxl")
    p.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon",
                   help="SDXL-inpainting is epsilon; the toy remover learns much faster with v")
    p.add_argument("--image_size", type=integer(16), default=32)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--vae_train_meta", default=None, help="toy meta.json whose images the VAE is fitted to")
    p.add_argument("--vae_steps", type=NONNEGATIVE, default=1200)
    args = p.parse_args(argv)
    if args.vae_train_meta and not os.path.isfile(args.vae_train_meta):
        raise UserError(f"--vae_train_meta {args.vae_train_meta}: file not found")

    from toy_world.data import load_toy_images
    from toy_world.models import tiny_flux_fill_pipeline, tiny_pipeline, train_toy_vae

    with tempfile.TemporaryDirectory() as tmp:
        if args.family == "flux-fill":
            pipe = tiny_flux_fill_pipeline(args.image_size, args.seed, tmp_dir=tmp)
        else:
            pipe = tiny_pipeline(args.prediction_type, args.image_size, args.seed, tmp_dir=tmp)
    if args.vae_train_meta:
        images = load_toy_images(args.vae_train_meta)
        psnr, secs = train_toy_vae(pipe.vae, images, steps=args.vae_steps, seed=args.seed)
        print(f"toy VAE: held-out PSNR {psnr:.1f} dB after {args.vae_steps} steps ({secs:.0f} s), "
              f"scaling_factor {pipe.vae.config.scaling_factor:.4f}")
    pipe.save_pretrained(args.out)
    net = pipe.transformer if args.family == "flux-fill" else pipe.unet
    what = "flow transformer" if args.family == "flux-fill" else f"UNet, prediction_type {args.prediction_type}"
    print(f"wrote {args.out} ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, {what})")


if __name__ == "__main__":
    run_cli(main)
