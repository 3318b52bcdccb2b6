"""Editing throughput: the batched engine (invert once, edit many, several images per call) vs a
straightforward per-image loop (one image, one edit, no batching), same model, same run.

Both arms run null-text inversion with a fixed number of inner steps (early stopping off) so the
work per inversion is identical, and both report their reconstruction error, so the ratio is
measured "at equal reconstruction error".

    python benchmarks/bench_engine.py                       # CPU, tiny family, N=8, K=4
    python benchmarks/bench_engine.py --sd15-shaped --device cuda --images 4 --loop-images 1
    python benchmarks/bench_engine.py --sd15-shaped --device cuda --images 4 --loop-images 1 --precision fastest
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from prism_ray.engine.editor import Editor, edit_many
from prism_ray.engine.settings import EditConfig, EngineComputeConfig, InversionConfig

EDITS = [
    "Chest X-ray showing Cardiomegaly",
    "Chest X-ray showing Pleural Effusion",
    "Chest X-ray showing Support Devices",
    "Normal chest X-ray with no significant findings",
]


def phantom_inputs(n: int, resolution: int, seed: int = 0):
    from prism_ray.phantom.render import PhantomAttributes, render_phantom

    images, prompts = [], []
    for i in range(n):
        attrs = PhantomAttributes(cardiomegaly=bool(i % 2), devices=frozenset({"pacemaker"}) if i % 3 == 0 else frozenset())
        gray = render_phantom(attrs, seed=seed + i, resolution=resolution)
        images.append(np.repeat(gray[:, :, None], 3, axis=2))
        findings = [w for w, on in (("Cardiomegaly", attrs.cardiomegaly), ("Support Devices", bool(attrs.devices))) if on]
        prompts.append("Chest X-ray showing " + ", ".join(findings) if findings else "Normal chest X-ray with no significant findings")
    return images, prompts


def load_model(args):
    from prism_ray.models.loading import load_sd_components

    if not args.sd15_shaped:
        return load_sd_components(args.model, device=args.device)
    return sd15_shaped(args.device)


def sd15_shaped(device: str):
    """Random-weight components with SD1.5's U-Net shape (timing only), tiny tokenizer/text tower width 768."""
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from prism_ray.models.loading import SDComponents
    from prism_ray.models.tiny import build_tiny_tokenizer

    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, max_position_embeddings=77,
                       eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.eos_token_id)
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
    )
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the SD1.5 defaults
    dev = torch.device(device)
    for m in (text, vae, unet):
        m.to(dev).eval().requires_grad_(False)
    return SDComponents(tok, text, vae, unet, None, __import__("pathlib").Path(tempfile.gettempdir()), dev, torch.float32)


def run_arm(sd, images, prompts, k: int, inv: InversionConfig, edit: EditConfig, per_image: bool):
    editor = Editor(sd, edit, inv, EngineComputeConfig(gpu_memory_gb=None))  # the arm's --batch, uncapped
    recon_err, n_cf = [], 0
    sync = torch.cuda.synchronize if sd.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    if per_image:
        for img, p in zip(images, prompts, strict=True):
            for e in EDITS[:k]:
                items, errors = edit_many(editor, [img], [p], [[e]])
                assert not errors, errors
                n_cf += 1
                recon_err.append(np.abs(items[0].reconstruction.astype(float) - img.astype(float)).mean() / 255)
    else:
        items, errors = edit_many(editor, images, prompts, [EDITS[:k]] * len(images))
        assert not errors, errors
        n_cf = sum(len(it.edit_prompts) for it in items)
        recon_err = [np.abs(it.reconstruction.astype(float) - images[it.index].astype(float)).mean() / 255 for it in items]
    sync()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "sources": len(images), "counterfactuals": n_cf,
            "source_images_per_s": len(images) / seconds, "counterfactuals_per_s": n_cf / seconds,
            "reconstruction_l1": float(np.mean(recon_err))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sd15-shaped", action="store_true")
    ap.add_argument("--images", type=int, default=8, help="source images for the batched arm")
    ap.add_argument("--loop-images", type=int, default=None, help="source images for the loop arm (default: same)")
    ap.add_argument("--edits", type=int, default=4, help="K edits per image")
    ap.add_argument("--batch", type=int, default=4, help="images per inversion / edit call (batched arm)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--inner", type=int, default=10, help="fixed null-text inner steps (early stop off)")
    ap.add_argument("--precision", default="auto", choices=["auto", "reference", "fast", "fastest"],
                    help="InversionConfig.precision preset (auto: fastest on CUDA, reference on CPU)")
    ap.add_argument("--edit-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="override the preset's editing-pass dtype (EditConfig.compute_dtype)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sd = load_model(args)
    images, prompts = phantom_inputs(args.images, sd.resolution)
    fixed = dict(num_inference_steps=args.steps, num_inner_steps=args.inner, early_stop_epsilon=0.0, early_stop_slope=0.0,
                 precision=args.precision)
    batched = run_arm(sd, images, prompts, args.edits, InversionConfig(**fixed, batch_size=args.batch),
                      EditConfig(edit_batch_size=args.batch, compute_dtype=args.edit_dtype), per_image=False)
    n_loop = args.loop_images or args.images
    loop = run_arm(sd, images[:n_loop], prompts[:n_loop], args.edits, InversionConfig(**fixed, batch_size=1),
                   EditConfig(edit_batch_size=1, compute_dtype=args.edit_dtype), per_image=True)
    ratio = batched["counterfactuals_per_s"] / loop["counterfactuals_per_s"]
    result = {"machine": f"{platform.processor() or platform.machine()}, torch threads {args.threads}",
              "device": str(sd.device), "args": vars(args), "batched": batched, "per_image_loop": loop,
              "speedup_counterfactuals_per_s": ratio,
              "seconds_per_source_image_nti_plus_k_edits": batched["seconds"] / batched["sources"]}
    print(json.dumps(result, indent=2))
    print("\n| arm | src img/s | cf/s | recon L1 | s/source |\n|---|---|---|---|---|")
    for name, arm in (("batched", batched), ("per-image loop", loop)):
        print(f"| {name} | {arm['source_images_per_s']:.3f} | {arm['counterfactuals_per_s']:.3f} | "
              f"{arm['reconstruction_l1']:.4f} | {arm['seconds'] / arm['sources']:.2f} |")
    print(f"\nspeed-up (counterfactuals/s): {ratio:.2f}x")


if __name__ == "__main__":
    main()
