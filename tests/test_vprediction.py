"""v-prediction models: inversion and editing on a tiny v-prediction family match the epsilon family's.

The v-prediction family is the shipped phantom-trained tiny family with its U-Net re-expressed as a
v-prediction U-Net, exactly: v = sqrt(a_t) * eps - sqrt(1 - a_t) * x_0 with x_0 = (x_t - sqrt(1 - a_t) * eps)
/ sqrt(a_t), i.e. v = (eps - sqrt(1 - a_t) * x_t) / sqrt(a_t) (a_t = alpha_bar at the call's timestep, x_t
the U-Net's input), and its scheduler config saying `prediction_type: v_prediction`. It is
a real `UNet2DConditionModel` (a subclass whose forward converts), so attention processors, dtype and
config work as for any U-Net. The engine has to turn v back into eps wherever the DDIM step needs it;
doing so exactly, it must reconstruct and edit as the epsilon family does, while reading v as if it were
eps (the bug the conversion fixes) fails.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

import prism_ray.engine.inversion as inv
from prism_ray.engine.editor import Editor, edit_many
from prism_ray.engine.images import encode, preprocess
from prism_ray.engine.scheduler import make_ddim_scheduler
from prism_ray.engine.settings import EditConfig, InversionConfig
from prism_ray.models.loading import load_sd_components, require_supported_prediction
from prism_ray.phantom.render import PhantomAttributes, render_phantom

T = 8
SOURCE = "Chest X-ray showing Cardiomegaly, Support Devices"
EDIT = "Chest X-ray showing Cardiomegaly"
ALPHAS = make_ddim_scheduler(T).alphas_cumprod.double().tolist()  # alpha_bar per train timestep


class VelocityUNet(UNet2DConditionModel):
    """An epsilon U-Net's weights answering in v: v = (eps - sqrt(1 - a_t) * x_t) / sqrt(a_t)."""

    def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        eps = super().forward(sample, timestep, encoder_hidden_states, *args, **kwargs).sample
        a = ALPHAS[int(timestep)]
        return UNet2DConditionOutput(sample=(eps - (1 - a) ** 0.5 * sample) / a**0.5)


def _with_prediction(sd, unet, prediction_type: str):
    scheduler = DDIMScheduler.from_config(sd.scheduler.config, prediction_type=prediction_type)
    return dataclasses.replace(sd, unet=unet, scheduler=scheduler)


@pytest.fixture(scope="module")
def families():
    """(epsilon family, v family, the v U-Net mislabelled as epsilon), all the shipped trained weights."""
    eps_sd = load_sd_components("tiny", device="cpu")
    v_unet = VelocityUNet.from_pretrained(eps_sd.root, subfolder="unet", use_safetensors=True).eval()
    v_unet.requires_grad_(False)
    return (
        eps_sd,
        _with_prediction(eps_sd, v_unet, "v_prediction"),
        _with_prediction(eps_sd, v_unet, "epsilon"),
    )


@pytest.fixture(scope="module")
def phantoms():
    attrs = [
        PhantomAttributes(cardiomegaly=True, devices=frozenset({"pacemaker"})),
        PhantomAttributes(cardiomegaly=True, devices=frozenset({"tube", "ecg"})),
    ]
    return [np.repeat(render_phantom(a, seed=7 + i)[..., None], 3, -1) for i, a in enumerate(attrs)]


def _reconstruction_errors(sd, images, method: str) -> torch.Tensor:
    config = InversionConfig(
        method=method,
        num_inference_steps=T,
        num_inner_steps=5,
        learning_rate=5e-2,
        early_stop_epsilon=0.0,
        early_stop_slope=0.0,
    )
    z0 = encode(sd.vae, preprocess(images, sd.resolution)).float()
    result, errors = inv.invert_many(sd, None, [SOURCE] * len(images), config, latents=z0)
    assert errors == []
    z = inv.reconstruct(sd.unet, inv.make_steps(config, sd.prediction_type), result, config.guidance_scale)
    return inv.relative_squared_error(z, z0)


def test_v_prediction_inversion_reconstructs_as_well_as_epsilon(families, phantoms):
    eps_sd, v_sd, misread = families
    for method in ("null_text", "direct"):
        eps_err = _reconstruction_errors(eps_sd, phantoms[:1], method)
        v_err = _reconstruction_errors(v_sd, phantoms[:1], method)
        print(method, "relative squared reconstruction error, eps:", eps_err.tolist(), "v:", v_err.tolist())
        torch.testing.assert_close(v_err, eps_err, rtol=0.02, atol=1e-6)
    # Measured (T = 8, 5 inner steps): null-text 3.57e-2 for both families (BENCHMARKS.md: <= 1e-3 at T = 50
    # with 10), direct 8e-11 / 3e-11; plain DDIM: eps family 0.19, the v U-Net read as noise 383.
    assert eps_err.max() < 1e-6  # direct inversion: exact up to float rounding
    # Plain DDIM inversion + guided reconstruction, where nothing absorbs a wrong noise estimate.
    right = _reconstruction_errors(eps_sd, phantoms[:1], "ddim")
    wrong = _reconstruction_errors(misread, phantoms[:1], "ddim")
    print("ddim, eps family:", right.tolist(), "v U-Net read as noise:", wrong.tolist())
    assert wrong.min() > 10 * right.max()


def test_v_prediction_edits_equal_epsilon_edits(families, phantoms):
    eps_sd, v_sd, _ = families
    inversion = InversionConfig(method="direct", num_inference_steps=T)
    edit = EditConfig(local_blend=True, blend_mask="noise")
    got = {}
    for name, sd in (("eps", eps_sd), ("v", v_sd)):
        items, errors = edit_many(Editor(sd, edit, inversion), phantoms, [SOURCE] * 2, [[EDIT]] * 2)
        assert errors == [] and len(items) == 2
        got[name] = np.stack([item.edits[0] for item in items]).astype(int)
    assert np.abs(got["v"] - got["eps"]).max() <= 1  # the same uint8 images up to one level of rounding
    assert np.abs(got["eps"] - np.stack(phantoms)).mean() > 1  # and they are edits, not copies


def test_other_prediction_types_are_refused_naming_the_field(families, tmp_path):
    eps_sd = families[0]
    with pytest.raises(
        ValueError, match=r"scheduler.prediction_type 'sample': .*'epsilon' and 'v_prediction'"
    ):
        Editor(_with_prediction(eps_sd, eps_sd.unet, "sample"))
    folder = tmp_path / "scheduler"
    folder.mkdir()
    config = json.loads((eps_sd.root / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler_config.json").write_text(json.dumps(config | {"prediction_type": "v_prediction"}))
    assert require_supported_prediction(tmp_path) == "v_prediction"
    (folder / "scheduler_config.json").write_text(json.dumps(config | {"prediction_type": "sample"}))
    with pytest.raises(ValueError, match="scheduler.prediction_type 'sample'"):
        require_supported_prediction(tmp_path)
