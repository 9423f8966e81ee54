"""Samplers over the models, built on myutils/: the inference path every script shares (inpaint.py) and the
online-RL samplers that record log-probs (rl_sampler.py for SDXL, flow_inpaint.py for FLUX-Fill)."""
