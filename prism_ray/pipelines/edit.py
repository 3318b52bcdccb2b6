"""`prism-ray edit`: counterfactuals of a handful of images, in this process, no cluster and no manifest.

    prism-ray edit a.png b.dcm --prompt "Chest X-ray showing Cardiomegaly, Support Devices" \
        --do "Support Devices=0" --model path/to/sd15 --out edits/

The same method code as the augment job (`pipelines.counterfactuals.MethodEngine`: one inversion
per image, every edit from it, CLIP scores and the filter), and the same image decoding. Writes,
under `out`: `<image>/source.png`, `<image>/edit_<k>.png`, `<image>/difference_<k>.png`,
`sheet.png` (source | counterfactual | difference, one row per edit), `edits.json` and `index.md`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from prism_ray.config import BaseConfig, config_field, with_unset_defaults
from prism_ray.console import Progress
from prism_ray.data.images import DecodeConfig
from prism_ray.engine.settings import EditConfig, InversionConfig
from prism_ray.models.config import ModelConfig
from prism_ray.results.summary import RunIncomplete
from prism_ray.scoring.filter import FilterConfig, fit_warning


class EditJobConfig(BaseConfig):
    """A few images, their caption, and the edits: interventions (`do`) or edit prompts."""

    images: list[str] = Field(..., min_length=1, description="image files or URIs (PNG, JPEG, DICOM, ...)")
    prompt: str = Field(..., min_length=1, description="the images' caption, in the fine-tune's caption language")
    do: list[str] = Field(default_factory=list, description="interventions, e.g. 'Support Devices=0'")
    edit_prompts: list[str] = Field(default_factory=list, description="edit captions given as they are")
    adapter: str = Field("chexpert", description="caption language `do` edits the prompt in")
    out: str = Field(..., min_length=1, description="output folder")
    model: ModelConfig = ModelConfig()
    inversion: InversionConfig = InversionConfig()
    edit: EditConfig = EditConfig()
    filter: FilterConfig = FilterConfig()
    decode: DecodeConfig = DecodeConfig()

    @property
    def mode(self) -> str:  # what `MethodEngine` loads: the editor and the filter CLIP
        return "counterfactual"

    @model_validator(mode="after")
    def _edits(self) -> EditJobConfig:
        if not self.do and not self.edit_prompts:
            raise ValueError("do: give at least one intervention (--do 'Support Devices=0') or edit prompt")
        return self

    def edit_captions(self) -> list[str]:
        """The edit prompts: every `do` applied to the caption, then the explicit ones."""
        from prism_ray.data.captions import get_adapter

        captions = []
        adapter = get_adapter(self.adapter)
        attrs = caption_attributes(adapter, self.prompt)
        for spec in self.do:
            edited = adapter.render(adapter.intervene(attrs, spec))
            if edited == self.prompt:
                raise ValueError(f"do: {spec!r} leaves the caption {self.prompt!r} unchanged")
            captions.append(edited)
        return captions + list(self.edit_prompts)


def caption_attributes(adapter, prompt: str) -> dict:
    """The attributes a caption states, found by rendering candidates (the adapter's own language).

    Works for adapters whose attributes are yes/no findings (CheXpert): the caption must be one
    the adapter itself writes for some set of findings.
    """
    kinds = adapter.attribute_kinds
    if any(kind != "bool" for kind in kinds.values()):
        raise ValueError(f"adapter: {adapter.name!r} has non-finding attributes; give --edit-prompt instead of --do")
    present = {name: name.lower() in prompt.lower() for name in kinds}
    if adapter.render(present) != prompt:
        raise ValueError(
            f"prompt: {prompt!r} is not a caption the {adapter.name!r} adapter writes; "
            "give the edit captions with --edit-prompt instead of --do"
        )
    return present


def run(config: EditJobConfig, runner=None) -> Path:
    """Edit every image in this process; returns the output folder (`runner` is unused)."""
    from prism_ray.data.contact_sheet import save_contact_sheet
    from prism_ray.data.images import decode_image, default_min_side, make_square
    from prism_ray.data.storage import ImageReadError, read_image_bytes, write_png
    from prism_ray.models.loading import (
        METHOD_DEFAULTS_FILE,
        check_model_folder,
        family_method_defaults,
        require_supported_prediction,
    )
    from prism_ray.pipelines.counterfactuals import MethodEngine

    captions = config.edit_captions()
    with config_field("model.path"):  # a wrong model is a config error (exit 2), found before `out` exists
        root = check_model_folder(config.model.path, config.model.cache_dir)
        require_supported_prediction(root)
    out = Path(config.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"edit: {len(config.images)} images x {len(captions)} edits -> {out}", flush=True)
    config = with_unset_defaults(config, family_method_defaults(root), str(root / METHOD_DEFAULTS_FILE))
    print(f"edit: {config.inversion.num_inference_steps} DDIM steps x {config.inversion.num_inner_steps} "
          f"null-text steps at lr {config.inversion.learning_rate:g}", flush=True)
    engine = MethodEngine(config)
    min_side = config.decode.min_side or default_min_side(engine.vae_scale_factor)
    pixels, tasks, failures = [], [], []
    for uri in config.images:
        try:
            image = decode_image(read_image_bytes(uri), uri, config.decode, min_side=min_side)
        except ImageReadError as err:
            failures.append({"image": uri, "stage": "read", "reason": err.reason})
            continue
        pixels.append(make_square(image, config.decode.square, config.decode.alpha_background))
        specs = list(config.do) + [""] * len(config.edit_prompts)  # an explicit edit prompt names no attribute
        edits = [{"edit_prompt": c, "subgroup": "edit", "intervention": spec, "slot_id": str(k), "rank": k}
                 for k, (c, spec) in enumerate(zip(captions, specs, strict=True))]
        tasks.append({"source_uri": uri, "source_prompt": config.prompt, "edits": edits})
    edited, errors = [], []
    # Engine calls of inversion.batch_size images (batched inversion is ~6x faster per image than one
    # at a time, BENCHMARKS.md), with a progress line (done/total, ETA) every 10 s meanwhile.
    chunk = config.inversion.batch_size
    with Progress("edit: inverting and editing", len(tasks), "images") as progress:
        for start in range(0, len(tasks), chunk):
            done, failed = engine.counterfactuals(pixels[start:start + chunk], tasks[start:start + chunk])
            edited += [replace(item, index=start + item.index) for item in done]
            errors += [(start + i, stage, reason) for i, stage, reason in failed]
            progress.advance(len(tasks[start:start + chunk]))
    failures += [{"image": tasks[i]["source_uri"], "stage": stage, "reason": reason} for i, stage, reason in errors]

    results, tiles, labels = [], [], []
    for item in edited:
        uri = tasks[item.index]["source_uri"]
        folder = out / _stem(uri, len(results))
        folder.mkdir(exist_ok=True)
        size = item.images.shape[1]
        source = _resize(pixels[item.index], size)
        write_png(source, str(folder / "source.png"))
        accepted = config.filter.accept(item.scores)
        # The augment job's model-fit check, per image: a non-X-ray comes back as the model's own X-ray.
        psnr = float(item.scores["reconstruction_psnr"][0])
        fit = fit_warning(psnr, config.filter.fit_warning_psnr)
        if fit:
            print(f"edit: warning: {Path(uri).name} {fit}", flush=True)
        for k, caption in enumerate(captions):
            cf = item.images[k]
            diff = _difference(source, cf)
            write_png(cf, str(folder / f"edit_{k}.png"))
            write_png(diff, str(folder / f"difference_{k}.png"))
            tiles += [source[..., 0], cf[..., 0], diff[..., 0]]
            labels += [Path(uri).name[:18], f"do {k}" + ("" if accepted[k] else " (rejected)"), "|cf - src| x4"]
            results.append({
                "image": uri, "folder": str(folder), "edit_prompt": caption,
                "s_clip": float(item.scores["s_clip"][k]), "accepted": bool(accepted[k]),
                "reconstruction_error": float(item.scores["reconstruction_error"][k]),
                "reconstruction_psnr": psnr, "fit_warning": fit, "l1": float(item.scores["l1"][k]),
            })
    if tiles:
        save_contact_sheet(tiles, str(out / "sheet.png"), ncols=3, labels=labels, upscale=max(1, 192 // size))
    settings = {"inversion": config.inversion.model_dump(mode="json"), "edit": config.edit.model_dump(mode="json")}
    (out / "edits.json").write_text(json.dumps({"edits": results, "failures": failures, "settings": settings},
                                               indent=2))
    _write_index(out, config, results, failures)
    print(f"edit: {len(results)} counterfactuals, {len(failures)} failures; see {out / 'index.md'}", flush=True)
    if not results:
        raise ValueError(f"edit: no counterfactual made ({failures[0]['image']}: {failures[0]['reason']})"
                         if failures else "edit: no counterfactual made")
    if failures:  # the edits made are written; the exit code says that some inputs were not
        failed = sorted({f["image"] for f in failures})
        raise RunIncomplete(f"{len(failed)} of {len(config.images)} images failed (first: {failed[0]}); "
                            f"the others were edited, see {out / 'index.md'}",
                            {"edits": len(results), "failures": failures})
    return out


def _stem(uri: str, n: int) -> str:
    name = Path(uri.split("://", 1)[-1]).stem or "image"
    return f"{n:03d}_{''.join(c if c.isalnum() or c in '-_' else '_' for c in name)[:40]}"


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if image.shape[0] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def _difference(source: np.ndarray, cf: np.ndarray) -> np.ndarray:
    """|cf - source| x 4 (clipped), gray as RGB: where the edit changed the image."""
    diff = np.abs(cf.astype(np.int16) - source.astype(np.int16)).mean(axis=2) * 4
    return np.repeat(np.clip(diff, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def _write_index(out: Path, config: EditJobConfig, results: list[dict], failures: list[dict]) -> None:
    lines = [
        "# prism_ray edit", "",
        f"Caption: `{config.prompt}`. Model: `{config.model.path}`. Filter: S_CLIP >= {config.filter.s_clip_min}. "
        f"Model fit: warned below {config.filter.fit_warning_psnr:g} dB PSNR (filter.fit_warning_psnr).", "",
        "![source | counterfactual | difference](sheet.png)", "",
        "Each row of the sheet: the source as the model sees it (square, model resolution), the "
        "counterfactual, and four times the absolute difference (bright = changed).", "",
    ]
    unfit = {r["image"]: r["fit_warning"] for r in results if r.get("fit_warning")}
    if unfit:
        lines += ["**Model-fit warnings** (the unedited reconstruction, PSNR against the source):", ""]
        lines += [f"- {Path(image).name}: {warning}" for image, warning in unfit.items()] + [""]
    lines += [
        "| image | edit prompt | S_CLIP | accepted | reconstruction error | PSNR (dB) | model fit | L1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {Path(r['image']).name} | {r['edit_prompt']} | {r['s_clip']:.3f} | {r['accepted']} | "
              f"{r['reconstruction_error']:.4f} | {r['reconstruction_psnr']:.1f} | "
              f"{'warning' if r.get('fit_warning') else 'ok'} | {r['l1']:.4f} |" for r in results]
    if failures:
        lines += ["", "Failures:", ""] + [f"- {f['image']}: {f['stage']}: {f['reason']}" for f in failures]
    (out / "index.md").write_text("\n".join(lines) + "\n")
