"""Prompt-to-prompt token bookkeeping (hand-computed mappers) and the attention processors on the tiny U-Net."""

from __future__ import annotations

import pytest
import torch

from prism_ray.engine import seq_aligner as sa
from prism_ray.engine.attention import (
    AttentionController,
    ControlState,
    RefineControl,
    ReplaceControl,
    ReweightControl,
    blend_layers,
    controlled,
    controlled_layer_names,
)

# With the tiny tokenizer every caption word is one token, "x-ray" is three ("x", "-", "ray") and a
# trailing "." is its own token: BOS=0, then words from position 1.


def test_word_spans_and_lookup(tiny_sd):
    tok = tiny_sd.tokenizer
    assert sa.word_spans("a chest x-ray showing cardiomegaly.", tok) == [[1], [2], [3, 4, 5], [6], [7, 8]]
    assert sa.word_token_indices("a chest x-ray of a male patient", "a", tok) == [1, 7]
    assert sa.word_token_indices("a chest x-ray of a male patient", "x-ray", tok) == [3, 4, 5]
    assert sa.word_token_indices("a chest x-ray showing cardiomegaly.", "cardiomegaly.", tok) == [7, 8]


def test_missing_word_is_an_error_naming_word_and_prompt(tiny_sd):
    with pytest.raises(ValueError, match=r"'cardiomegaly'.*'a chest x-ray showing cardiomegaly\.'"):
        sa.word_token_indices("a chest x-ray showing cardiomegaly.", "cardiomegaly", tiny_sd.tokenizer)


def test_replace_mapper_same_token_counts_is_identity(tiny_sd):
    mapper = sa.replace_mapper("a chest x-ray showing edema", "a chest x-ray showing effusion", tiny_sd.tokenizer)
    assert torch.equal(mapper, torch.eye(77))


def test_replace_mapper_multi_token_word(tiny_sd):
    tok = tiny_sd.tokenizer
    # "x-ray" (tokens 2, 3, 4) -> "radiograph" (token 2): each source token maps fully onto it,
    # then EOS/padding continue in order: source 5 -> edit 3, ..., source 76 -> edit 74.
    expected = torch.zeros(77, 77)
    expected[0, 0] = expected[1, 1] = 1
    expected[2, 2] = expected[3, 2] = expected[4, 2] = 1
    for i in range(5, 77):
        expected[i, i - 2] = 1
    assert torch.equal(sa.replace_mapper("a x-ray", "a radiograph", tok), expected)
    # The other way: one source token spread as 1/3 over the three edit tokens.
    expected = torch.zeros(77, 77)
    expected[0, 0] = expected[1, 1] = 1
    expected[2, 2] = expected[2, 3] = expected[2, 4] = 1 / 3
    for i in range(3, 75):
        expected[i, i + 2] = 1
    assert torch.equal(sa.replace_mapper("a radiograph", "a x-ray", tok), expected)
    with pytest.raises(ValueError, match="same number of words"):
        sa.replace_mapper("a x-ray", "a chest x-ray", tok)


def test_needleman_wunsch_hand_example():
    # Insertion: y = x with 7 inserted.
    assert sa.global_align([0, 5, 6, 1], [0, 5, 7, 6, 1]) == [0, 1, -1, 2, 3]
    # Substitution: mismatch (-1) never beats two gaps (0): 6 is inserted, 5 deleted.
    assert sa.global_align([0, 5, 1], [0, 6, 1]) == [0, -1, 2]
    # Duplicate in x. DP table (rows x = -,0,5,5,1; cols y = -,0,5,1), ties left > up > diagonal:
    #   row 0: 0 0 0 0 | row 1: 0 1 1 1 | row 2: 0 1 2 2 | row 3: 0 1 2 2 | row 4: 0 1 2 3
    # trace back (4,3) diag, (3,2) up (drop the second 5), (2,2) diag, (1,1) diag: y's 5 -> x[1].
    assert sa.global_align([0, 5, 5, 1], [0, 5, 1]) == [0, 1, 3]


