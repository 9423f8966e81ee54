#!/usr/bin/env python
"""What the 4-step student saves at inference, and what each reward source costs in training.

    .venv/bin/python bench/bench_lcm.py            # about 3 minutes on 2 CPU cores

1. Inference: the same inputs through the tiny pipeline with the stock scheduler at --many_steps
   steps and with an LCMScheduler at 4 steps (LoRA fused): seconds per image and the ratio.
2. Training: train_RORem_lcm.py's own loop for plain LCM and each --reward_source (data, teacher,
   student), each run twice (few and more steps) so set-up cancels out: seconds per step and the
   ratio to plain LCM. Ratios from one run, since absolute times on a shared machine are noise.
"""
import argparse
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_RORem_lcm  # noqa: E402
from myutils.discriminator_files import add_discriminator_lora, save_discriminator  # noqa: E402
from pipelines.inpaint import count_unet_calls, load_remover, remove_objects  # noqa: E402
from toy_world.data import write_toy_dataset  # noqa: E402
from toy_world.models import tiny_pipeline  # noqa: E402


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_seconds(argv):
    reset_accelerate()
    start = time.perf_counter()
    train_RORem_lcm.main(argv)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=64, help="pixels (the tiny VAE halves it)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--many_steps", type=int, default=50)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--steps", type=int, nargs=2, default=[3, 13], help="the two training lengths whose difference is timed")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = tempfile.mkdtemp(prefix="bench_lcm_")
    model = os.path.join(work, "pipe")
    tiny_pipeline("epsilon", image_size=args.resolution, tmp_dir=os.path.join(work, "tok")).save_pretrained(model)
    meta = write_toy_dataset(os.path.join(work, "toy"), num=64, resolution=args.resolution, seed=0)
    from diffusers import UNet2DConditionModel

    from model.unet_sdxl_discriminator import UNetSDXLDiscriminator

    disc = UNetSDXLDiscriminator.from_unet(UNet2DConditionModel.from_pretrained(model, subfolder="unet"))
    add_discriminator_lora(disc)
    save_discriminator(disc, os.path.join(work, "disc"), lora=True)

    common = ["--pretrained_model_name_or_path", model, "--meta_path", meta, "--resolution", str(args.resolution),
              "--train_batch_size", str(args.batch), "--report_to", "none", "--checkpointing_steps", "0", "--lora_rank", "16",
              "--w_min", "1", "--w_max", "3"]
    per_step = {}
    for name, extra in [("plain LCM", []), ("reward: data", ["--reward_source", "data"]),
                        ("reward: teacher", ["--reward_source", "teacher"]), ("reward: student", ["--reward_source", "student"])]:
        if extra:
            extra = extra + ["--discriminator_path", os.path.join(work, "disc"), "--weighting", "softmax"]
        t = [train_seconds(common + extra + ["--output_dir", os.path.join(work, f"{name}-{n}"), "--max_train_steps", str(n)])
             for n in args.steps]
        per_step[name] = (t[1] - t[0]) / (args.steps[1] - args.steps[0])
    lora_dir = os.path.join(work, f"plain LCM-{args.steps[1]}")

    from myutils.img_util import load_image, load_mask
    from myutils.data import read_meta

    entries = read_meta(meta, "triplet")[: args.images]
    images = [load_image(e.paths["source"]) for e in entries]
    masks = [load_mask(e.paths["mask"]) for e in entries]
    speed = {}
    for name, steps, lora, sched in [(f"{args.many_steps}-step teacher", args.many_steps, None, "default"),
                                     ("4-step LCM student", 4, lora_dir, "lcm")]:
        spec = SimpleNamespace(pretrained_model=model, RORem_unet=None, lora_path=lora, fuse_lora=True, scheduler=sched, variant=None,
                               prompt="", negative_prompt="", resolution=args.resolution, inference_steps=steps, strength=1.0,
                               guidance_scale=1.0)
        pipe, cond, uncond = load_remover(spec, "cpu", torch.float32)
        calls = count_unet_calls(pipe)
        remove_objects(pipe, cond, uncond, images[:2], masks[:2], spec, 0)  # warm-up
        start = time.perf_counter()
        for i in range(0, len(images), 8):
            remove_objects(pipe, cond, uncond, images[i:i + 8], masks[i:i + 8], spec, i)
        speed[name] = ((time.perf_counter() - start) / len(images), calls[0])

    print(f"\ninference, {args.images} images at {args.resolution} px, batch 8, tiny UNet, 2 CPU cores:")
    (n1, (s1, c1)), (n2, (s2, c2)) = speed.items()
    print(f"  {n1}: {s1 * 1000:.1f} ms/image;  {n2}: {s2 * 1000:.1f} ms/image;  ratio {s1 / s2:.1f}x "
          f"(UNet calls {c1} vs {c2}, including the warm-up)")
    print(f"training step, batch {args.batch}, {args.resolution} px (time of {args.steps[1]} steps minus {args.steps[0]}):")
    base = per_step["plain LCM"]
    for name, sec in per_step.items():
        print(f"  {name:16s} {sec * 1000:7.1f} ms/step   {sec / base:.2f}x plain")


if __name__ == "__main__":
    main()
