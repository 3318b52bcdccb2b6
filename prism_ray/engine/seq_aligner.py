"""Prompt-to-prompt token bookkeeping: word -> token indices, Replace/Refine mappers, equalizers, alpha tables.

The method is Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention Control"; the
conventions below (how words are located, the Needleman-Wunsch scores and tie-breaking, the shape of
the time/word alpha table) follow the google/prompt-to-prompt reference code (`ptp_utils.py`,
`seq_aligner.py`) so that the numbers match. The code is written from the paper and docs/method.md §9.

Token positions are those of the 77-token CLIP context: 0 = BOS, words start at 1, EOS after them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from prism_ray.engine.settings import Window, window_bounds

MAX_TOKENS = 77  # CLIP context length; every mapper is MAX_TOKENS wide


# --- words -> tokens -------------------------------------------------------------------------


def word_spans(prompt: str, tokenizer, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """Token indices of every word of `prompt` (split on single spaces), in the 77-token context.

    As in the reference: decode the prompt's tokens one by one and accumulate their lengths; a word
    is complete once the accumulated length reaches the word's length. Index 0 is BOS, hence +1.
    Tokens cut off by the context limit (index >= max_tokens - 1, where EOS sits) are dropped.
    """
    words = prompt.split(" ")
    ids = tokenizer.encode(prompt)[1:-1]  # without BOS / EOS
    pieces = [tokenizer.decode([i]).strip() for i in ids]
    spans: list[list[int]] = [[] for _ in words]
    ptr, cur_len = 0, 0
    for position, piece in enumerate(pieces, start=1):
        while ptr < len(words) and len(words[ptr]) == 0:  # '' from a double space holds no token
            ptr += 1
        if ptr >= len(words):
            break
        if position < max_tokens - 1:
            spans[ptr].append(position)
        cur_len += len(piece)
        if cur_len >= len(words[ptr]):
            ptr, cur_len = ptr + 1, 0
    return spans


def word_token_indices(prompt: str, word: str, tokenizer, max_tokens: int = MAX_TOKENS) -> list[int]:
    """Token indices of every occurrence of `word` (exact string match) in `prompt`.

    Raises ValueError naming the word and the prompt when it does not occur (a silent no-op would
    quietly turn an edit into a reconstruction), or when it lies beyond the context limit.
    """
    words = prompt.split(" ")
    if word not in words:
        raise ValueError(f"word {word!r} does not occur in prompt {prompt!r} (exact match of space-separated words)")
    spans = word_spans(prompt, tokenizer, max_tokens)
    indices = [i for w, span in zip(words, spans, strict=True) if w == word for i in span]
    if not indices:
        raise ValueError(f"word {word!r} of prompt {prompt!r} lies beyond the {max_tokens}-token limit")
    return indices


def words_token_indices(prompt: str, words: Sequence[str], tokenizer) -> list[int]:
    """Sorted token indices of several words of one prompt (each must occur)."""
    return sorted({i for word in words for i in word_token_indices(prompt, word, tokenizer)})


# --- Replace ---------------------------------------------------------------------------------


def replace_mapper(source: str, edit: str, tokenizer, max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """(77, 77) matrix M with new_attn[..., n] = sum_w source_attn[..., w] * M[w, n] (Replace edit).

    Both prompts need the same number of words. Equal words (and BOS) map token by token; a changed
    word whose token count differs spreads each source token over the edit word's tokens with weight
    1 / len(edit tokens). After the last word, EOS and padding map in order. (The reference maps the
    tail j -> j after its last *replaced* word, which shifts it when token counts differ; we keep the
    running source position i -> j throughout.)
    """
    source_words, edit_words = source.split(" "), edit.split(" ")
    if len(source_words) != len(edit_words):
        raise ValueError(
            f"replace edit needs the same number of words: {source!r} has {len(source_words)}, "
            f"{edit!r} has {len(edit_words)} (use refine)"
        )
    mapper = torch.zeros(max_tokens, max_tokens)
    mapper[0, 0] = 1.0  # BOS
    i = j = 1
    for src_span, edit_span in zip(word_spans(source, tokenizer, max_tokens), word_spans(edit, tokenizer, max_tokens), strict=True):
        if len(src_span) == len(edit_span):
            for s, e in zip(src_span, edit_span, strict=True):
                mapper[s, e] = 1.0
        elif edit_span:
            for s in src_span:
                mapper[s, edit_span] = 1.0 / len(edit_span)
        i += len(src_span)
        j += len(edit_span)
    while i < max_tokens and j < max_tokens:  # EOS, then padding
        mapper[i, j] = 1.0
        i, j = i + 1, j + 1
    return mapper


# --- Refine ----------------------------------------------------------------------------------

GAP, MATCH, MISMATCH = 0, 1, -1


def global_align(x: Sequence[int], y: Sequence[int], gap: int = GAP, match: int = MATCH, mismatch: int = MISMATCH):
    """Needleman-Wunsch global alignment of two token sequences -> y_to_x: for each y position, the
    aligned x position or -1 (an inserted token).

    Ties are broken as in the reference: gap in x ("left", insert y) over gap in y ("up", delete x)
    over the diagonal, tracing back from the end. With gap 0 and mismatch -1 a substitution is never
    aligned: it becomes a deletion plus an insertion.
    """
    nx, ny = len(x), len(y)
    score = [[0] * (ny + 1) for _ in range(nx + 1)]
    trace = [[0] * (ny + 1) for _ in range(nx + 1)]  # 1 left, 2 up, 3 diagonal, 4 origin
    for j in range(1, ny + 1):
        score[0][j], trace[0][j] = j * gap, 1
    for i in range(1, nx + 1):
        score[i][0], trace[i][0] = i * gap, 2
    trace[0][0] = 4
    for i in range(1, nx + 1):
        for j in range(1, ny + 1):
            left = score[i][j - 1] + gap
            up = score[i - 1][j] + gap
            diag = score[i - 1][j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            best = max(left, up, diag)
            score[i][j] = best
            trace[i][j] = 1 if best == left else 2 if best == up else 3
    y_to_x = [-1] * ny
    i, j = nx, ny
    while i > 0 or j > 0:
        move = trace[i][j]
        if move == 3:
            i, j = i - 1, j - 1
            y_to_x[j] = i
        elif move == 1:
            j -= 1  # y[j] inserted: stays -1
        elif move == 2:
            i -= 1  # x[i] deleted
        else:
            break
    return y_to_x


def refine_mapper(source: str, edit: str, tokenizer, max_tokens: int = MAX_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine edit: (mapper (77,) long, alphas (77,)) over the edit prompt's token positions.

    Aligned tokens (alpha 1) copy the source attention column mapper[n]; inserted tokens (alpha 0)
    keep the edit's own attention (their mapper entry is 0, a harmless in-range index). Positions
    after the edit's EOS (padding) map to themselves with alpha 1, as in the reference.
    """
    x = tokenizer.encode(source)[:max_tokens]  # BOS ... EOS
    y = tokenizer.encode(edit)[:max_tokens]
    y_to_x = global_align(x, y)
    mapper = torch.arange(max_tokens)
    alphas = torch.ones(max_tokens)
    for n, m in enumerate(y_to_x):
        mapper[n] = max(m, 0)
        alphas[n] = float(m >= 0)
    return mapper, alphas


