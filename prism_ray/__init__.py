"""prism_ray: PRISM counterfactual medical images (null-text inversion + prompt-to-prompt) at cluster scale on Ray."""

__version__ = "0.1.0"
