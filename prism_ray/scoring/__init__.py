"""CLIP scores, the accept filter, metrics."""