def test_refine_mapper(tiny_sd):
    tok = tiny_sd.tokenizer
    # [BOS a chest x - ray EOS] -> [BOS a chest x - ray showing cardiomegaly EOS]
    mapper, alphas = sa.refine_mapper("a chest x-ray", "a chest x-ray showing cardiomegaly", tok)
    expected_mapper = torch.arange(77)
    expected_mapper[:9] = torch.tensor([0, 1, 2, 3, 4, 5, 0, 0, 6])
    expected_alphas = torch.ones(77)
    expected_alphas[6:8] = 0
    assert torch.equal(mapper, expected_mapper) and torch.equal(alphas, expected_alphas)
    # A substitution is an insertion for refine: "female" keeps its own attention.
    mapper, alphas = sa.refine_mapper("a male patient", "a female patient", tok)
    assert mapper[:5].tolist() == [0, 1, 0, 3, 4] and alphas[:5].tolist() == [1, 1, 0, 1, 1]
    assert torch.equal(mapper[5:], torch.arange(5, 77)) and bool((alphas[5:] == 1).all())


def test_equalizer(tiny_sd):
    eq = sa.equalizer("a chest x-ray showing cardiomegaly", ["x-ray", "cardiomegaly"], 2.0, tiny_sd.tokenizer)
    expected = torch.ones(77)
    expected[[3, 4, 5, 7]] = 2.0
    assert torch.equal(eq, expected)
    with pytest.raises(ValueError, match="'pacemaker'"):
        sa.equalizer("a chest x-ray", ["pacemaker"], 2.0, tiny_sd.tokenizer)


def test_alpha_table_windows(tiny_sd):
    tok = tiny_sd.tokenizer
    prompts = ["a chest x-ray showing cardiomegaly", "a chest x-ray"]
    table = sa.cross_replace_alphas(4, prompts, 0.8, tok)  # T + 1 = 5 rows; [0, int(0.8 * 5)) = [0, 4)
    assert table.shape == (5, 2, 1, 1, 77)
    assert table[:, :, 0, 0, :].amax(-1).tolist() == [[1, 1], [1, 1], [1, 1], [1, 1], [0, 0]]
    table = sa.cross_replace_alphas(4, prompts, {"default_": 1.0, "cardiomegaly": (0.2, 0.6)}, tok)
    assert table[:, 0, 0, 0, 7].tolist() == [0, 1, 1, 0, 0]  # [int(0.2 * 5), int(0.6 * 5)) = [1, 3)
    assert bool((table[:, 0, 0, 0, :7] == 1).all()) and bool((table[:, 1] == 1).all())
    with pytest.raises(ValueError, match="'pacemaker'"):
        sa.cross_replace_alphas(4, prompts, {"pacemaker": 0.5}, tok)
    assert sa.step_window(0.5, 4) == (0, 2) and sa.step_window((0.25, 0.75), 4) == (1, 3)


def test_cross_controls_match_their_formulas():
    torch.manual_seed(0)
    n, k, h, q = 2, 2, 3, 4
    probs = torch.rand(n, k + 1, h, q, 77).softmax(-1)
    src, own = probs[:, 0], probs[:, 1:]
    perm = torch.stack([torch.stack([torch.randperm(77) for _ in range(k)]) for _ in range(n)])  # (N, K, 77)
    onehot = torch.nn.functional.one_hot(perm, 77).float().transpose(-1, -2)  # mapper[w, n] = 1 if perm[n] == w
    alphas = (torch.rand(n, k, 77) > 0.5).float()
    eq = 1 + torch.rand(n, k, 77)
    replaced = ReplaceControl(onehot)(src, own)
    refined = RefineControl(perm, alphas)(src, own)
    reweighted = ReweightControl(eq, RefineControl(perm, alphas))(src, own)
    for i in range(n):
        for e in range(k):
            gathered = src[i][..., perm[i, e]]
            torch.testing.assert_close(replaced[i, e], gathered)
            mixed = gathered * alphas[i, e] + own[i, e] * (1 - alphas[i, e])
            torch.testing.assert_close(refined[i, e], mixed)
            torch.testing.assert_close(reweighted[i, e], mixed * eq[i, e])  # no renormalisation
    torch.testing.assert_close(ReweightControl(eq)(src, own), src[:, None] * eq[:, :, None, None, :])


