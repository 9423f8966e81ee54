#!/usr/bin/env python
"""Reward-weighted LCM distillation: train_RORem_lcm.py with each sample's loss weighted by the
RORem discriminator's score (research plan, direction 3).

    accelerate launch --config_file configs/accelerate_8gpu.yaml train_RORem_lcm_rewarded.py \
        --config configs/lcm_rewarded_config.yaml --pretrained_teacher_unet path/to/RORem_unet \
        --meta_path data/meta.json --discriminator_path path/to/discriminator \
        --reward_temperature 0.5 --reward_threshold 0.5 --output_dir experiment/RORem_LCM_rewarded

The algorithm is train_RORem_lcm.py's, one code path; this entry point requires a discriminator (or
--reward_source labels) and
defaults to soft weighting of data-cached scores. Weightings (myutils/reward_utils.reward_weights):
  --weighting filter      keep samples scoring >= --reward_threshold (weights B / kept)
  --weighting softmax     B * softmax(score / --reward_temperature) over the global batch
  --weighting percentile  mid-rank percentile within the batch (or against --reward_reference)
  --curriculum threshold|temperature  from --curriculum_start to the final value over --curriculum_steps
Score sources (--reward_source): data (each GT scored once before training, cached in
<output_dir>/data_scores.json), teacher (the teacher's guided x0 at the sampled step, on latents),
student (the student's prediction), or labels (each training entry's own meta.json score, an
annotator's verdict: no discriminator needed). A global batch whose weights are all zero makes no update and is
logged as skipped_steps. Logged: score mean/std/histogram, threshold/temperature, weight mean/max,
effective sample size, fraction filtered.
"""
import train_RORem_lcm
from myutils.errors import run_cli


def main(argv=None):
    return train_RORem_lcm.main(argv, rewarded=True)


if __name__ == "__main__":
    run_cli(main)
