"""Export a fine-tuned U-Net as a diffusers folder: written beside the target, then switched in."""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from prism_ray.faults import fault_point

# Components copied verbatim into an exported model folder (the U-Net is written fresh).
EXPORT_COPY = ("model_index.json", "tokenizer", "text_encoder", "vae", "scheduler", "clip")
METADATA_FILE = "prism_finetune.json"


def export_diffusers(
    model_root: str | Path,
    unet_state_dict: Mapping[str, torch.Tensor],
    out_uri: str,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Write a diffusers folder: `model_root`'s components copied, plus the fine-tuned U-Net (safetensors).

    `out_uri` is a local path or any fsspec URI; the folder loads with `load_sd_components`. The new
    folder is written completely to a sibling `<out>.tmp-<id>` and then renamed into place, so an
    export that already exists stays whole and loadable until the switch; a failed export leaves it
    untouched. (Two renames: the old folder moves to `<out>.old-<id>`, the new one to `<out>`, then
    the old one is deleted. On object stores a "rename" is a copy, so the switch is not instant there.)
    """
    import fsspec
    from diffusers import UNet2DConditionModel

    root = Path(model_root)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
    missing, unexpected = unet.load_state_dict(dict(unet_state_dict), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"export: U-Net weights do not match (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )

    fs, path = fsspec.core.url_to_fs(out_uri)
    path = path.rstrip("/")
    token = uuid.uuid4().hex[:12]
    staging, retired = f"{path}.tmp-{token}", f"{path}.old-{token}"
    try:
        with tempfile.TemporaryDirectory(prefix="prism-export-") as tmp:
            local = Path(tmp) / "model"
            local.mkdir()
            for name in EXPORT_COPY:
                src = root / name
                if src.is_dir():
                    # Pickled weights are never copied: the export holds safetensors only.
                    shutil.copytree(
                        src, local / name, ignore=shutil.ignore_patterns("*.bin", "*.pt", "*.ckpt")
                    )
                elif src.is_file():
                    shutil.copy2(src, local / name)
            unet.save_pretrained(local / "unet", safe_serialization=True)
            if metadata:
                (local / METADATA_FILE).write_text(json.dumps(dict(metadata), indent=2, default=str))
            fs.makedirs(staging, exist_ok=True)
            fs.put(str(local) + "/", staging, recursive=True)
        fault_point("finetune.export")  # tests: die after writing, before the switch
        if fs.exists(path):
            fs.mv(path, retired, recursive=True)
        fs.mv(staging, path, recursive=True)
    except BaseException:
        if fs.exists(retired) and not fs.exists(path):
            fs.mv(retired, path, recursive=True)  # the switch itself failed: put the old export back
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
        raise
    if fs.exists(retired):
        fs.rm(retired, recursive=True)
    return out_uri
