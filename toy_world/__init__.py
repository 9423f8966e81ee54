"""The toy world: procedural data (data.py) and tiny models (models.py) that learn in minutes on a CPU."""
