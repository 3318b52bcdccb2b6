"""The demographic phantom family: MIMIC-style captions, planted relationships, biased and control U-Net fine-tunes.

    python -m prism_ray.phantom.demographic --variant biased --out DIR
    python -m prism_ray.phantom.demographic --variant control --out DIR

Each command renders phantoms in memory (`phantom.dataset.sample_subjects`), captions them with the
`mimic` adapter ("Chest X-ray of 60-years old female subject with Cardiomegaly, Support Devices"),
caches their VAE latents and fine-tunes only the U-Net of the shipped base family (the VAE and the
text encoder stay frozen during it, as in PRISM). **biased**: pacemakers follow cardiomegaly (the
captions say only "Support Devices") and older subjects have more pleural effusion; **control**: the
same marginal rates, drawn independently.

The base family's captions never named an age or a sex, so its text tower holds untrained embeddings
for those words (SD v1.5's CLIP learnt them from web captions). Before the fine-tune, each command
therefore teaches the base CLIP those words: contrastive training on balanced MIMIC-captioned phantoms
of the new tokens' embedding rows and the image tower only (`adapt_text_vocabulary`; a CheXpert caption
still encodes exactly as in the base). `--text-from DIR` reuses the tower of a variant built before, so
both variants share one text encoder.

The output is a complete diffusers-layout family folder (the base's VAE and scheduler, the adapted
text encoder and CLIP, the new `unet/`) with an attribute classifier under `classifier/` whose heads
cover every phantom attribute: findings, each device kind, sex and age (one sigmoid per age-bin edge,
`age_ge_40` ...: moving a subject up one bin turns exactly one head on).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from prism_ray.config import BaseConfig, build_config
from prism_ray.data.targets import head_targets
from prism_ray.phantom.dataset import (
    MIMIC_AGE_BINS,
    OtherDeviceMix,
    PhantomDatasetConfig,
    SplitFractions,
    label_columns,
    mimic_adapter_options,
    sample_subjects,
    subject_attributes,
)
from prism_ray.phantom.family import text_encoder_from_clip
from prism_ray.phantom.render import render_phantom
from prism_ray.scoring.classification import decision

# The components a family folder copies from the base (text tower, CLIP, U-Net and classifier are its own).
_COPIED = ("vae", "scheduler", "model_index.json")


def age_heads(age_bins: tuple[int, ...] = MIMIC_AGE_BINS) -> tuple[str, ...]:
    """One head per inner bin edge: "age_ge_40", "age_ge_60", "age_ge_80" for bins (20, 40, 60, 80)."""
    return tuple(f"age_ge_{edge}" for edge in age_bins[1:])


def demographic_labels(age_bins: tuple[int, ...] = MIMIC_AGE_BINS) -> tuple[str, ...]:
    """The demographic classifier's heads, in output order."""
    findings = (
        "cardiomegaly",
        "pleural_effusion",
        "support_devices",
        "pacemaker",
        "tube",
        "ecg",
        "sex_female",
    )
    return (*findings, *age_heads(age_bins))


DEMOGRAPHIC_LABELS = demographic_labels()


def truth_targets(subjects: dict[str, np.ndarray], labels: tuple[str, ...] = DEMOGRAPHIC_LABELS) -> np.ndarray:
    """Ground truth of every head for sampled subjects: (N, len(labels)) float32 in {0, 1}: the classifier
    job's `head_targets` over one true 0/1 column per head (the truth, not the manifest's reported labels)."""
    import pyarrow as pa

    devices = subjects["pacemaker"] | subjects["tube"] | subjects["ecg"]
    known = {
        "cardiomegaly": subjects["cardiomegaly"],
        "pleural_effusion": subjects["pleural_effusion"],
        "support_devices": devices,
        "pacemaker": subjects["pacemaker"],
        "tube": subjects["tube"],
        "ecg": subjects["ecg"],
        "sex_female": subjects["sex"] == "female",
    }
    columns = {}
    for name in labels:
        if name.startswith("age_ge_"):
            columns[name] = subjects["age"] >= int(name.removeprefix("age_ge_"))
        elif name in known:
            columns[name] = known[name]
        else:
            raise ValueError(f"labels: no ground truth for head {name!r}")
    table = pa.table({name: np.asarray(column, np.float64) for name, column in columns.items()})
    return head_targets(table, {name: name for name in labels})


