"""The training plumbing every train_*.py shares, above myutils/ and pipelines/: config.py (arguments,
YAML configs), prepare.py (accelerator, data, components, optimizer), adapters.py (LoRA), loop.py
(TrainingRun), checkpoint.py (save, resume, final save), validation.py, and the online-RL loop
(rl_loop.py, rl_pairs.py). The math of each method is in myutils/."""