# --- Reweight --------------------------------------------------------------------------------


def equalizer(prompt: str, words: Sequence[str], value: float, tokenizer, max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """(77,) per-token weights: `value` on the tokens of `words` in `prompt`, 1 elsewhere."""
    eq = torch.ones(max_tokens)
    if words:
        eq[words_token_indices(prompt, words, tokenizer)] = float(value)
    return eq


# --- time windows ----------------------------------------------------------------------------


def step_window(window: Window, num_rows: int) -> tuple[int, int]:
    """Windows (docs/method.md §9.2): a fraction f means [0, f); a pair (a, b) means [int(a * T'), int(b * T'))
    with T' = num_rows (T + 1 for the cross-attention alpha table, T for self-attention)."""
    start, end = window_bounds(window)
    return int(start * num_rows), int(end * num_rows)


def cross_replace_alphas(
    num_steps: int,
    edit_prompts: Sequence[str],
    windows: Window | Mapping[str, Window],
    tokenizer,
    max_tokens: int = MAX_TOKENS,
    require_words: bool = True,
) -> torch.Tensor:
    """The time/word alpha table ((T + 1), K, 1, 1, 77) for K edit prompts of one source.

    `windows`: one window for every token, or a dict with `default_` (all tokens; (0, 1) if absent, as
    in the reference) and word keys whose window overrides the default on that word's tokens in each
    edit prompt containing it. A word key found in none of the edit prompts is a ValueError unless
    `require_words` is False (a job-wide table, where a word occurs in some edits only).
    """
    if not isinstance(windows, Mapping):
        windows = {"default_": windows}
    rows = num_steps + 1
    alpha = torch.zeros(rows, len(edit_prompts), max_tokens)
    start, end = step_window(windows.get("default_", (0.0, 1.0)), rows)
    alpha[start:end] = 1.0
    for word, window in windows.items():
        if word == "default_":
            continue
        start, end = step_window(window, rows)
        found = False
        for k, prompt in enumerate(edit_prompts):
            if word not in prompt.split(" "):
                continue
            found = True
            idx = word_token_indices(prompt, word, tokenizer, max_tokens)
            alpha[:, k, idx] = 0.0
            alpha[start:end, k, idx] = 1.0
        if not found and require_words:
            raise ValueError(f"cross_replace_steps word {word!r} occurs in none of the edit prompts {list(edit_prompts)!r}")
    return alpha.reshape(rows, len(edit_prompts), 1, 1, max_tokens)
