"""Offline stand-ins for real data and checkpoints: the rendered world of shapes, its CPU
trainer, and the tiny random Stable Diffusion the tests use."""
