"""Diffusion training step and callbacks."""