def age_bin_from_heads(proba: np.ndarray, labels: list[str] | tuple[str, ...]) -> np.ndarray:
    """Predicted age bin (its lower edge, e.g. 60) from the `age_ge_*` heads' probabilities (N, A)."""
    edges = [
        (i, int(name.removeprefix("age_ge_"))) for i, name in enumerate(labels) if name.startswith("age_ge_")
    ]
    if not edges:
        raise ValueError("labels: the classifier has no age_ge_* heads")
    first = (
        edges[0][1] - 20 if len(edges) == 1 else 2 * edges[0][1] - edges[1][1]
    )  # the bin below the first edge
    lower = np.array([first] + [edge for _, edge in edges])
    on = np.stack([decision(proba[:, i]) for i, _ in edges], axis=1).sum(axis=1)  # thermometer code -> bin index
    return lower[on]


# ----------------------------------------------------------------------------------------------
# Config


class DemographicFamilyConfig(BaseConfig):
    """One variant of the demographic family: its training phantoms, the U-Net fine-tune and the classifier."""

    variant: Literal["biased", "control"]
    out: str = Field(..., min_length=1)
    base: str = Field("tiny", description="the base family folder (default: the shipped tiny_phantom)")
    seed: int = Field(0, ge=0, lt=2**31)
    device: str = Field("cpu", description="'cpu', 'cuda' or 'auto'")
    threads: int = Field(2, ge=1, description="torch CPU threads")
    # Training phantoms. Ages start at the first bin edge (younger subjects have no MIMIC bin).
    n_train: int = Field(3000, ge=8)
    age_bins: tuple[int, ...] = MIMIC_AGE_BINS
    age_min: int = Field(20, ge=0, le=120)
    age_max: int = Field(89, ge=0, le=120)
    p_cardiomegaly: float = Field(0.5, ge=0, le=1)
    p_female: float = Field(0.5, ge=0, le=1)
    p_other_device: float = Field(
        0.3, ge=0, le=1, description="P(tube and/or ECG), independent of everything"
    )
    # The planted relationships of the biased variant; the control draws each at its marginal rate.
    p_pacemaker_given_cardiomegaly: float = Field(0.9, ge=0, le=1)
    p_pacemaker_given_no_cardiomegaly: float = Field(0.02, ge=0, le=1)
    p_effusion_by_age: dict[int, float] = Field(default_factory=lambda: {20: 0.1, 40: 0.25, 60: 0.5, 80: 0.8})
    # Half the effusions go unreported (as radiology reports omit findings): the caption then leaves effusion
    # open, and the U-Net learns P(effusion | age) there; with every effusion reported it never has to.
    p_effusion_reported: float = Field(
        0.5, ge=0, le=1, description="P(the caption names an effusion | effusion)"
    )
    # U-Net fine-tune over cached latents. 600 steps at 1e-4 moved the pacemaker but left the base's
    # "no findings -> no effusion" intact at every age (0/32 samples at 80); 1500 at 3e-4 learnt
    # P(effusion | age) where it goes unreported (0, 0, 11, 22 of 32 samples at 20, 40, 60, 80).
    steps: int = Field(1500, ge=0)
    batch: int = Field(32, ge=1)
    lr: float = Field(3e-4, gt=0)
    caption_dropout: float = Field(
        0.1, ge=0, le=1, description="empty-caption rate (keeps the unconditional branch)"
    )
    # Text vocabulary: the base family's text tower never saw ages or sexes (its captions are CheXpert's),
    # so their token embeddings are untrained. Contrastive training on balanced MIMIC-captioned phantoms
    # teaches those rows only (every other text weight stays, so the base U-Net's findings keep their
    # meaning) together with the CLIP image tower; both variants then share the adapted tower.
    text_from: str | None = Field(
        None, description="reuse the adapted tokenizer/text_encoder/clip of this family folder"
    )
    text_n_train: int = Field(6000, ge=16)
    text_n_holdout: int = Field(1000, ge=16)
    text_steps: int = Field(3000, ge=0)
    text_batch: int = Field(64, ge=2)
    text_lr: float = Field(5e-3, gt=0, description="learning rate of the new token embeddings")
    image_lr: float = Field(2e-3, gt=0, description="learning rate of the CLIP image tower")
    # Classifier: trained on balanced phantoms, or copied from a folder trained before (`classifier`).
    classifier: str | None = Field(None, description="reuse this classifier folder instead of training one")
    classifier_n_train: int = Field(6000, ge=16)
    classifier_n_holdout: int = Field(1000, ge=16)
    classifier_steps: int = Field(1500, ge=0)
    classifier_batch: int = Field(64, ge=1)
    classifier_lr: float = Field(2e-3, gt=0)
    log_every: int = Field(100, ge=1)

    @field_validator("age_bins")
    @classmethod
    def _bins(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) < 2 or any(a >= b for a, b in itertools.pairwise(v)):
            raise ValueError(f"age_bins must hold at least two strictly increasing edges, got {list(v)}")
        return v

    def check(self) -> None:
        if self.age_min < self.age_bins[0] or self.age_max < self.age_min:
            raise ValueError(
                f"age_min: need age_bins[0] ({self.age_bins[0]}) <= age_min <= age_max, got {self.age_min}"
            )

    def dataset_config(self, n: int | None = None, seed: int | None = None) -> PhantomDatasetConfig:
        """The training phantoms of this variant (every subject in the train split, no shortcut bias)."""
        biased = self.variant == "biased"
        by_age = PhantomDatasetConfig(
            age_min=self.age_min, age_max=self.age_max, p_effusion_by_age=self.p_effusion_by_age
        )
        marginal_effusion = float(
            by_age.effusion_probability(np.arange(self.age_min, self.age_max + 1)).mean()
        )
        p_card = self.p_cardiomegaly
        marginal_pm = (
            p_card * self.p_pacemaker_given_cardiomegaly
            + (1 - p_card) * self.p_pacemaker_given_no_cardiomegaly
        )
        return PhantomDatasetConfig(
            n_subjects=n or self.n_train,
            seed=self.seed if seed is None else seed,
            split_fractions=SplitFractions(train=1.0, valid=0.0, test=0.0),
            p_cardiomegaly=p_card,
            p_effusion=marginal_effusion,
            p_effusion_by_age=self.p_effusion_by_age if biased else None,
            p_effusion_reported=self.p_effusion_reported,
            p_female=self.p_female,
            age_min=self.age_min,
            age_max=self.age_max,
            p_pacemaker_given_cardiomegaly=self.p_pacemaker_given_cardiomegaly if biased else marginal_pm,
            p_pacemaker_given_no_cardiomegaly=self.p_pacemaker_given_no_cardiomegaly
            if biased
            else marginal_pm,
            p_other_device=self.p_other_device,
            p_other_device_given_effusion_train=self.p_other_device,
            p_other_device_given_no_effusion_train=self.p_other_device,
            write_images=False,
        )

    def classifier_dataset_config(self, n: int, seed: int) -> PhantomDatasetConfig:
        """Balanced phantoms for the classifier: every attribute independent, each device kind at 0.3."""
        return PhantomDatasetConfig(
            n_subjects=n,
            seed=seed,
            split_fractions=SplitFractions(train=1.0, valid=0.0, test=0.0),
            p_cardiomegaly=0.5,
            p_effusion=0.5,
            p_female=0.5,
            age_min=self.age_min,
            age_max=self.age_max,
            p_pacemaker_given_cardiomegaly=0.3,
            p_pacemaker_given_no_cardiomegaly=0.3,
            p_other_device=0.5,
            p_other_device_given_effusion_train=0.5,
            p_other_device_given_no_effusion_train=0.5,
            other_device_mix=OtherDeviceMix(tube=0.4, ecg=0.4, both=0.2),  # P(tube) = P(ECG) = 0.3
            write_images=False,
        )

    def adapter(self):
        from prism_ray.data.captions import get_adapter

        return get_adapter("mimic", **mimic_adapter_options(self.age_bins))


