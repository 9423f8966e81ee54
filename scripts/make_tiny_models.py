#!/usr/bin/env python
"""Write a tiny random-init SDXL-inpainting pipeline in the Hugging Face folder layout.

    python scripts/make_tiny_models.py --out models/tiny                      # random init (tests)
    python scripts/make_tiny_models.py --out models/toy --prediction_type v_prediction \
        --vae_train_meta data/toy_train/meta.json --vae_steps 1200              # toy world (demo)

The folder loads with AutoPipelineForInpainting.from_pretrained(out). With --vae_train_meta the VAE
is first fitted to the toy images so latents reconstruct them (random VAE latents carry no image).
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from myutils.errors import UserError, run_cli  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--out", required=True)
    p.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon",
                   help="SDXL-inpainting is epsilon; the toy remover learns much faster with v")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae_train_meta", default=None, help="toy meta.json whose images the VAE is fitted to")
    p.add_argument("--vae_steps", type=int, default=1200)
    args = p.parse_args(argv)
    if args.vae_train_meta and not os.path.isfile(args.vae_train_meta):
        raise UserError(f"--vae_train_meta {args.vae_train_meta}: file not found")

    from myutils.toy_world import load_toy_images, tiny_pipeline, train_toy_vae

    with tempfile.TemporaryDirectory() as tmp:
        pipe = tiny_pipeline(args.prediction_type, args.image_size, args.seed, tmp_dir=tmp)
    if args.vae_train_meta:
        images = load_toy_images(args.vae_train_meta)
        psnr, secs = train_toy_vae(pipe.vae, images, steps=args.vae_steps, seed=args.seed)
        print(f"toy VAE: held-out PSNR {psnr:.1f} dB after {args.vae_steps} steps ({secs:.0f} s), "
              f"scaling_factor {pipe.vae.config.scaling_factor:.4f}")
    pipe.save_pretrained(args.out)
    n = sum(p.numel() for p in pipe.unet.parameters())
    print(f"wrote {args.out} (UNet {n / 1e6:.2f}M parameters, prediction_type {args.prediction_type})")


if __name__ == "__main__":
    run_cli(main)
