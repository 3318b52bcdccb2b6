"""Phantom benchmark: counterfactuals scored against the true counterfactual (same seed, one attribute
changed), the full method against two baselines, on the trained tiny family.

Arms, all from the same held-out phantoms and the same decoder:
  * full      - null-text inversion + prompt-to-prompt (Refine + Reweight, the PRISM defaults);
  * ddim_swap - plain DDIM inversion, then guided sampling with the edited caption (no null-text, no P2P);
  * no_edit   - the method's own unedited reconstruction (NTI source branch): what the pipeline
                returns when nothing changes, so all three arms pay the same VAE round trip;
  * true_vae  - not an edit: the true counterfactual through the family's VAE, the closest any edit can
                come to it through this decoder;
  * blind_vae - not an edit: the change drawn flawlessly by the renderer where another subject's hidden
                draws put it (`phantom.truth.blind_counterfactual`: devices placed, fluid sided elsewhere),
                through the VAE; what a perfect edit, which sees only the source, should expect. It equals
                true_vae where the change reveals nothing hidden (removals, cardiomegaly, age);
  * full_filtered - the full method's edits that pass the S_CLIP >= 0.1 filter (PRISM keeps only those);
  * full_blend - the full method with prompt-to-prompt's local blend on (edit kept only where the
                cross-attention of the changed words is, source branch elsewhere; same inversion);
  * full_noise_blend - the same local blend with the mask read from noise-prediction differences
                along the inversion trajectory (EditConfig.blend_mask = "noise", DiffEdit-style);
  * shipped   - the `edit` section of configs/augment_tiny.yaml with its per-intervention settings
                (what the sweep below chose), on the same null-text inversion;
  * nti_swap  - ablation: the same null-text inversion, then the edited caption without P2P control;
  * <method>_p2p, <method>_noise_blend, <method>_shipped - with --fast-inversions: negative-prompt or direct
                inversion + the PRISM P2P defaults, without and with the noise-mask local blend, and the
                shipped settings;
  * full_bf16, full_noise_blend_bf16 - with --bf16: the same edits with the editing pass's U-Net under
                bfloat16 autocast (EditConfig.compute_dtype), and how often its decisions (S_CLIP
                filter, classifier target and non-target heads) agree with the fp32 pass.
  * --precision fast|fastest - instead of the arms: the full method with its own inversion and editing
                pass under that inversion.precision preset vs reference, and whether the S_CLIP filter and
                the target head's flip decide alike (precision.md / precision.json).
The raw source image's distance to the true counterfactual is reported too (`source_to_true`).

Scores per intervention: the shipped classifier's target CPG and flip rate, the non-target flip
rate (heads the intervention should not move) and its share the classifier does not also show on the
true counterfactual, L1 (and LPIPS when weights are given) to the source, error to the true
counterfactual over the whole image and inside / outside the attribute's region, error to the nearest
counterfactual equally true of the source (additions: `phantom.truth.plausible_counterfactuals`), and
the S_CLIP acceptance rate. Writes `results.json`, `results.md` and one contact sheet per
intervention (source | no_edit | ddim_swap | full | full_noise_blend | shipped | blind_vae | true cf).

    python benchmarks/bench_phantom.py                          # 12 sources per intervention, 50 steps
    python benchmarks/bench_phantom.py --per-intervention 4 --steps 20   # a quick look
    python benchmarks/bench_phantom.py --sweep --steps 20 --only add_devices   # mask/strength arms + oracle mask
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prism_ray.data.captions import get_adapter
from prism_ray.engine.editor import Editor
from prism_ray.engine.settings import EditConfig, InversionConfig
from prism_ray.phantom.dataset import MIMIC_AGE_BINS, mimic_adapter_options
from prism_ray.phantom.demographic import age_heads
from prism_ray.phantom.family import PhantomTrainConfig, attributes_from_draws, chexpert_row
from prism_ray.phantom.render import PhantomAttributes, attribute_mask, lung_mask, render_phantom
from prism_ray.phantom.truth import blind_counterfactual, phantom_intervention, plausible_counterfactuals
from prism_ray.scoring.classification import decision, flipped


@dataclass(frozen=True)
class Intervention:
    name: str
    applies: Callable[[PhantomAttributes], bool]  # which sources this edit makes sense for
    spec: str  # do(...) on the caption attributes, also mapped to the phantom by phantom_eval
    targets: tuple[str, ...]  # classifier heads the true change moves
    region: str  # phantom attribute whose mask bounds the true change
    sex_captions: bool = False  # captions must state sex for this edit


INTERVENTIONS = [
    Intervention("remove_devices", lambda a: bool(a.devices), "Support Devices=false", ("support_devices", "pacemaker"), "devices"),
    Intervention("add_devices", lambda a: not a.devices, "Support Devices=true", ("support_devices", "pacemaker"), "devices"),
    Intervention("remove_effusion", lambda a: a.pleural_effusion, "Pleural Effusion=false", ("pleural_effusion",), "pleural_effusion"),
    Intervention("remove_cardiomegaly", lambda a: a.cardiomegaly, "Cardiomegaly=false", ("cardiomegaly",), "cardiomegaly"),
    Intervention("add_effusion", lambda a: not a.pleural_effusion, "Pleural Effusion=true", ("pleural_effusion",), "pleural_effusion"),
    Intervention("add_cardiomegaly", lambda a: not a.cardiomegaly, "Cardiomegaly=true", ("cardiomegaly",), "cardiomegaly"),
    Intervention("change_sex", lambda a: a.sex == "male", "sex=female", ("sex_female",), "sex", sex_captions=True),
]
# With a demographic family (`phantom.demographic`: MIMIC captions, a classifier with sex and age-bin
# heads) the finding interventions run on MIMIC captions, and sex and age become editable.
DEMOGRAPHIC_INTERVENTIONS = [
    *INTERVENTIONS[:6],
    Intervention("flip_sex", lambda a: True, "sex=flip", ("sex_female",), "sex"),
    Intervention("age_up", lambda a: a.age < MIMIC_AGE_BINS[-1], "age=+20", age_heads(), "age"),
]
SEX_TEMPLATE = "Chest X-ray of a {sex} patient showing {findings}"
FINDINGS = ("Cardiomegaly", "Pleural Effusion", "Support Devices")
S_CLIP_MIN = 0.1  # PRISM's filter
# Every table's reference rows: the two baselines and the two decoder rows that are not edits.
BASELINES = ("no_edit", "ddim_swap", "true_vae", "blind_vae")
SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "augment_tiny.yaml"


def shipped_edit_config(path: Path = SHIPPED_CONFIG) -> EditConfig:
    """The `edit` section of the tiny family's augment config: the settings a user runs (the `shipped` arm)."""
    import yaml

    return EditConfig(**(yaml.safe_load(path.read_text()).get("edit") or {}))


