"""Tests for prism_ray.scoring.clip_score with a tiny random CLIPModel and a small trained BPE tokenizer."""

import json
import string

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from prism_ray.scoring.clip_score import CLIP_MEAN, CLIP_STD, ClipScorer, FilterThresholds

WORDS = (
    "a chest x-ray of man woman with pacemaker pleural effusion cardiomegaly no finding support devices"
).split()


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, trainers
    from transformers import CLIPTokenizer

    special = ["<|startoftext|>", "<|endoftext|>"]
    reference = CLIPTokenizer()  # empty vocab: borrow CLIP's normaliser and pre-tokeniser
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=special[1]))
    bpe.normalizer = reference.backend_tokenizer.normalizer
    bpe.pre_tokenizer = reference.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=300,  # a few hundred: every letter (alone and word-final) plus merges up to whole words
        special_tokens=special,
        end_of_word_suffix="</w>",
        initial_alphabet=list(string.ascii_lowercase + string.punctuation),
        show_progress=False,
    )
    # Single characters as words give every letter its "x</w>" token, so any lowercase word encodes.
    bpe.train_from_iterator(WORDS * 5 + list(string.ascii_lowercase + string.punctuation), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=77)


@pytest.fixture(scope="module")
def clip_model(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


@pytest.fixture(scope="module")
def scorer(clip_model, tokenizer):
    return ClipScorer(clip_model, tokenizer, batch_size=2)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    orig = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    cf = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    return orig, cf


ORIG_PROMPTS = ["a chest x-ray of a man", "a chest x-ray of a woman", "a chest x-ray of a man"]
EDIT_PROMPTS = [
    "a chest x-ray of a woman",
    "a chest x-ray of a man with pacemaker",
    "a chest x-ray of a man with pleural effusion",
]


def _by_hand(model, tokenizer, orig, cf):
    """Raw get_image_features / get_text_features, normalised and combined in plain torch."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def img(x):  # 32x32 inputs: CLIP's resize/crop is the identity, only normalisation remains
        pix = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - mean) / std
        return model.get_image_features(pixel_values=pix).pooler_output

    def txt(p):
        tok = tokenizer(p, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out = model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        return out.pooler_output  # transformers 5: the projected embedding

    with torch.no_grad():
        i0, i1 = F.normalize(img(orig), dim=-1), F.normalize(img(cf), dim=-1)
        t0, t1 = F.normalize(txt(ORIG_PROMPTS), dim=-1), F.normalize(txt(EDIT_PROMPTS), dim=-1)
    return {
        "s_clip": F.cosine_similarity(i1 - i0, t1 - t0, dim=-1).numpy(),
        "clip_image_image": (i0 * i1).sum(-1).numpy(),
        "clip_image_text": (i1 * t1).sum(-1).numpy(),
    }


def test_image_size_read_from_config(scorer):
    assert scorer.image_size == 32


def test_scores_match_hand_computation(scorer, clip_model, tokenizer, images):
    orig, cf = images
    expected = _by_hand(clip_model, tokenizer, orig, cf)
    scores = scorer.score(orig, cf, ORIG_PROMPTS, EDIT_PROMPTS)
    assert set(scores) == {"s_clip", "clip_image_image", "clip_image_text"}
    for key, value in expected.items():
        assert scores[key].shape == (3,)
        np.testing.assert_allclose(scores[key], value, atol=1e-5, err_msg=key)
    s_clip = scorer.s_clip(orig, cf, ORIG_PROMPTS, EDIT_PROMPTS)
    np.testing.assert_allclose(s_clip, expected["s_clip"], atol=1e-5)
    image_image = scorer.image_image_similarity(orig, cf)
    np.testing.assert_allclose(image_image, expected["clip_image_image"], atol=1e-5)
    image_text = scorer.image_text_similarity(cf, EDIT_PROMPTS)
    np.testing.assert_allclose(image_text, expected["clip_image_text"], atol=1e-5)


def test_text_embeds_dedupe_repeated_prompts(scorer, clip_model):
    calls = []
    original = clip_model.get_text_features

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    clip_model.get_text_features = counting
    try:
        emb = scorer.text_embeds(ORIG_PROMPTS + ORIG_PROMPTS)
    finally:
        del clip_model.get_text_features
    assert sum(calls) == 2  # two distinct prompts
    assert emb.shape == (6, 16)
    torch.testing.assert_close(emb[0], emb[2])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(6))


def test_identical_images_give_zero_s_clip(scorer, images):
    orig, _ = images
    s = scorer.s_clip(orig, orig.copy(), ORIG_PROMPTS, EDIT_PROMPTS)
    assert not np.isnan(s).any()
    np.testing.assert_array_equal(s, 0.0)
    assert not FilterThresholds().accept({"s_clip": s}).any()


def test_grayscale_equals_replicated_rgb(scorer, images):
    gray = images[0][..., 0]  # (N, H, W)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    torch.testing.assert_close(scorer.image_embeds(gray), scorer.image_embeds(rgb))
    torch.testing.assert_close(scorer.image_embeds(gray[..., None]), scorer.image_embeds(rgb))


def test_preprocess_resizes_shorter_side_and_center_crops(scorer):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(2, 48, 80, 3), dtype=np.uint8)
    out = scorer.preprocess(x)
    assert out.shape == (2, 3, 32, 32)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    t = F.interpolate(t, size=(32, 53), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    t = t[..., :, 10:42]  # (53 - 32) / 2 = 10.5 -> 10
    expected = (t - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)
    # A uniform image stays uniform through the antialiased resize.
    flat = scorer.preprocess(np.full((1, 64, 40), 200, np.uint8))
    expected_value = (200 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(flat[0, :, 0, 0], expected_value)
    assert torch.allclose(flat, flat[:, :, :1, :1].expand_as(flat))


def test_input_errors(scorer, images):
    orig, cf = images
    with pytest.raises(ValueError, match="uint8"):
        scorer.preprocess(orig.astype(np.float32))
    with pytest.raises(ValueError, match="edit_prompts"):
        scorer.s_clip(orig, cf, ORIG_PROMPTS, EDIT_PROMPTS[:2])
    with pytest.raises(ValueError, match="differ"):
        scorer.score(orig, cf[:2], ORIG_PROMPTS, EDIT_PROMPTS)


def test_filter_thresholds_accept_and_reject():
    scores = {
        "s_clip": np.array([0.05, 0.1, 0.3, 0.5, np.nan]),
        "clip_image_image": np.array([0.9, 0.9, 0.6, 0.8, 0.9]),
        "clip_image_text": np.array([0.3, 0.3, 0.3, 0.1, 0.3]),
    }
    np.testing.assert_array_equal(FilterThresholds().accept(scores), [False, True, True, True, False])
    lance_like = FilterThresholds(s_clip_min=0.2, image_image_min=0.7, image_text_min=0.2)
    np.testing.assert_array_equal(lance_like.accept(scores), [False, False, False, False, False])
    np.testing.assert_array_equal(
        FilterThresholds(image_image_min=0.7).accept(scores), [False, True, False, True, False]
    )
    with pytest.raises(ValueError, match="clip_image_text"):
        FilterThresholds(image_text_min=0.2).accept({"s_clip": scores["s_clip"]})
    with pytest.raises(ValidationError):
        FilterThresholds(s_clip=0.2)  # unknown field


def test_filter_rejects_sources_that_did_not_invert():
    errors = np.array([1e-4, 2e-3, np.nan, 1e-4])
    scores = {"s_clip": np.array([0.3, 0.3, 0.3, 0.05]), "reconstruction_error": errors}
    np.testing.assert_array_equal(FilterThresholds().accept(scores), [True, True, True, False])  # off: PRISM
    strict = FilterThresholds(reconstruction_error_max=1e-3)
    np.testing.assert_array_equal(strict.accept(scores), [True, False, False, False])
    with pytest.raises(ValueError, match="reconstruction_error"):
        strict.accept({"s_clip": scores["s_clip"]})
    with pytest.raises(ValidationError):
        FilterThresholds(reconstruction_error_max=-1.0)


def test_from_components_uses_the_loader_bundle(clip_model, tokenizer, images):
    from pathlib import Path

    from prism_ray.models.loading import ClipComponents

    bundle = ClipComponents(clip_model, tokenizer, 32, Path("."), torch.device("cpu"))
    s = ClipScorer.from_components(bundle)
    assert s.image_size == 32 and s.device == torch.device("cpu")
    orig, cf = images
    direct = ClipScorer(clip_model, tokenizer).image_image_similarity(orig, cf)
    np.testing.assert_allclose(s.image_image_similarity(orig, cf), direct, atol=1e-6)
