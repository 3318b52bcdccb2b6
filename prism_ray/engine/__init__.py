"""The counterfactual editing method: DDIM/null-text inversion, prompt-to-prompt control, the editor."""