def draw_sources(applies, n: int, seed: int, ages: tuple[int, int] = (18, 91)) -> list[tuple[PhantomAttributes, int]]:
    """n subjects satisfying `applies`, attributes drawn as the tiny family's training set was, ages in
    [ages[0], ages[1]).

    Render seeds come from [2^31, 2^32): disjoint from the family's train ([0, 2^30)) and held-out
    ([2^30, 2^31)) streams.
    """
    rng = np.random.default_rng([seed, 2])
    prevalences = PhantomTrainConfig(out="-")  # the shipped family's training prevalences
    out = []
    while len(out) < n:
        d = rng.random(6)
        attrs = attributes_from_draws(d, int(rng.integers(*ages)), prevalences)
        render_seed = int(rng.integers(2**31, 2**32))
        if applies(attrs):
            out.append((attrs, render_seed))
    return out


def _rgb(gray: np.ndarray) -> np.ndarray:
    """(..., R, R) uint8 gray -> (..., R, R, 3), the layout the engine and CLIP take."""
    return np.repeat(gray[..., None], 3, axis=-1)


def family_kind(heads: list[str]) -> str:
    """'demographic' when the family's classifier reads age bins (MIMIC captions), else 'base'."""
    return "demographic" if any(h.startswith("age_ge_") for h in heads) else "base"


def interventions_for(kind: str) -> list[Intervention]:
    return DEMOGRAPHIC_INTERVENTIONS if kind == "demographic" else INTERVENTIONS


def sources_for(iv: Intervention, kind: str, n: int, seed: int) -> list[tuple[PhantomAttributes, int]]:
    """The intervention's held-out subjects (MIMIC captions have no age below the first bin edge)."""
    ages = (MIMIC_AGE_BINS[0], 90) if kind == "demographic" else (18, 91)
    return draw_sources(iv.applies, n, seed + interventions_for(kind).index(iv), ages)


def true_counterfactuals(iv: Intervention, subjects, resolution: int) -> np.ndarray:
    """(N, R, R) uint8: each subject rendered again with the intervention applied to it."""
    return np.stack([render_phantom(a.intervene(phantom_intervention(iv.spec, a)), s, resolution) for a, s in subjects])


def target_index(iv: Intervention, subjects, heads: list[str]) -> np.ndarray:
    """(N,) the classifier head each source's edit must move: the intervention's first target, or for an
    age edit the head of the next bin edge above the subject's age (one bin up turns it on)."""
    if iv.spec.startswith("age="):
        edges = [(int(h.removeprefix("age_ge_")), heads.index(h)) for h in iv.targets]
        return np.array([next(k for edge, k in edges if edge > a.age) for a, _ in subjects])
    return np.full(len(subjects), heads.index(iv.targets[0]))


def captions(intervention: Intervention, attrs: PhantomAttributes, kind: str = "base") -> tuple[str, str]:
    """(source caption, edited caption) through the caption adapters, as the augment job makes them."""
    row = chexpert_row(attrs)
    if kind == "demographic":
        adapter = get_adapter("mimic", **mimic_adapter_options())
        row = {**row, "Sex": attrs.sex.capitalize(), "Age": attrs.age}
    elif intervention.sex_captions:
        adapter = get_adapter("template", template=SEX_TEMPLATE, findings=FINDINGS, no_findings="no significant findings")
        row = {**row, "sex": attrs.sex}
    else:
        adapter = get_adapter("chexpert")
    return adapter.caption(row), adapter.edit_caption(row, intervention.spec)


def vae_round_trip(sd, images: np.ndarray) -> np.ndarray:
    """uint8 (N, R, R) through the family's VAE (encode to the posterior mean, decode): applied to the true
    counterfactuals, the closest any edit can come to them through this decoder (the `true_vae` row)."""
    from prism_ray.engine.images import decode, encode, preprocess

    return decode(sd.vae, encode(sd.vae, preprocess(list(images), sd.resolution)))[..., 0]


def decoder_rows(sd, cases: Cases) -> dict[str, np.ndarray]:
    """The two rows that are not edits: the true counterfactual (`true_vae`) and the blind bound
    (`blind_vae`), each through the family's VAE."""
    return {"true_vae": vae_round_trip(sd, cases.true), "blind_vae": vae_round_trip(sd, cases.blind)}


def independent_classifier(kind: str, heads: list[str], seed: int, resolution: int, folder: Path):
    """A second attribute classifier with the family classifier's heads, trained from `seed` on phantoms
    the family's never saw (new render seeds, new init): the off-target judge of the `+judge` rows, so
    that the classifier that filters is not the one that scores. Trained once into `folder`, then loaded."""
    from prism_ray.models.classifier import classifier_labels, load_classifier
    from prism_ray.phantom.family import render_split, train_classifier

    if not (folder / "config.json").exists():
        if kind == "demographic":
            from prism_ray.phantom.demographic import DemographicFamilyConfig, train_demographic_classifier

            model, _ = train_demographic_classifier(
                DemographicFamilyConfig(variant="control", out=str(folder), seed=seed), torch.device("cpu"))
        else:
            config = PhantomTrainConfig(out=str(folder), seed=seed, resolution=resolution)
            model = train_classifier(config, render_split(config, config.n_train, stream=0), torch.device("cpu"))
        model.save_pretrained(folder, safe_serialization=True)
    judge = load_classifier(folder)
    if classifier_labels(judge) != heads:
        raise SystemExit(f"{folder}: heads {classifier_labels(judge)} differ from the family classifier's {heads}")
    return judge


def off_target_rule(kind: str):
    """The pipeline's off-target rule (`scoring.filter.OffTargetConfig`) with the benchmark's head names:
    removing support devices may move the pacemaker, an age edit any age head."""
    from prism_ray.scoring.filter import OffTargetConfig

    implied = {"Support Devices": ["pacemaker"]}
    if kind == "demographic":
        implied["age"] = list(age_heads())
    return OffTargetConfig(classifier="judge", heads={"sex": "sex_female"}, implied=implied)


