"""User edit and keep masks: combined with the derived blend mask, resized from any resolution, read per
manifest row (a bad file is that row's error); per-intervention edit settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from prism_ray.engine.editor import Editor, edit_many
from prism_ray.engine.inversion import invert_many
from prism_ray.engine.masks import edit_region, latent_mask
from prism_ray.engine.settings import EditConfig, InversionConfig

T = 4
SOURCES = ["a chest x-ray of a male patient", "a chest x-ray showing cardiomegaly"]
EDITS = [["a chest x-ray of a female patient"], ["a chest x-ray showing edema"]]


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    return [
        (60 + 120 * ((yy - 32) ** 2 + (xx - 30 - 4 * i) ** 2 < 150) + rng.integers(0, 30, (64, 64))).astype(
            np.uint8
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def inversion(tiny_sd):
    result, errors = invert_many(
        tiny_sd, _images(2), SOURCES, InversionConfig(method="ddim", num_inference_steps=T)
    )
    assert errors == []
    return result


def _editor(sd, **edit) -> Editor:
    return Editor(
        sd,
        EditConfig(blend_start=0.0, self_replace_steps=0.0, **edit),
        InversionConfig(num_inference_steps=T),
    )


def _block(size: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return mask


def _outside_equal_to_source(result, final: torch.Tensor) -> None:
    """Every latent outside `final` (N, h, w) equals the source branch; some latent inside it moved."""
    outside = ~final[:, None].expand(-1, 4, -1, -1)  # (N, C, h, w)
    src, edit = result.latents[:, 0], result.latents[:, 1]
    assert torch.equal(edit[outside], src[outside])
    assert (edit[~outside] - src[~outside]).abs().amax() > 1e-3


def test_user_masks_intersect_the_derived_mask_and_keep_regions_stay_untouched(tiny_sd, inversion):
    editor = _editor(tiny_sd, local_blend=True, blend_mask="noise")
    derived = editor.edit(inversion, SOURCES, EDITS).blend_masks[:, 0]  # (N, h, w): the noise mask alone
    assert 0 < derived.float().mean() < 1
    # Edit mask: the left 40 of 64 pixels; keep mask: a 16 x 16 pixel block inside it (masks at image size).
    edit = [latent_mask(_block(64, 0, 64, 0, 40), (64, 64), 16)] * 2
    keep = [latent_mask(_block(64, 24, 40, 8, 24), (64, 64), 16)] * 2
    regions = [edit_region(e, k, 16) for e, k in zip(edit, keep, strict=True)]
    result = editor.edit(inversion, SOURCES, EDITS, regions=regions)
    final = derived & torch.stack(regions)  # user edit ∩ derived, minus keep
    assert torch.equal(result.blend_masks[:, 0], final)
    assert 0 < final.float().mean() < derived.float().mean()
    _outside_equal_to_source(result, final)
    keep_cells = torch.stack(keep)[:, None].expand(-1, 4, -1, -1)
    assert keep_cells.any() and torch.equal(
        result.latents[:, 1][keep_cells], result.latents[:, 0][keep_cells]
    )


def test_without_local_blend_the_user_region_alone_masks_the_edit(tiny_sd, inversion):
    keep = latent_mask(_block(64, 0, 32, 0, 64), (64, 64), 16)  # keep the top half
    result = _editor(tiny_sd).edit(inversion, SOURCES, EDITS, regions=[edit_region(None, keep, 16), None])
    assert torch.equal(result.blend_masks[0, 0], ~keep) and bool(result.blend_masks[1, 0].all())
    _outside_equal_to_source(result, result.blend_masks[:, 0])


def test_a_mask_of_another_resolution_is_resized_to_the_latent_grid():
    small = latent_mask(_block(64, 16, 32, 8, 40), (64, 64), 16)
    large = latent_mask(_block(256, 64, 128, 32, 160), (64, 64), 16)  # the same region at 4x
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:8, 2:10] = True
    assert torch.equal(small, expected) and torch.equal(large, expected)
    line = np.zeros((512, 512), np.uint8)
    line[300, :] = 1  # one pixel thick: any pixel of a cell puts the cell in the mask
    assert latent_mask(line, (64, 64), 16).sum(0).eq(1).all()
    # A non-square image (80 x 64) is centre-cropped to its 64 x 64 middle; the mask follows it.
    wide = np.zeros((64, 80), np.uint8)
    wide[:, 8:40] = 7  # image columns 8..39 -> cropped columns 0..31 -> latent columns 0..7
    assert torch.equal(latent_mask(wide, (64, 80), 16)[0], torch.arange(16) < 8)
    with pytest.raises(ValueError, match="expected an"):
        latent_mask(np.zeros((2, 3, 4, 5)), (64, 64), 16)


def test_edit_many_takes_masks_and_reports_a_bad_mask_as_that_items_error(tiny_sd):
    editor = _editor(tiny_sd)
    images = _images(2)
    keep = _block(128, 0, 64, 0, 128)  # top half, at twice the image's resolution
    items, errors = edit_many(editor, images, SOURCES, EDITS, keep_masks=[keep, np.zeros((2, 2, 2, 2))])
    assert [i.index for i in items] == [0] and errors[0][:2] == (1, "edit") and "keep mask" in errors[0][2]
    # The kept top half's latents are the source branch's; in pixels, the decoder's reach blurs the border.
    diff = np.abs(items[0].edits[0].astype(int) - items[0].reconstruction.astype(int))
    print("mean |edit - reconstruction|, top rows / bottom rows:", diff[:24].mean(), diff[40:].mean())
    assert diff[:24].mean() < 0.25 * diff[40:].mean()


def test_per_intervention_settings_edit_as_separate_configs_do(tiny_sd):
    base = EditConfig(
        blend_start=0.0,
        self_replace_steps=0.0,
        per_intervention={
            "sex": {"self_replace_steps": 0.5},
            "Cardiomegaly=false": {"local_blend": True, "blend_mask": "noise"},
        },
    )
    assert base.for_intervention("sex=female").self_replace_steps == 0.5
    assert base.for_intervention("Cardiomegaly=false").local_blend
    assert base.for_intervention("Pleural Effusion=true") is base
    editor = Editor(tiny_sd, base, InversionConfig(method="ddim", num_inference_steps=T))
    images, edits = _images(1), [["a chest x-ray of a female patient", "a chest x-ray"]]
    configs = [[base.for_intervention("sex=female"), base.for_intervention("Cardiomegaly=false")]]
    mixed, errors = edit_many(editor, images, SOURCES[:1], edits, edit_configs=configs)
    assert errors == [] and mixed[0].edits.shape == (2, 64, 64, 3)
    for k in range(2):
        alone, _ = edit_many(editor.with_config(configs[0][k]), images, SOURCES[:1], [edits[0][k : k + 1]])
        assert np.array_equal(mixed[0].edits[k], alone[0].edits[0])
    with pytest.raises(ValueError, match=r"per_intervention.sex.noise_mask_quantile"):
        EditConfig(per_intervention={"sex": {"noise_mask_quantile": 2.0}})
    with pytest.raises(ValueError, match=r"per_intervention.sex: \['edit_batch_size'\] cannot be set"):
        EditConfig(per_intervention={"sex": {"edit_batch_size": 4}})


def test_read_batch_reads_masks_and_names_a_bad_mask_file(tmp_path):
    from prism_ray.data.images import DecodeConfig
    from prism_ray.pipelines.counterfactuals import read_batch

    Image.fromarray(_images(1)[0][:, :48]).save(tmp_path / "src.png")  # 48 wide x 64 high
    Image.fromarray(_block(128, 0, 64, 0, 128)).save(tmp_path / "keep.png")  # another resolution: top half
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    field = "data.keep_mask_column 'keep'"
    tasks = [
        {"source_uri": str(tmp_path / "src.png"), "row": 3, "masks": {"keep": (field, str(tmp_path / name))}}
        for name in ("keep.png", "broken.png", "missing.png")
    ]
    good, failed = read_batch(tasks, DecodeConfig(), 4)  # the tiny VAE: images from 32 px
    assert len(good) == 1 and good[0][2].shape == (48, 48, 3)
    mask = good[0][0]["mask_pixels"]["keep"]
    # Rows 0-31 of the 64-high image, of which the centred square (rows 8-55) keeps 8-31.
    assert mask.shape == (48, 48) and mask[:24].all() and not mask[24:].any()
    reasons = [reason for _, reason in failed]
    assert len(reasons) == 2 and all(
        r.startswith(f"row 3 ('{tmp_path / 'src.png'}'): {field}: image '") for r in reasons
    )
    assert "broken.png': corrupt or unsupported mask image" in reasons[0]
    assert "missing.png': file not found" in reasons[1]