def _controller(n: int, k: int, steps: int, cross=None, self_window=(0, 0), alpha=1.0) -> AttentionController:
    return AttentionController(
        num_images=n,
        num_edits=k,
        cross=cross,
        cross_alpha=torch.full((steps + 1, n, k, 1, 1, 77), alpha),
        self_window=self_window,
    )


def _inputs(n_branches: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_branches, 4, 16, 16, generator=g)
    context = torch.randn(n_branches, 77, 32, generator=g)
    return torch.cat([z, z]), torch.cat([torch.zeros_like(context), context])


@torch.no_grad()
def test_every_attention_layer_is_controlled_and_fused_path_matches(tiny_sd):
    unet = tiny_sd.unet
    names = controlled_layer_names(unet)
    assert len(names) == 14
    assert sum(".attn1." in n for n in names) == 7 and sum(".attn2." in n for n in names) == 7
    z, context = _inputs(2)
    reference = unet(z, 500, encoder_hidden_states=context).sample
    # Outside every window the processors take the fused path only: same output as diffusers' own.
    state = ControlState()
    ctl = _controller(1, 1, 4, cross=ReweightControl(torch.ones(1, 1, 77)), alpha=0.0)
    with controlled(unet, ctl, state) as installed:
        out = unet(z, 500, encoder_hidden_states=context).sample
    assert installed == names and state.layers_called == set(names) and state.explicit_calls == 0
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    # Inside the windows (self: 16x16 and 8x8 maps are <= 32^2 queries) every layer materialises maps.
    state = ControlState()
    ctl = _controller(1, 1, 4, cross=ReweightControl(torch.ones(1, 1, 77)), self_window=(0, 4))
    with controlled(unet, ctl, state):
        controlled_out = unet(z, 500, encoder_hidden_states=context).sample
    assert state.explicit_calls == 14
    # Identity control of two different branches: the edit branch now follows the source's maps.
    assert not torch.allclose(controlled_out[1::2], reference[1::2], atol=1e-4)


@torch.no_grad()
def test_identical_branches_stay_identical_under_control(tiny_sd):
    unet = tiny_sd.unet
    z, context = _inputs(1)
    z, context = z.repeat_interleave(2, 0), context.repeat_interleave(2, 0)  # [u, u, c, c]: src == edit
    mapper, alphas = torch.arange(77)[None, None], torch.ones(1, 1, 77)
    ctl = _controller(1, 1, 4, cross=ReweightControl(torch.ones(1, 1, 77), RefineControl(mapper, alphas)),
                      self_window=(0, 4))
    with controlled(unet, ctl, ControlState()):
        out = unet(z, 500, encoder_hidden_states=context).sample
    torch.testing.assert_close(out[3], out[2], atol=1e-6, rtol=0)


def test_controlled_restores_processors_even_on_error(tiny_sd):
    unet = tiny_sd.unet
    before = unet.attn_processors
    with pytest.raises(RuntimeError, match="batch of"):
        with controlled(unet, _controller(1, 1, 4), ControlState()):
            assert all(type(p).__name__ == "PromptToPromptProcessor" for p in unet.attn_processors.values())
            z, context = _inputs(3)  # 6 rows, but the controller expects 2 x (1 x 2) = 4
            unet(z, 500, encoder_hidden_states=context)
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_controlled_raises_on_zero_layers():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32,),
        down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), mid_block_type=None,
        cross_attention_dim=32, norm_num_groups=32,
    )
    with pytest.raises(RuntimeError, match="nothing to control"):
        with controlled(unet, _controller(1, 1, 4), ControlState()):
            pass


def test_blend_layers_of_the_tiny_unet(tiny_sd):
    # 16x16 latents: cross-attention at 16 (down 0, up 1) and 8 (down 1, mid, up 0); 16 // 4 = 4 does
    # not exist, so the finest size below the latent size, 8, is used.
    layers, side = blend_layers(tiny_sd.unet, 16)
    assert side == 8
    assert layers == {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
        "mid_block.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor",
    }