def judge_accepts(judge, rule, spec: str, src: np.ndarray, edited: np.ndarray, s_clip: np.ndarray):
    """The pipeline's filter with the judge as its classifier -> two (N,) bool masks: S_CLIP >= 0.1 and no
    head outside the intervention's own (and implied) heads flipped or moved more than `rule.max_shift`;
    and that, plus the judge seeing the intervention happen (`require_target`, `scoring.filter.on_target`)."""
    from prism_ray.models.classifier import classifier_labels, predict_proba
    from prism_ray.scoring.filter import off_target_heads, on_target

    heads, allowed = classifier_labels(judge), rule.allowed_heads(spec)
    p_src, p_edit = predict_proba(judge, src), predict_proba(judge, edited)
    clean = np.array([not off_target_heads(p_src[i], p_edit[i : i + 1], heads, [allowed], rule.max_shift)[0]
                      for i in range(len(src))], dtype=bool)
    seen = np.array([on_target(p_src[i], p_edit[i], heads, spec, rule) for i in range(len(src))], dtype=bool)
    keep = (s_clip >= S_CLIP_MIN) & clean
    return keep, keep & seen


def judge_rows(judge, kind: str, spec: str, cases: Cases, outputs: dict, clips: dict, classifier) -> dict:
    """{arm: judged scores, arm+target: the same with require_target} for every arm with S_CLIP scores."""
    baselines = {k: outputs[k] for k in BASELINES}
    rule, rows = off_target_rule(kind), {}
    for name, s_clip in clips.items():
        keep, seen = judge_accepts(judge, rule, spec, cases.src, outputs[name], s_clip)
        rows[name] = judged(outputs[name], keep, classifier, cases, baselines)
        rows[f"{name}+target"] = judged(outputs[name], seen, classifier, cases, baselines)
    return rows


def judge_agreement(judge, cases: Cases) -> float:
    """Share of (image, head) decisions on the sources and true counterfactuals where the judge reads as the
    family classifier: how alike the two classifiers see the phantoms."""
    from prism_ray.models.classifier import predict_proba

    mine = decision(np.concatenate([cases.p_src, cases.p_true]))
    theirs = decision(predict_proba(judge, np.concatenate([cases.src, cases.true])))
    return float((mine == theirs).mean())


def judged(arm: np.ndarray, keep: np.ndarray, classifier, cases: Cases, baselines: dict[str, np.ndarray]) -> dict:
    """The scores of the edits the judge accepted, and the baselines' error to the truth on the same sources
    (a filter that keeps the easy sources would otherwise look better than it is)."""
    from prism_ray.models.classifier import predict_proba

    entry: dict = {"accepted_rate": float(keep.mean())}
    if keep.any():
        entry.update(score(arm[keep], predict_proba(classifier, arm[keep]), cases.subset(keep)))
        true = cases.true[keep].astype(np.float64) / 255
        entry["baselines_on_accepted"] = {name: float(np.abs(b[keep] / 255 - true).mean()) for name, b in baselines.items()}
    return entry


def run_arms(sd, images, sources, edits, inversion: InversionConfig, arms: dict[str, EditConfig]):
    """Invert once, edit with every arm's EditConfig -> ({arm: edited uint8 (N, R, R)}, reconstructions,
    {arm: seconds per source, the shared inversion included})."""
    from prism_ray.engine.inversion import invert_many

    start = time.perf_counter()
    inverted, errors = invert_many(sd, images, list(sources), inversion)
    if errors:
        raise RuntimeError(f"inversion errors: {errors}")
    invert_seconds = (time.perf_counter() - start) / len(images)
    out, seconds, recon = {}, {}, None
    for name, edit in arms.items():
        start = time.perf_counter()
        result = Editor(sd, edit, inversion).edit(inverted, list(sources), [[e] for e in edits])
        if result.errors:
            raise RuntimeError(f"{name}: edit errors: {result.errors}")
        out[name] = result.edits[:, 0, ..., 0]
        recon = result.reconstructions[..., 0]
        seconds[name] = invert_seconds + (time.perf_counter() - start) / len(images)
    return out, recon, seconds


@dataclass(frozen=True)
class Cases:
    """One intervention's sources and their truth: uint8 (N, R, R) sources and true counterfactuals,
    the change drawn blind to the hidden draws (`blind`), the attribute's region (N, R, R), the
    counterfactuals equally true of each source (`plausible`, first = `true`), each source's target head,
    and the classifier's probabilities of source and truth."""

    src: np.ndarray
    true: np.ndarray
    blind: np.ndarray
    masks: np.ndarray
    plausible: list[np.ndarray]
    target: np.ndarray
    p_src: np.ndarray
    p_true: np.ndarray
    heads: list[str]
    targets: tuple[str, ...]

    def subset(self, keep: np.ndarray) -> Cases:
        rows = np.flatnonzero(keep)
        return Cases(self.src[rows], self.true[rows], self.blind[rows], self.masks[rows], [self.plausible[i] for i in rows],
                     self.target[rows], self.p_src[rows], self.p_true[rows], self.heads, self.targets)


def make_cases(iv: Intervention, subjects, heads: list[str], classifier, res: int, draws: int = 16) -> Cases:
    from prism_ray.models.classifier import predict_proba

    src = np.stack([render_phantom(a, s, res) for a, s in subjects])
    true = true_counterfactuals(iv, subjects, res)
    blind = np.stack([blind_counterfactual(a, s, iv.spec, res) for a, s in subjects])
    plausible = [plausible_counterfactuals(a, s, iv.spec, draws, res) for a, s in subjects]
    masks = np.stack([attribute_mask(a, s, iv.region, res) for a, s in subjects])
    return Cases(src, true, blind, masks, plausible, target_index(iv, subjects, heads), predict_proba(classifier, src),
                 predict_proba(classifier, true), heads, iv.targets)


