"""Layering: only prism_ray/distributed/ imports Ray or DeepSpeed, and its files stay short adapters."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import prism_ray

PACKAGE = Path(prism_ray.__file__).parent


def _modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="prism_ray."):
        if not info.name.startswith("prism_ray.distributed") and ".assets" not in info.name:
            names.append(info.name)
    return names


def test_everything_outside_distributed_imports_without_ray_or_deepspeed():
    modules = ["prism_ray", *_modules()]
    assert "prism_ray.pipelines.augment" in modules and "prism_ray.results.ledger" in modules
    code = f"""
import importlib, sys
for name in {modules!r}:
    importlib.import_module(name)
print(",".join(sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "deepspeed"))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the core pulled in: {out.stdout.strip()}"


def test_only_distributed_sources_mention_ray_or_deepspeed_imports():
    import re

    pattern = re.compile(r"^\s*(import|from)\s+(ray|deepspeed)(\.|\s|$)", re.MULTILINE)
    outside = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if "distributed" not in p.parts and pattern.search(p.read_text())]
    assert outside == []


def test_distributed_adapters_are_short():
    long = {p.name: n for p in (PACKAGE / "distributed").glob("*.py") if (n := len(p.read_text().splitlines())) >= 250}
    assert long == {}


def test_importing_the_package_is_light():
    code = "import sys, prism_ray; print(','.join(m for m in ('torch', 'ray', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
