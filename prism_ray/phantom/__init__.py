"""Synthetic phantom chest X-rays: renderer, datasets, ground truth, the tiny-family trainer."""