def score(arm: np.ndarray, p_arm: np.ndarray, cases: Cases, lpips=None) -> dict:
    """Scores of one arm's images (N, R, R) uint8 and their classifier probabilities against `cases`."""
    from prism_ray.scoring.metrics import cpg, flip_rate

    a, s, t = (x.astype(np.float64) / 255 for x in (arm, cases.src, cases.true))
    err, masks = np.abs(a - t), cases.masks
    nearest = [np.abs(x[None] - p.astype(np.float64) / 255).mean(axis=(1, 2)).min() for x, p in zip(a, cases.plausible, strict=True)]
    out = {
        "error_to_true": float(err.mean()),
        "error_to_plausible": float(np.mean(nearest)),
        "error_to_true_in_region": float((err * masks).sum() / max(masks.sum(), 1)),
        "error_to_true_outside_region": float((err * ~masks).sum() / max((~masks).sum(), 1)),
        "l1_to_source": float(np.abs(a - s).mean()),
    }
    if lpips is not None:
        out["lpips_to_source"] = float(lpips.distance(_rgb(arm), _rgb(cases.src)).mean())
    rows, target, p_src = np.arange(len(arm)), cases.target, cases.p_src
    out["target_cpg"] = cpg(p_arm[rows, target], p_src[rows, target])
    out["target_flip_rate"] = flip_rate(p_arm[rows, target], p_src[rows, target])
    others = [k for k, h in enumerate(cases.heads) if h not in cases.targets]
    changed = flipped(p_src[:, others], p_arm[:, others])
    out["non_target_flip_rate"] = float(changed.any(axis=1).mean())
    out["non_target_flips_per_head"] = {cases.heads[k]: float(changed[:, j].mean()) for j, k in enumerate(others)}
    # A head the classifier also reads differently on the true counterfactual moved with the target.
    beyond = changed & ~flipped(p_src[:, others], cases.p_true[:, others])
    out["non_target_flip_beyond_truth_rate"] = float(beyond.any(axis=1).mean())
    out["non_target_flips"] = [[int(i), cases.heads[others[j]]] for i, j in zip(*np.nonzero(changed), strict=True)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="model family (default: the shipped phantom-trained tiny family)")
    parser.add_argument("--per-intervention", type=int, default=12, help="source phantoms per intervention")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (reference: 50)")
    parser.add_argument("--only", nargs="*", default=None, help="intervention names to run")
    parser.add_argument("--lpips-alexnet", default=None, help="AlexNet weights (torchvision layout) for LPIPS")
    parser.add_argument("--lpips-linear", default=None, help="LPIPS v0.1 alex linear-layer weights")
    parser.add_argument("--self-replace", type=float, nargs="*", default=[],
                        help="extra full-method arms with these self-attention windows (PRISM sweeps 0.4-0.8)")
    parser.add_argument("--fast-inversions", nargs="*", default=[], choices=["negative_prompt", "direct"],
                        help="extra arms: these inversion methods + the PRISM P2P defaults")
    parser.add_argument("--bf16", action="store_true", help="also edit in bfloat16 and report decision agreement")
    parser.add_argument("--sweep", action="store_true",
                        help="instead of the arms above: mask/strength settings and the oracle-mask arm (SWEEP_ARMS) "
                        "from one --sweep-inversion per intervention, against no_edit and ddim_swap")
    parser.add_argument("--sweep-inversion", default="direct", choices=["null_text", "direct", "ddpm"])
    parser.add_argument("--sweep-arms", nargs="*", default=None, help="names of SWEEP_ARMS to run (default: all)")
    parser.add_argument("--precision", default=None, choices=["fast", "fastest"],
                        help="instead of the arms above: the full method under this inversion.precision "
                        "preset vs reference (own inversions), and how often filter/target decisions agree")
    parser.add_argument("--judge-seed", type=int, default=None,
                        help="also filter every edit arm as the pipeline does (S_CLIP and the off-target rule), "
                        "judged by a second classifier trained from this seed (`+judge` table)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/bench_phantom")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from prism_ray.data.contact_sheet import save_contact_sheet
    from prism_ray.models.classifier import classifier_labels, load_classifier, predict_proba
    from prism_ray.models.loading import load_clip, load_sd_components, resolve_model_root
    from prism_ray.phantom.truth import classifier_path
    from prism_ray.scoring.clip_score import ClipScorer
    from prism_ray.scoring.metrics import LPIPS, flip_rate

    root = resolve_model_root(args.model)
    sd = load_sd_components(str(root), device="cpu")
    clip = load_clip(str(root), device="cpu")
    scorer = ClipScorer(clip.model, clip.tokenizer)
    clf_path = classifier_path(root)
    if clf_path is None:
        raise SystemExit(f"--model {args.model}: no classifier/ beside the family (phantom-trained families ship one)")
    classifier = load_classifier(clf_path)
    heads = classifier_labels(classifier)
    lpips = None
    if args.lpips_alexnet and args.lpips_linear:
        lpips = LPIPS.from_weights(args.lpips_alexnet, args.lpips_linear)
    res = sd.resolution
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = family_kind(heads)
    judge = None
    if args.judge_seed is not None:
        judge = independent_classifier(kind, heads, args.judge_seed, res, out / f"judge_seed{args.judge_seed}")
    if args.sweep:
        return sweep(args, sd, scorer, classifier, heads, out, argv, judge)
    if args.precision:
        return precision_parity(args, sd, scorer, classifier, heads, out, argv)
    nti = InversionConfig(num_inference_steps=args.steps)
    ddim = InversionConfig(method="ddim", num_inference_steps=args.steps)
    p2p_arms = {
        "full": EditConfig(),
        "full_blend": EditConfig(local_blend=True),
        "full_noise_blend": EditConfig(local_blend=True, blend_mask="noise"),
        "nti_swap": EditConfig(controller="none", reweight=None),  # ablation: null-text inversion without P2P
    }
    p2p_arms.update({f"full_self{w:g}": EditConfig(self_replace_steps=w) for w in args.self_replace})
    bf16_pairs = {f"{name}_bf16": name for name in ("full", "full_noise_blend")} if args.bf16 else {}
    p2p_arms.update({bf: p2p_arms[fp].model_copy(update={"compute_dtype": "bfloat16"}) for bf, fp in bf16_pairs.items()})
    fast_arms = {"p2p": EditConfig(), "noise_blend": EditConfig(local_blend=True, blend_mask="noise")}
    shipped = shipped_edit_config()
    fast_names = [*fast_arms, "shipped"]
    scored = [*p2p_arms, "shipped", *(f"{m}_{a}" for m in args.fast_inversions for a in fast_names)]  # all but ddim_swap
    results: dict[str, dict] = {}
    chosen = [i for i in interventions_for(kind) if args.only is None or i.name in args.only]
    t0 = time.perf_counter()
    for iv in chosen:
        subjects = sources_for(iv, kind, args.per_intervention, args.seed)
        cases = make_cases(iv, subjects, heads, classifier, res)
        src, true, target, p_src = cases.src, cases.true, cases.target, cases.p_src
        pairs = [captions(iv, a, kind) for a, _ in subjects]
        source_prompts, edit_prompts = [p[0] for p in pairs], [p[1] for p in pairs]
        images = list(_rgb(src))
        arms = {**p2p_arms, "shipped": shipped.for_intervention(iv.spec)}
        outputs, recon, seconds = run_arms(sd, images, source_prompts, edit_prompts, nti, arms)
        outputs["no_edit"] = recon
        outputs.update(decoder_rows(sd, cases))
        swap, _, swap_seconds = run_arms(sd, images, source_prompts, edit_prompts, ddim, {"ddim_swap": EditConfig(controller="none", reweight=None)})
        outputs.update(swap)
        seconds.update(swap_seconds)
        for method in args.fast_inversions:  # the engine's fast alternatives: PRISM P2P defaults, and + noise blend
            cfg = InversionConfig(method=method, num_inference_steps=args.steps)
            arms = {f"{method}_{name}": edit for name, edit in fast_arms.items()}
            arms[f"{method}_shipped"] = shipped.for_intervention(iv.spec)
            extra, _, extra_seconds = run_arms(sd, images, source_prompts, edit_prompts, cfg, arms)
            outputs.update(extra)
            seconds.update(extra_seconds)
        print(f"[{iv.name}] seconds per source: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()), flush=True)
        rows = np.arange(len(subjects))
        entry = {
            "sources": len(subjects),
            "plausible_counterfactuals_per_source": len(cases.plausible[0]),
            "example_prompts": [source_prompts[0], edit_prompts[0]],
            "source_to_true": float(np.abs(src.astype(np.float64) - true).mean() / 255),
            "true_cf_target_flip_rate": flip_rate(cases.p_true[rows, target], p_src[rows, target]),
            "seconds_per_source": seconds,
        }
        probs, clips = {}, {}
        for name in (*BASELINES, *scored):
            probs[name] = predict_proba(classifier, outputs[name])
            entry[name] = score(outputs[name], probs[name], cases, lpips)
        for name in ("ddim_swap", *scored):
            s_clip = clips[name] = scorer.s_clip(_rgb(src), _rgb(outputs[name]), source_prompts, edit_prompts)
            entry[name]["mean_s_clip"] = float(s_clip.mean())
            entry[name]["accepted_rate"] = float((s_clip >= S_CLIP_MIN).mean())
            if name == "full":  # the method as PRISM ships it: only edits the CLIP filter keeps
                keep = s_clip >= S_CLIP_MIN
                if keep.any():
                    p_keep = predict_proba(classifier, outputs[name][keep])
                    entry["full_filtered"] = score(outputs[name][keep], p_keep, cases.subset(keep), lpips)
                    entry["full_filtered"]["accepted_rate"] = float(keep.mean())
        if judge is not None:
            entry["judge_reads_alike"] = judge_agreement(judge, cases)
            entry["judged"] = judge_rows(judge, kind, iv.spec, cases, outputs, clips, classifier)
        for bf, fp in bf16_pairs.items():
            entry[f"{bf}_agreement"] = decision_agreement(
                outputs[fp], outputs[bf], clips[fp], clips[bf], probs[fp], probs[bf], target
            )
        results[iv.name] = entry
        tiles, labels = [], []
        for k in range(min(6, len(subjects))):
            tiles += [src[k], outputs["no_edit"][k], outputs["ddim_swap"][k], outputs["full"][k], outputs["full_noise_blend"][k],
                      outputs["shipped"][k], outputs["blind_vae"][k], true[k]]
            labels += ["source", "no edit", "ddim swap", "full", "full+noise blend", "shipped", "blind (VAE)", "true cf"]
        save_contact_sheet(tiles, str(out / f"{iv.name}.png"), ncols=8, labels=labels, upscale=3)
        print(f"[{iv.name}] " + json.dumps({k: entry[k] for k in (*BASELINES, *scored)}), flush=True)

    meta = {
        "command": "python benchmarks/bench_phantom.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str(root),
        "family": kind,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, cpu",
        "ddim_steps": args.steps,
        "minutes": (time.perf_counter() - t0) / 60,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out / "results.md").write_text(markdown(results, meta))
    print((out / "results.md").read_text())
    return 0


# --- the mask / edit-strength sweep (--sweep) ---------------------------------------------------

NOISE = {"local_blend": True, "blend_mask": "noise"}
# name -> (EditConfig, the user's edit mask: None, "oracle" or "lungs"). The oracle is the renderer's
# ground-truth region of the attribute (`phantom.attribute_mask`): the upper bound of what masking can do.
SWEEP_ARMS: dict[str, tuple[EditConfig, str | None]] = {
    "p2p": (EditConfig(), None),  # PRISM's prompt-to-prompt defaults, no blend
    "noise_q95": (EditConfig(**NOISE), None),  # the default noise blend (q 0.95, threshold 0.5)
    "noise_q90": (EditConfig(**NOISE, noise_mask_quantile=0.9), None),
    "noise_q80": (EditConfig(**NOISE, noise_mask_quantile=0.8), None),
    "noise_q70": (EditConfig(**NOISE, noise_mask_quantile=0.7), None),
    "noise_t03": (EditConfig(**NOISE, noise_mask_threshold=0.3), None),
    "noise_self1": (EditConfig(**NOISE, self_replace_steps=1.0), None),  # source layout kept longer
    "noise_self0": (EditConfig(**NOISE, self_replace_steps=0.0), None),  # no self-attention injection
    "noise_cross04": (EditConfig(**NOISE, cross_replace_steps=0.4), None),  # the edit's own words act earlier
    "noise_rw4": (EditConfig(**NOISE, reweight=4.0), None),  # stronger edit words
    "noise_start0": (EditConfig(**NOISE, blend_start=0.0), None),  # blend from the first step
    # Guidance of the edit branches (the source branch keeps the inversion's 7.5): a scale, or a linear ramp.
    "noise_g2": (EditConfig(**NOISE, edit_guidance=2.0), None),
    "noise_g2_self1": (EditConfig(**NOISE, edit_guidance=2.0, self_replace_steps=1.0), None),
    "noise_g3": (EditConfig(**NOISE, edit_guidance=3.0), None),
    "noise_g3_self1": (EditConfig(**NOISE, edit_guidance=3.0, self_replace_steps=1.0), None),
    "noise_q90_g3": (EditConfig(**NOISE, edit_guidance=3.0, noise_mask_quantile=0.9), None),
    "oracle_noise_g3": (EditConfig(**NOISE, edit_guidance=3.0), "oracle"),
    "noise_g4": (EditConfig(**NOISE, edit_guidance=4.0), None),
    "noise_g5": (EditConfig(**NOISE, edit_guidance=5.0), None),
    "noise_g5_self1": (EditConfig(**NOISE, edit_guidance=5.0, self_replace_steps=1.0), None),
    "noise_q90_g5": (EditConfig(**NOISE, edit_guidance=5.0, noise_mask_quantile=0.9), None),
    "noise_q90_g4": (EditConfig(**NOISE, edit_guidance=4.0, noise_mask_quantile=0.9), None),
    "noise_g10": (EditConfig(**NOISE, edit_guidance=10.0), None),
    "noise_g12_5": (EditConfig(**NOISE, edit_guidance=(12.0, 5.0)), None),  # strong early (layout), weak late
    "noise_g5_12": (EditConfig(**NOISE, edit_guidance=(5.0, 12.0)), None),  # weak early, strong late (detail)
    "oracle": (EditConfig(), "oracle"),  # the true region alone, PRISM's P2P inside it
    "oracle_noise": (EditConfig(**NOISE), "oracle"),  # the true region ∩ the noise mask
    "oracle_self0": (EditConfig(self_replace_steps=0.0), "oracle"),
    # The lung fields as the user's edit mask (what a lung segmenter gives; no knowledge of the truth).
    "lungs_noise_g3": (EditConfig(**NOISE, edit_guidance=3.0), "lungs"),
    "lungs_q90_g3": (EditConfig(**NOISE, edit_guidance=3.0, noise_mask_quantile=0.9), "lungs"),
    "lungs_g3": (EditConfig(edit_guidance=3.0), "lungs"),
    # The lower half of the lung fields (`lower_lung_zones`): where fluid collects, on neither side in particular.
    "lower_noise_g3": (EditConfig(**NOISE, edit_guidance=3.0), "lower_lungs"),
    "lower_q90_g3": (EditConfig(**NOISE, edit_guidance=3.0, noise_mask_quantile=0.9), "lower_lungs"),
    "lower_noise_g2": (EditConfig(**NOISE, edit_guidance=2.0), "lower_lungs"),
    "lower_g3": (EditConfig(edit_guidance=3.0), "lower_lungs"),
    # The lower zone of one lung, the side picked by a seeded coin per source: a user who asks for fluid on a
    # side of their choosing (the source does not show which side the truth's fluid fills).
    "side_noise_g3": (EditConfig(**NOISE, edit_guidance=3.0), "lower_side"),
    "side_noise_g2": (EditConfig(**NOISE, edit_guidance=2.0), "lower_side"),
    "side_g3": (EditConfig(edit_guidance=3.0), "lower_side"),
}


def lower_lung_zones(seed: int, resolution: int, side: int = 0) -> np.ndarray:
    """(R, R) bool: the lower half (by height) of the subject's lung fields, as a user would outline the
    lower zones on a lung segmentation; every effusion the renderer draws lies inside it, on either side.
    `side` -1 / +1 keeps only the image-left / image-right lung (split at the lung fields' mid column)."""
    lungs = lung_mask(seed, resolution)
    rows, cols = np.flatnonzero(lungs.any(axis=1)), np.flatnonzero(lungs.any(axis=0))
    lower = lungs.copy()
    lower[: int((rows.min() + rows.max()) / 2)] = False
    middle = int((cols.min() + cols.max()) / 2)
    if side < 0:
        lower[:, middle:] = False
    elif side > 0:
        lower[:, :middle] = False
    return lower


def coin_side(seed: int) -> int:
    """-1 or +1, a seeded coin per source (independent of the renderer's own draws)."""
    return int(np.random.default_rng([int(seed), 7]).integers(2)) * 2 - 1


def sweep(args, sd, scorer, classifier, heads, out: Path, argv, judge=None) -> int:
    """Every SWEEP_ARMS setting on the same sources and one inversion per intervention -> results.md/json."""
    from prism_ray.engine.inversion import invert_many
    from prism_ray.engine.masks import latent_mask
    from prism_ray.models.classifier import predict_proba

    res, size = sd.resolution, int(sd.unet.config.sample_size)
    names = list(SWEEP_ARMS) if args.sweep_arms is None else args.sweep_arms  # `--sweep-arms` alone: baselines only
    inversion = InversionConfig(method=args.sweep_inversion, num_inference_steps=args.steps)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    kind = family_kind(heads)
    for iv in [i for i in interventions_for(kind) if args.only is None or i.name in args.only]:
        subjects = sources_for(iv, kind, args.per_intervention, args.seed)
        cases = make_cases(iv, subjects, heads, classifier, res)
        user_masks = {
            "oracle": [latent_mask(m, (res, res), size) for m in cases.masks],
            "lungs": [latent_mask(lung_mask(s, res), (res, res), size) for _, s in subjects],
            "lower_lungs": [latent_mask(lower_lung_zones(s, res), (res, res), size) for _, s in subjects],
            "lower_side": [latent_mask(lower_lung_zones(s, res, coin_side(s)), (res, res), size) for _, s in subjects],
        }
        pairs = [captions(iv, a, kind) for a, _ in subjects]
        sources, edits = [p[0] for p in pairs], [p[1] for p in pairs]
        images = list(_rgb(cases.src))
        inverted, errors = invert_many(sd, images, sources, inversion)
        if errors:
            raise RuntimeError(f"inversion errors: {errors}")
        outputs = {}
        # The source branch is the same for every arm; with no arm, a plain caption swap provides it.
        for name in names or [None]:
            edit, mask = SWEEP_ARMS[name] if name else (EditConfig(controller="none", reweight=None), None)
            result = Editor(sd, edit, inversion).edit(inverted, sources, [[e] for e in edits],
                                                      regions=user_masks[mask] if mask else None)
            if name:
                outputs[name] = result.edits[:, 0, ..., 0]
            outputs["no_edit"] = result.reconstructions[..., 0]
        ddim = InversionConfig(method="ddim", num_inference_steps=args.steps)
        swap, _, _ = run_arms(sd, images, sources, edits, ddim, {"ddim_swap": EditConfig(controller="none", reweight=None)})
        outputs.update(swap)
        outputs.update(decoder_rows(sd, cases))
        entry = {"sources": len(subjects)}
        for name in (*BASELINES, *names):
            entry[name] = score(outputs[name], predict_proba(classifier, outputs[name]), cases)
        if judge is not None:
            clips = {name: scorer.s_clip(_rgb(cases.src), _rgb(outputs[name]), sources, edits) for name in ("ddim_swap", *names)}
            entry["judge_reads_alike"] = judge_agreement(judge, cases)
            entry["judged"] = judge_rows(judge, kind, iv.spec, cases, outputs, clips, classifier)
        results[iv.name] = entry
        print(f"[{iv.name}] {time.perf_counter() - t0:.0f} s", flush=True)
    meta = {
        "command": "python benchmarks/bench_phantom.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, cpu",
        "ddim_steps": args.steps,
        "minutes": (time.perf_counter() - t0) / 60,
    }
    (out / "sweep.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out / "sweep.md").write_text(markdown(results, meta))
    print((out / "sweep.md").read_text())
    return 0


def decision_agreement(fp_images, bf_images, fp_clip, bf_clip, fp_probs, bf_probs, target: np.ndarray) -> dict:
    """How often a bfloat16 editing pass decides as the fp32 one: the S_CLIP filter, the classifier's
    target head and all heads (each image's label vector at 0.5); plus the pixel and S_CLIP differences."""
    accept_fp, accept_bf = fp_clip >= S_CLIP_MIN, bf_clip >= S_CLIP_MIN
    labels_fp, labels_bf = decision(fp_probs), decision(bf_probs)
    rows = np.arange(len(target))
    return {
        "s_clip_filter_agrees": float((accept_fp == accept_bf).mean()),
        "target_label_agrees": float((labels_fp[rows, target] == labels_bf[rows, target]).mean()),
        "all_labels_agree": float((labels_fp == labels_bf).all(axis=1).mean()),
        "mean_abs_s_clip_diff": float(np.abs(fp_clip - bf_clip).mean()),
        "mean_abs_pixel_diff": float(np.abs(fp_images.astype(np.float64) - bf_images).mean() / 255),
        "max_abs_target_prob_diff": float(np.abs(fp_probs[rows, target] - bf_probs[rows, target]).max()),
    }


def markdown(results: dict, meta: dict) -> str:
    lines = [
        f"Command: `{meta['command']}` ({meta['machine']}, {meta['ddim_steps']} DDIM steps, {meta['minutes']:.1f} min)",
        "",
        "| intervention | arm | target flip | target CPG | non-target flip | of them not in true cf | err to true cf | "
        "in region | outside | err to nearest plausible cf | L1 to source | S_CLIP>=0.1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results.items():
        first = [*BASELINES, "nti_swap", "full", "full_filtered"]
        scored = [k for k, v in entry.items() if isinstance(v, dict) and "error_to_true" in v]  # every arm scored
        for arm in [a for a in first if a in scored] + [a for a in scored if a not in first]:
            s = entry[arm]
            acc = f"{s['accepted_rate']:.0%}" if "accepted_rate" in s else "-"
            lines.append(
                f"| {name} (n={entry['sources']}) | {arm} | {s['target_flip_rate']:.0%} | {s['target_cpg']:.3f} | "
                f"{s['non_target_flip_rate']:.0%} | {s['non_target_flip_beyond_truth_rate']:.0%} | "
                f"{s['error_to_true']:.4f} | {s['error_to_true_in_region']:.4f} | {s['error_to_true_outside_region']:.4f} | "
                f"{s['error_to_plausible']:.4f} | {s['l1_to_source']:.4f} | {acc} |"
            )
    judged_rows = [(name, arm, j) for name, e in results.items() for arm, j in e.get("judged", {}).items()]
    if judged_rows:
        lines += [
            "",
            "Filtered as the pipeline filters (S_CLIP >= 0.1 and the off-target rule; `+target`: also "
            "`require_target`), judged by a second classifier trained independently; scored by the family "
            "classifier; the baselines' error on the same sources. "
            "The judge reads sources and true counterfactuals as the family classifier does in "
            + ", ".join(f"{name} {e['judge_reads_alike']:.1%}" for name, e in results.items() if "judge_reads_alike" in e)
            + " of head decisions.",
            "",
            "| intervention | arm + judge | accepted | target flip | non-target flip | of them not in true cf | "
            "err to true cf | err to nearest plausible cf | no_edit | ddim_swap | true_vae | blind_vae |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, arm, j in judged_rows:
            if "error_to_true" not in j:
                lines.append(f"| {name} | {arm} | 0% | - | - | - | - | - | - | - | - | - |")
                continue
            b = j["baselines_on_accepted"]
            lines.append(
                f"| {name} | {arm} | {j['accepted_rate']:.0%} | {j['target_flip_rate']:.0%} | "
                f"{j['non_target_flip_rate']:.0%} | {j['non_target_flip_beyond_truth_rate']:.0%} | "
                f"{j['error_to_true']:.4f} | {j['error_to_plausible']:.4f} | {b['no_edit']:.4f} | {b['ddim_swap']:.4f} | "
                f"{b['true_vae']:.4f} | {b['blind_vae']:.4f} |"
            )
    agreement = [(name, key[: -len("_agreement")], v) for name, e in results.items() for key, v in e.items()
                 if key.endswith("_agreement")]
    if agreement:
        lines += [
            "",
            "bfloat16 editing pass vs fp32 (same inversion, same sources):",
            "",
            "| intervention | arm | S_CLIP filter agrees | target label agrees | all labels agree | "
            "mean abs S_CLIP diff | mean abs pixel diff | max abs target p diff |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, arm, a in agreement:
            lines.append(
                f"| {name} | {arm} | {a['s_clip_filter_agrees']:.0%} | {a['target_label_agrees']:.0%} | "
                f"{a['all_labels_agree']:.0%} | {a['mean_abs_s_clip_diff']:.4f} | {a['mean_abs_pixel_diff']:.4f} | "
                f"{a['max_abs_target_prob_diff']:.3f} |"
            )
    return "\n".join(lines) + "\n"


# --- precision parity (--precision) -------------------------------------------------------------


def precision_parity(args, sd, scorer, classifier, heads, out: Path, argv) -> int:
    """The full method under `inversion.precision=reference` and under `args.precision`, each with its own
    null-text inversion and editing pass, on the same sources -> precision.md/json. Per intervention: how
    often the S_CLIP filter (accept at >= 0.1) and the target head's flip decide alike, the latent
    reconstruction error of each inversion (relative squared error of the unedited source branch's z_0)
    and the S_CLIP difference."""
    from prism_ray.engine.inversion import invert_many, make_steps, reconstruct, relative_squared_error
    from prism_ray.models.classifier import predict_proba

    res, presets = sd.resolution, ("reference", args.precision)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    kind = family_kind(heads)
    for iv in [i for i in interventions_for(kind) if args.only is None or i.name in args.only]:
        subjects = sources_for(iv, kind, args.per_intervention, args.seed)
        src = np.stack([render_phantom(a, s, res) for a, s in subjects])
        pairs = [captions(iv, a, kind) for a, _ in subjects]
        sources, edits = [p[0] for p in pairs], [p[1] for p in pairs]
        rows, target = np.arange(len(subjects)), target_index(iv, subjects, heads)
        p_src = predict_proba(classifier, src)[rows, target]
        runs = {}
        for preset in presets:
            start = time.perf_counter()
            inversion = InversionConfig(num_inference_steps=args.steps, precision=preset)
            editor = Editor(sd, EditConfig(), inversion)  # the preset's editing dtype (bf16 for fast/fastest)
            inverted, errors = invert_many(sd, list(_rgb(src)), sources, inversion, policy=editor.precision)
            if errors:
                raise RuntimeError(f"{preset}: inversion errors: {errors}")
            z0 = reconstruct(sd.unet, make_steps(inversion), inverted)
            result = editor.edit(inverted, sources, [[e] for e in edits])
            if result.errors:
                raise RuntimeError(f"{preset}: edit errors: {result.errors}")
            edited = result.edits[:, 0, ..., 0]
            s_clip = scorer.s_clip(_rgb(src), _rgb(edited), sources, edits)
            p_edit = predict_proba(classifier, edited)[rows, target]
            runs[preset] = {
                "reconstruction": relative_squared_error(z0, inverted.latents[0]).numpy(),
                "s_clip": s_clip,
                "accept": s_clip >= S_CLIP_MIN,
                "flip": flipped(p_src, p_edit),
                "edited": edited.astype(np.float64) / 255,
                "seconds": (time.perf_counter() - start) / len(subjects),
            }
        ref, low = runs["reference"], runs[args.precision]
        results[iv.name] = {
            "sources": len(subjects),
            "filter_equal": int((ref["accept"] == low["accept"]).sum()),
            "target_flip_equal": int((ref["flip"] == low["flip"]).sum()),
            "accepted": {p: int(runs[p]["accept"].sum()) for p in presets},
            "target_flips": {p: int(runs[p]["flip"].sum()) for p in presets},
            "reconstruction_error": {p: float(runs[p]["reconstruction"].mean()) for p in presets},
            "reconstruction_ratio": float(low["reconstruction"].mean() / ref["reconstruction"].mean()),
            "max_reconstruction_ratio": float((low["reconstruction"] / ref["reconstruction"]).max()),
            "mean_s_clip": {p: float(runs[p]["s_clip"].mean()) for p in presets},
            "mean_s_clip_diff": float((low["s_clip"] - ref["s_clip"]).mean()),
            "mean_abs_s_clip_diff": float(np.abs(low["s_clip"] - ref["s_clip"]).mean()),
            "mean_abs_pixel_diff": float(np.abs(low["edited"] - ref["edited"]).mean()),
            "seconds_per_source": {p: runs[p]["seconds"] for p in presets},
            "per_source_s_clip": {p: runs[p]["s_clip"].round(4).tolist() for p in presets},
        }
        print(f"[{iv.name}] {time.perf_counter() - t0:.0f} s " + json.dumps(results[iv.name]), flush=True)
    meta = {
        "command": "python benchmarks/bench_phantom.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, cpu",
        "ddim_steps": args.steps,
        "minutes": (time.perf_counter() - t0) / 60,
    }
    (out / "precision.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out / "precision.md").write_text(precision_markdown(results, meta, args.precision))
    print((out / "precision.md").read_text())
    return 0


def precision_markdown(results: dict, meta: dict, preset: str) -> str:
    lines = [
        (
            f"Command: `{meta['command']}` ({meta['machine']}, {meta['ddim_steps']} DDIM steps, "
            f"{meta['minutes']:.1f} min)"
        ),
        "",
        (
            f"| intervention | filter decision equal | target flip equal | accepted ref / {preset} | "
            f"target flips ref / {preset} | recon err ref | recon err ratio {preset}/ref (max per source) | "
            f"mean S_CLIP ref | S_CLIP diff {preset}-ref (mean abs) | pixel diff | s/source ref / {preset} |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results.items():
        n, sec = e["sources"], e["seconds_per_source"]
        lines.append(
            f"| {name} | {e['filter_equal']}/{n} | {e['target_flip_equal']}/{n} | "
            f"{e['accepted']['reference']} / {e['accepted'][preset]} | "
            f"{e['target_flips']['reference']} / {e['target_flips'][preset]} | "
            f"{e['reconstruction_error']['reference']:.2e} | {e['reconstruction_ratio']:.2f} "
            f"({e['max_reconstruction_ratio']:.2f}) | {e['mean_s_clip']['reference']:.3f} | "
            f"{e['mean_s_clip_diff']:+.4f} ({e['mean_abs_s_clip_diff']:.4f}) | "
            f"{e['mean_abs_pixel_diff']:.4f} | "
            f"{sec['reference']:.1f} / {sec[preset]:.1f} |"
        )
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    raise SystemExit(main())