# ----------------------------------------------------------------------------------------------
# Data


def render_subjects(subjects: dict[str, np.ndarray], resolution: int) -> np.ndarray:
    """uint8 (N, R, R) renders of sampled subjects (each from its own seed)."""
    n = len(subjects["subject_id"])
    rows = ({k: v[i] for k, v in subjects.items()} for i in range(n))
    return np.stack([render_phantom(subject_attributes(row), int(row["seed"]), resolution) for row in rows])


def captions_of(subjects: dict[str, np.ndarray], adapter) -> list[str]:
    """Each subject's caption through the adapter, from the manifest's label columns."""
    columns = label_columns(subjects)
    return [
        adapter.caption({k: v[i] for k, v in columns.items()}) for i in range(len(subjects["subject_id"]))
    ]


# ----------------------------------------------------------------------------------------------
# U-Net fine-tune over cached latents


def finetune_unet(config: DemographicFamilyConfig, sd, latents: torch.Tensor, captions: list[str]):
    """Fine-tune a copy of `sd.unet` on (latent, caption) pairs: the diffusion loss, AdamW, constant lr.

    Returns (U-Net, losses). Text embeddings of the distinct captions are computed once (the text
    encoder is frozen); every step draws its batch, caption dropout, noise and timesteps from
    `step_generator(seed, 0, step)`, so a run is reproducible from the seed.
    """
    import copy

    from prism_ray.engine.text import encode_prompts
    from prism_ray.training.diffusion import (
        configure_unet,
        diffusion_loss,
        make_noise_scheduler,
        step_generator,
    )

    unet = copy.deepcopy(sd.unet)
    configure_unet(unet)
    vocab = [""] + sorted(set(captions))  # index 0 = the empty caption
    context = encode_prompts(sd.tokenizer, sd.text_encoder, vocab)  # (V, 77, D)
    caption_index = torch.tensor([vocab.index(c) for c in captions])  # (N,)
    scheduler = make_noise_scheduler("epsilon")
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    losses, t0 = [], time.perf_counter()
    for step in range(config.steps):
        g = step_generator(config.seed, 0, step)
        idx = torch.randint(len(latents), (config.batch,), generator=g)
        drop = torch.rand(config.batch, generator=g) < config.caption_dropout
        text = context[torch.where(drop, 0, caption_index[idx])]  # (B, 77, D)
        out = diffusion_loss(unet, scheduler, latents[idx], text, generator=g)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())  # sync point: one per step, for the log
        if step % config.log_every == 0 or step == config.steps - 1:
            recent = float(np.mean(losses[-config.log_every :]))
            print(
                f"[unet {config.variant}] {step + 1}/{config.steps} loss={recent:.4f} ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    return unet.eval().requires_grad_(False), losses


# ----------------------------------------------------------------------------------------------
# Text vocabulary


def base_caption_tokens(tokenizer) -> set[int]:
    """Token ids of every caption the base family was trained on (CheXpert captions of each label combination)."""
    from prism_ray.data.captions import get_adapter
    from prism_ray.phantom.family import chexpert_row
    from prism_ray.phantom.render import PhantomAttributes

    adapter = get_adapter("chexpert")
    captions = {
        adapter.caption(chexpert_row(PhantomAttributes(cardiomegaly=c, pleural_effusion=e, devices=d)))
        for c, e, d in itertools.product((False, True), (False, True), (frozenset(), frozenset({"tube"})))
    }
    return {i for ids in tokenizer(sorted(captions)).input_ids for i in ids}


def adapt_text_vocabulary(config: DemographicFamilyConfig, base_root: Path, device: torch.device):
    """Teach the base CLIP the MIMIC caption words it never saw (ages, sexes); returns (tokenizer, clip, metrics).

    Only the embedding rows of tokens absent from the base's captions train in the text tower, so a
    CheXpert caption encodes exactly as before; the image tower (and the projections) train too, as
    the base image tower was never asked to tell ages or sexes apart. Metrics: held-out image -> caption
    retrieval over every distinct caption, and how far the text context moves between age bins and
    sexes relative to how far it moves for a finding, before and after.
    """
    from transformers import CLIPModel, CLIPTokenizer

    from prism_ray.engine.images import to_model_pixels
    from prism_ray.phantom.family import _Log, fit_clip

    tokenizer = CLIPTokenizer.from_pretrained(base_root / "clip")
    clip = CLIPModel.from_pretrained(base_root / "clip", use_safetensors=True).to(device)
    adapter = config.adapter()
    resolution = _base_resolution(str(base_root))
    subjects = sample_subjects(config.classifier_dataset_config(config.text_n_train, config.seed + 3000))
    hold = sample_subjects(config.classifier_dataset_config(config.text_n_holdout, config.seed + 4000))
    hold["seed"] = hold["seed"] + 2**31
    captions, hold_captions = captions_of(subjects, adapter), captions_of(hold, adapter)
    x = to_model_pixels(render_subjects(subjects, resolution), device)[:, None]
    hold_x = to_model_pixels(render_subjects(hold, resolution), device)[:, None]
    before = context_shifts(tokenizer, clip, hold_captions)

    known = base_caption_tokens(tokenizer)
    new_ids = sorted({i for ids in tokenizer(sorted(set(captions))).input_ids for i in ids} - known)
    frozen_rows = torch.ones(len(tokenizer), 1, dtype=torch.bool, device=device)
    frozen_rows[new_ids] = False
    clip.requires_grad_(False)
    embedding = clip.text_model.embeddings.token_embedding.weight
    embedding.requires_grad_(True)
    embedding.register_hook(lambda grad: grad.masked_fill(frozen_rows, 0.0))
    tower_params = [  # the image tower and both projections
        *clip.vision_model.parameters(),
        *clip.visual_projection.parameters(),
        *clip.text_projection.parameters(),
        clip.logit_scale,
    ]
    for param in tower_params:
        param.requires_grad_(True)
    groups = [
        {"params": [embedding], "lr": config.text_lr, "weight_decay": 0.0},  # zero-gradient rows never move
        {"params": tower_params, "lr": config.image_lr, "weight_decay": 0.05},
    ]
    fit_clip(
        clip,
        x,
        captions,
        tokenizer,
        steps=config.text_steps,
        batch=config.text_batch,
        lr=config.image_lr,
        seed=config.seed + 3001,
        log=_Log("text", config.text_steps, config.log_every),
        params=groups,
    )
    metrics = {
        "new_tokens": tokenizer.convert_ids_to_tokens(new_ids),
        "retrieval": caption_retrieval(clip, tokenizer, hold_x, hold_captions),
        "context_shift_before": before,
        "context_shift_after": context_shifts(tokenizer, clip, hold_captions),
    }
    return tokenizer, clip, metrics


@torch.no_grad()
def caption_retrieval(clip, tokenizer, x: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Held-out image -> caption retrieval: top-1 over the distinct captions, and per caption part."""
    from prism_ray.phantom.family import _clip_pixels, _features

    vocab = sorted(set(captions))
    tokens = tokenizer(vocab, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    txt = torch.nn.functional.normalize(
        _features(clip.get_text_features(input_ids=tokens.input_ids.to(x.device))), dim=-1
    )
    picks = []
    for i in range(0, len(x), 256):
        img = torch.nn.functional.normalize(
            _features(clip.get_image_features(pixel_values=_clip_pixels(x[i : i + 256]))), dim=-1
        )
        picks.extend((img @ txt.T).argmax(1).tolist())
    chosen = [vocab[k] for k in picks]
    parts = {
        "caption": lambda c: c,
        "age": lambda c: c.split("-years")[0],
        "sex": lambda c: " female " in c,
        "findings": lambda c: c.split(" subject ")[-1],
    }
    return {
        name: float(np.mean([part(a) == part(b) for a, b in zip(chosen, captions, strict=True)])) for name, part in parts.items()
    }


@torch.no_grad()
def context_shifts(tokenizer, clip, captions: list[str]) -> dict[str, float]:
    """Mean relative change of the text context (77 x D hidden states) when one caption part changes.

    For each distinct caption: one age bin up, the sex swapped, and (the reference) a finding added
    or removed; the change is ||ctx(a) - ctx(b)|| / ||ctx(a)||, averaged over captions.
    """
    from prism_ray.engine.text import encode_prompts

    def swaps(caption: str) -> dict[str, str]:
        out = {}
        for lo, hi in itertools.pairwise(MIMIC_AGE_BINS):
            if caption.startswith(f"Chest X-ray of {lo}-years"):
                out["age"] = caption.replace(f"of {lo}-years", f"of {hi}-years", 1)
        out["sex"] = (
            caption.replace(" female ", " male ") if " female " in caption else caption.replace(" male ", " female ")
        )
        out["finding"] = (
            caption.replace("Cardiomegaly", "Atelectasis")
            if "Cardiomegaly" in caption
            else caption.replace("subject with ", "subject with Cardiomegaly, ")
        )
        return out

    pairs: dict[str, list[tuple[str, str]]] = {"age": [], "sex": [], "finding": []}
    for caption in sorted(set(captions)):
        for kind, other in swaps(caption).items():
            pairs[kind].append((caption, other))
    encoder = text_encoder_from_clip(clip, clip.config.text_config)
    result = {}
    for kind, items in pairs.items():
        a = encode_prompts(tokenizer, encoder, [p[0] for p in items])
        b = encode_prompts(tokenizer, encoder, [p[1] for p in items])
        result[kind] = float(((a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)).mean())
    return result


# ----------------------------------------------------------------------------------------------
# Classifier


def train_demographic_classifier(config: DemographicFamilyConfig, device: torch.device):
    """The family classifier trainer (`phantom.family.train_classifier`) on balanced phantoms with every head.

    Returns (classifier, held-out metrics): accuracy per head on phantoms from disjoint seeds, and
    for the age heads also away from their edge (|age - edge| > 3 years; at the edge the bone cue
    changes by less than the render's per-subject variation).
    """
    from prism_ray.models.classifier import predict_proba
    from prism_ray.phantom.family import PhantomSplit, PhantomTrainConfig, train_classifier

    labels = demographic_labels(config.age_bins)
    resolution = _base_resolution(config.base)
    train_subjects = sample_subjects(
        config.classifier_dataset_config(config.classifier_n_train, config.seed + 1000)
    )
    hold_subjects = sample_subjects(
        config.classifier_dataset_config(config.classifier_n_holdout, config.seed + 2000)
    )
    hold_subjects["seed"] = hold_subjects["seed"] + 2**31  # render seeds disjoint from every training seed
    train = PhantomSplit(
        render_subjects(train_subjects, resolution),
        truth_targets(train_subjects, labels),
        [],
        train_subjects["seed"],
    )
    trainer = PhantomTrainConfig(
        out=config.out,
        seed=config.seed,
        resolution=resolution,
        classifier_steps=config.classifier_steps,
        classifier_batch=config.classifier_batch,
        classifier_lr=config.classifier_lr,
        log_every=config.log_every,
    )
    model = train_classifier(trainer, train, device, labels=labels)
    images = render_subjects(hold_subjects, resolution)
    truth = truth_targets(hold_subjects, labels) > 0.5
    right = decision(predict_proba(model, images)) == truth  # (N, A)
    metrics: dict = {"n_holdout": len(images), "accuracy": {}, "accuracy_away_from_edge": {}}
    for j, name in enumerate(labels):
        metrics["accuracy"][name] = float(right[:, j].mean())
        if name.startswith("age_ge_"):
            away = np.abs(hold_subjects["age"] - int(name.removeprefix("age_ge_"))) > 3
            metrics["accuracy_away_from_edge"][name] = float(right[away, j].mean())
    return model, metrics


# ----------------------------------------------------------------------------------------------
# The family folder


def _base_resolution(base: str) -> int:
    from prism_ray.models.loading import resolve_model_root

    root = resolve_model_root(base)
    unet = json.loads((root / "unet" / "config.json").read_text())
    vae = json.loads((root / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def write_family(
    out: Path, base_root: Path, text, unet, classifier_folder: Path | None, classifier, metrics: dict
) -> None:
    """A complete family folder: the base's VAE and scheduler, the adapted text tower and CLIP (`text`:
    (tokenizer, clip)), the fine-tuned `unet/`, `classifier/` and metrics."""
    from prism_ray.models.tiny import save_sd_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    for name in _COPIED:
        source, target = base_root / name, out / name
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
        elif source.exists():
            shutil.copy2(source, target)
    tokenizer, clip = text
    for name, module in (
        ("text_encoder", text_encoder_from_clip(clip, clip.config.text_config)),
        ("clip", clip),
        ("unet", unet),
    ):
        shutil.rmtree(out / name, ignore_errors=True)
        module.to("cpu").save_pretrained(out / name, safe_serialization=True)
    for name in ("tokenizer", "clip"):
        save_sd_tokenizer(tokenizer, out / name)
    shutil.rmtree(out / "classifier", ignore_errors=True)
    if classifier is not None:
        classifier.to("cpu").save_pretrained(out / "classifier", safe_serialization=True)
    elif classifier_folder is not None:
        shutil.copytree(classifier_folder, out / "classifier")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def load_text_tower(folder: str | Path):
    """(tokenizer, CLIP) of a demographic family folder written before, for `text_from`."""
    from transformers import CLIPModel, CLIPTokenizer

    root = Path(folder)
    if not (root / "clip" / "config.json").exists() or not (root / "metrics.json").exists():
        raise FileNotFoundError(f"text_from: {folder} is not a demographic family folder (no clip/ or metrics.json)")
    if "text_vocabulary" not in json.loads((root / "metrics.json").read_text()):
        raise ValueError(f"text_from: {folder} has no adapted text vocabulary (built before it existed)")
    tokenizer = CLIPTokenizer.from_pretrained(root / "clip")
    return tokenizer, CLIPModel.from_pretrained(root / "clip", use_safetensors=True).eval().requires_grad_(False)


def build_variant(config: DemographicFamilyConfig) -> dict:
    """Render, caption, cache latents, fine-tune the U-Net, train (or copy) the classifier, write the folder."""
    from prism_ray.engine.images import to_model_pixels
    from prism_ray.models.classifier import load_classifier
    from prism_ray.models.loading import load_sd_components, resolve_device
    from prism_ray.training.diffusion import image_latents

    config.check()
    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    out = Path(config.out)
    timings: dict = {}
    t0 = time.perf_counter()
    sd = load_sd_components(config.base, device=device)
    text_metrics = None
    if config.text_from is None:
        tokenizer, clip, text_metrics = adapt_text_vocabulary(config, sd.root, device)
        print(f"[text] held-out retrieval {json.dumps(text_metrics['retrieval'])}", flush=True)
    else:
        tokenizer, clip = load_text_tower(config.text_from)
        text_metrics = json.loads((Path(config.text_from) / "metrics.json").read_text())["text_vocabulary"]
    sd.tokenizer = tokenizer
    sd.text_encoder = text_encoder_from_clip(clip, clip.config.text_config).to(device)
    timings["text_s"] = time.perf_counter() - t0
    subjects = sample_subjects(config.dataset_config())
    images = render_subjects(subjects, sd.resolution)
    captions = captions_of(subjects, config.adapter())
    pixels = to_model_pixels(images, device)[:, None].expand(-1, 3, -1, -1)  # (N, 3, R, R)
    latents = torch.cat([image_latents(sd.vae, pixels[i : i + 256]) for i in range(0, len(pixels), 256)])
    timings["data_s"] = time.perf_counter() - t0 - timings["text_s"]
    print(
        f"[data] {len(images)} phantoms, {len(set(captions))} distinct captions ({timings['data_s']:.0f}s)",
        flush=True,
    )

    tic = time.perf_counter()
    unet, losses = finetune_unet(config, sd, latents, captions)
    timings["unet_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    classifier, classifier_metrics = None, None
    if config.classifier is None:
        classifier, classifier_metrics = train_demographic_classifier(config, device)
        print(f"[classifier] held-out accuracy {json.dumps(classifier_metrics['accuracy'])}", flush=True)
    else:
        load_classifier(config.classifier)  # fails here, before anything is written, if it is not one
    timings["classifier_s"] = time.perf_counter() - tic
    timings["total_s"] = time.perf_counter() - t0

    rates = _planted_rates(subjects)
    metrics = {
        "config": config.model_dump(mode="json"),
        "training_rates": rates,
        "final_loss_mean_last_100": float(np.mean(losses[-100:])) if losses else None,
        "classifier": classifier_metrics,
        "text_vocabulary": text_metrics,
        "timings": timings,
        "command": f"python -m prism_ray.phantom.demographic --variant {config.variant} --out {config.out}",
    }
    classifier_folder = None
    if config.classifier is not None:
        classifier_folder = Path(config.classifier)
        if (classifier_folder / "classifier" / "config.json").exists():
            classifier_folder = classifier_folder / "classifier"
    write_family(out, sd.root, (tokenizer, clip), unet, classifier_folder, classifier, metrics)
    print(f"[done] {config.variant}: {timings['total_s'] / 60:.1f} min, family written to {out}", flush=True)
    return metrics


def _planted_rates(s: dict[str, np.ndarray]) -> dict[str, float]:
    """The training set's conditional rates (what the U-Net could learn)."""
    card, pm, eff, age = s["cardiomegaly"], s["pacemaker"], s["pleural_effusion"], s["age"]

    def rate(x: np.ndarray) -> float:
        return float(x.mean()) if x.size else float("nan")

    return {
        "p_pacemaker_given_cardiomegaly": rate(pm[card]),
        "p_pacemaker_given_no_cardiomegaly": rate(pm[~card]),
        "p_effusion_age_lt_40": rate(eff[age < 40]),
        "p_effusion_age_ge_60": rate(eff[age >= 60]),
        "p_effusion": rate(eff),
    }


# ----------------------------------------------------------------------------------------------
# Probe: do the variants carry the planted relationships? (edit held-out phantoms, read the heads)

PROBE_SEED_OFFSET = 2**32  # probe render seeds lie above every training seed (< 2**31) and classifier seed


def probe_subjects(
    kind: Literal["cardiomegaly_pacemaker", "young_no_effusion"], n: int, seed: int, age_bins=MIMIC_AGE_BINS
):
    """Held-out subjects for the probe, as `sample_subjects` columns.

    "cardiomegaly_pacemaker": cardiomegaly and a pacemaker, other attributes random (ages over every bin);
    "young_no_effusion": the youngest bin, no effusion, other attributes random.
    """
    rng = np.random.default_rng([seed, 7])
    young = kind == "young_no_effusion"
    lo = age_bins[0]
    age = rng.integers(lo, age_bins[1] - 4, size=n) if young else rng.integers(lo, lo + 70, size=n)
    u = rng.random((n, 5))
    return {
        "subject_id": np.array([f"probe{i:05d}" for i in range(n)]),
        "seed": (rng.choice(2**30, size=n, replace=False) + PROBE_SEED_OFFSET).astype(np.int64),
        "split": np.array(["test"] * n),
        "cardiomegaly": u[:, 0] < 0.5 if young else np.ones(n, bool),
        "pleural_effusion": np.zeros(n, bool) if young else u[:, 1] < 0.3,
        "effusion_reported": np.zeros(n, bool) if young else u[:, 1] < 0.3,
        "pacemaker": u[:, 2] < 0.3 if young else np.ones(n, bool),
        "tube": u[:, 3] < 0.15,
        "ecg": (u[:, 3] >= 0.15) & (u[:, 3] < 0.3),
        "sex": np.where(u[:, 4] < 0.5, "female", "male"),
        "age": age.astype(np.int64),
    }


PROBE_EDITS = {"cardiomegaly_pacemaker": ("Cardiomegaly=0",), "young_no_effusion": ("age=+20", "age=80")}


def probe_family(
    family: str | Path,
    classifier: str | Path,
    *,
    n: int = 24,
    seed: int = 0,
    num_inference_steps: int = 20,
    learning_rate: float = 0.05,
    device: str = "cpu",
    age_bins: tuple[int, ...] = MIMIC_AGE_BINS,
    edits: dict[str, tuple[str, ...]] | None = None,
) -> dict:
    """Edit held-out phantoms with `family` (null-text inversion, prompt-to-prompt without local blend) and
    count how often each classifier head's decision changes from the original image.

    Returns {edit: {"n": .., "turned_off": {head: count}, "turned_on": {head: count}, "age_bin_up": count,
    "control": the same counts for the unedited reconstruction}} for do(Cardiomegaly=0) on subjects with
    cardiomegaly + pacemaker, and do(age=+20) / do(age=80) on young subjects without effusion
    (`edits`: a subset of `PROBE_EDITS`, probe set -> interventions).
    """
    from prism_ray.engine.editor import Editor, edit_many
    from prism_ray.engine.settings import EditConfig, InversionConfig
    from prism_ray.models.classifier import classifier_labels, load_classifier, predict_proba
    from prism_ray.models.loading import load_sd_components

    sd = load_sd_components(str(family), device=device)
    model = load_classifier(classifier, device=device)
    labels = classifier_labels(model)
    adapter = DemographicFamilyConfig(variant="control", out="-", age_bins=age_bins).adapter()
    inversion = InversionConfig(num_inference_steps=num_inference_steps, learning_rate=learning_rate)
    editor = Editor(sd, EditConfig(local_blend=False), inversion)
    report: dict = {}
    for kind, specs in (PROBE_EDITS if edits is None else edits).items():
        subjects = probe_subjects(kind, n, seed, age_bins)
        images = render_subjects(subjects, sd.resolution)
        columns = label_columns(subjects)
        rows = [{k: v[i] for k, v in columns.items()} for i in range(n)]
        sources = [adapter.caption(row) for row in rows]
        edit_prompts = [[adapter.edit_caption(row, spec) for spec in specs] for row in rows]
        items, errors = edit_many(editor, list(images), sources, edit_prompts)
        if errors:
            raise RuntimeError(f"probe: {len(errors)} edits failed, first {errors[0]}")
        original = predict_proba(model, images[[item.index for item in items]])  # (N, A)
        recon = predict_proba(model, np.stack([item.reconstruction for item in items]))
        for k, spec in enumerate(specs):
            edited = predict_proba(model, np.stack([item.edits[k] for item in items]))
            report[f"{kind}: do({spec})"] = {
                "n": len(items),
                "edited": _changes(original, edited, labels),
                "control": _changes(original, recon, labels),
            }
    return report


def _changes(before: np.ndarray, after: np.ndarray, labels: list[str]) -> dict:
    """Decision changes per head (counts) and how often the age bin read from the heads went up."""
    on0, on1 = decision(before), decision(after)
    out = {
        "turned_off": {name: int((on0[:, j] & ~on1[:, j]).sum()) for j, name in enumerate(labels)},
        "turned_on": {name: int((~on0[:, j] & on1[:, j]).sum()) for j, name in enumerate(labels)},
        "mean_delta_p": {name: float((after[:, j] - before[:, j]).mean()) for j, name in enumerate(labels)},
    }
    if any(name.startswith("age_ge_") for name in labels):
        out["age_bin_up"] = int(
            (age_bin_from_heads(after, labels) > age_bin_from_heads(before, labels)).sum()
        )
    return out


def fisher_greater(a: int, n1: int, b: int, n2: int) -> float:
    """One-sided Fisher exact p-value that a/n1 exceeds b/n2 (hypergeometric upper tail)."""
    from math import comb

    total, hits = n1 + n2, a + b
    denominator = comb(total, hits)
    return sum(comb(n1, k) * comb(n2, hits - k) for k in range(a, min(n1, hits) + 1)) / denominator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True, choices=["biased", "control"])
    parser.add_argument("--out", required=True, help="output family folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--classifier", default=None, help="reuse a trained classifier (folder) instead of training one"
    )
    parser.add_argument(
        "--text-from", default=None, help="reuse the adapted text tower of a variant built before"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    args = parser.parse_args(argv)
    fields = {
        "variant": args.variant,
        "out": args.out,
        "seed": args.seed,
        "classifier": args.classifier,
        "text_from": args.text_from,
    }
    build_variant(build_config(DemographicFamilyConfig, fields, args.set))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
