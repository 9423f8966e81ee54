#!/usr/bin/env python
"""Remove objects in 4 steps with a latent-consistency LoRA from train_RORem_lcm.py.

    python inference_RORem_4S.py --pretrained_model diffusers/stable-diffusion-xl-1.0-inpainting-0.1 \
        --RORem_unet path/to/RORem_unet --RORem_LoRA path/to/RORem_LCM_lora \
        --image_path input.png --mask_path mask.png --inference_steps 4 --save_path result.png

inference_RORem.py with an LCMScheduler, the LoRA fused into the UNet, 4 steps, strength 1.0 and
guidance 1; every input mode and option of inference_RORem.py works the same (one image, a
meta.json, a folder; any size; pasted back). Prints how many UNet calls ran: diffusers runs
int(steps * strength) steps, so --strength 0.99 with 4 steps makes 3 calls.
"""
import inference_RORem
from myutils.errors import run_cli


def main(argv=None):
    return inference_RORem.main(argv, four_step=True)


if __name__ == "__main__":
    run_cli(main)
