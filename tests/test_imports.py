"""The core imports without Ray or DeepSpeed (DESIGN.md layers; STYLE.md rule 1)."""

import subprocess
import sys

CORE = [
    "prism_ray",
    "prism_ray.config",
    "prism_ray.data.storage",
    "prism_ray.data.schemas",
    "prism_ray.models.loading",
    "prism_ray.models.tiny",
    "prism_ray.engine.images",
    "prism_ray.data.captions",
    "prism_ray.engine.scheduler",
    "prism_ray.engine.types",
]
OPTIONAL_CORE = [
    "prism_ray.engine.inversion",
    "prism_ray.engine.attention",
    "prism_ray.engine.editor",
    "prism_ray.scoring.metrics",
    "prism_ray.scoring.clip_score",
    "prism_ray.phantom.render",
    "prism_ray.training.diffusion",
    "prism_ray.pipelines.deepspeed_config",
]


def test_core_does_not_import_ray_or_deepspeed():
    code = f"""
import importlib, importlib.util, sys
for name in {CORE!r}:
    importlib.import_module(name)
for name in {OPTIONAL_CORE!r}:
    if importlib.util.find_spec(name) is not None:
        importlib.import_module(name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "deepspeed"))
print(",".join(bad))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core pulled in: {out.stdout.strip()}"


def test_importing_the_package_is_light():
    code = "import sys, prism_ray; print(','.join(m for m in ('torch', 'ray', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
