"""Prompt -> CLIP text embeddings (the U-Net's cross-attention context), with repeated prompts encoded once."""

from __future__ import annotations

import torch


@torch.no_grad()
def encode_prompts(
    tokenizer,
    text_encoder,
    prompts: list[str],
    cache: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Prompts -> (N, 77, D): the text encoder's last hidden state for prompts padded/truncated to 77 tokens.

    Each distinct prompt is encoded once per call; pass `cache` (a plain dict, owned by the caller)
    to also reuse embeddings across calls, e.g. the source prompt shared by several edits.
    """
    if isinstance(prompts, str):
        raise ValueError("prompts: expected a list of strings, got a single string")
    if not prompts:
        raise ValueError("prompts: empty list")
    cache = {} if cache is None else cache
    missing = [p for p in dict.fromkeys(prompts) if p not in cache]
    if missing:
        ids = tokenizer(
            missing,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids  # (M, 77)
        hidden = text_encoder(ids.to(text_encoder.device))[0]  # (M, 77, D) last_hidden_state
        for prompt, row in zip(missing, hidden, strict=True):
            cache[prompt] = row
    return torch.stack([cache[p] for p in prompts])  # (N, 77, D)


def null_embedding(tokenizer, text_encoder, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """(1, 77, D): the embedding of the empty prompt "", where null-text optimisation starts."""
    return encode_prompts(tokenizer, text_encoder, [""], cache)
