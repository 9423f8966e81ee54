"""Shared parts of the RORem-RL scripts: data, conditioning, model loading, training plumbing."""
