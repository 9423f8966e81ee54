"""The shared library under the scripts, pipelines and training plumbing: data, images, conditioning,
model and weight loading, metrics, and one module per method's math. Imports nothing above it."""
