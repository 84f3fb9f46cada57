"""Model, loss, training loop and evaluation: composes kernels, pipelines and models."""
