"""GPU throughput at the arithmetic limit (issue 17): U-Net timings -> each arm's bound, then the arms.

1. Times the U-Net alone per image (fp32 / TF32 / bf16; forward, and forward + backward to the text
   context = one null-text inner step) at batch 1/8/16, and from the best per-image times computes each
   arm's arithmetic bound: the U-Net calls the arm makes (VAE and text encoder not counted).
2. Runs the engine's arms through `Editor` / `edit_many` (as bench_engine does): the per-image loop
   (fp32, every counterfactual its own inversion), each precision preset at batch 4 and 8, and direct
   inversion + noise-mask blend; seconds per source (null-text inversion + K edits), ratio to the bound,
   peak memory. Short runs (--short-steps) are extrapolated to --steps; one full-length run of the
   default CUDA preset checks the extrapolation.
3. Times the fine-tune core step (cached latents, no Ray/DeepSpeed) in img/s per mode.

    python benchmarks/bench_gpu.py --out outputs/bench_gpu           # one H100/H200, SD1.5-shaped, < 8 min
    python benchmarks/bench_gpu.py --smoke --out /tmp/bench_gpu      # CPU, tiny family, < 2 min

Needs torch, transformers, diffusers, pydantic and Pillow, not Ray. On a GPU machine without diffusers
and pydantic, bring their wheels: `pip install --no-deps diffusers-*.whl pydantic-*.whl
pydantic_core-*.whl annotated_types-*.whl typing_inspection-*.whl`; the repository itself is put on
sys.path (no install). Models are random-weight, SD1.5-shaped (diffusers' default UNet2DConditionModel
is SD1.5's), built from configs: nothing is downloaded. Writes results.json and results.md to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without an install: prism_ray is imported below it

from prism_ray.engine.editor import Editor, edit_many  # noqa: E402
from prism_ray.engine.precision import PRESETS, resolve_precision, tf32_mode  # noqa: E402
from prism_ray.engine.settings import EditConfig, EngineComputeConfig, InversionConfig  # noqa: E402

EDITS = [
    "Chest X-ray showing Cardiomegaly",
    "Chest X-ray showing Pleural Effusion",
    "Chest X-ray showing Support Devices",
    "Normal chest X-ray with no significant findings",
]
SOURCE = "Chest X-ray showing Cardiomegaly, Support Devices"
MODES = ("fp32", "tf32", "bf16")


# --- models ----------------------------------------------------------------------------------


def sd15_shaped(device: torch.device):
    """Random-weight SD1.5-shaped U-Net/VAE and a 12-layer 768-wide text encoder (the tiny tokenizer)."""
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from prism_ray.models.loading import SDComponents
    from prism_ray.models.tiny import build_tiny_tokenizer

    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
            pad_token_id=tok.eos_token_id,
        )
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are SD1.5's
    with torch.no_grad():  # a calm random denoiser: small eps keeps 50 guided steps finite
        unet.conv_out.weight.mul_(0.01)
        unet.conv_out.bias.mul_(0.01)
    for m in (text, vae, unet):
        m.to(device).eval().requires_grad_(False)
    return SDComponents(tok, text, vae, unet, None, Path(tempfile.gettempdir()), device, torch.float32)


def load_models(args):
    if args.smoke:
        from prism_ray.models.loading import load_sd_components

        return load_sd_components("tiny", device="cpu")
    return sd15_shaped(torch.device(args.device))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- 1. the U-Net alone ----------------------------------------------------------------------


def mode_context(mode: str, device: torch.device):
    """fp32: TF32 off; tf32: TF32 matmuls + convolutions; bf16: autocast (TF32 on for what stays fp32)."""
    from contextlib import ExitStack

    stack = ExitStack()
    stack.enter_context(tf32_mode(mode != "fp32"))
    if mode == "bf16":
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    return stack


def unet_timings(sd, batches, repeats: int) -> dict:
    """{mode: {batch: {"forward_ms", "forward_backward_ms"}}}, milliseconds per image."""
    unet, device = sd.unet, sd.device
    side, dim = int(unet.config.sample_size), int(unet.config.cross_attention_dim)
    out: dict = {}
    for mode in MODES:
        out[mode] = {}
        for b in batches:
            z = torch.randn(b, int(unet.config.in_channels), side, side, device=device)
            ctx = torch.randn(b, 77, dim, device=device)

            def forward(z=z, ctx=ctx, mode=mode):
                with torch.no_grad(), mode_context(mode, device):
                    unet(z, 500, encoder_hidden_states=ctx)

            def forward_backward(z=z, ctx=ctx, mode=mode):
                c = ctx.clone().requires_grad_(True)
                with mode_context(mode, device):
                    eps = unet(z, 500, encoder_hidden_states=c).sample
                torch.autograd.grad(eps.float().square().mean(), c)

            row = {}
            for name, fn in (("forward_ms", forward), ("forward_backward_ms", forward_backward)):
                fn()  # warm-up (cuDNN autotuning, allocator)
                sync(device)
                start = time.perf_counter()
                for _ in range(repeats):
                    fn()
                sync(device)
                row[name] = (time.perf_counter() - start) / repeats / b * 1e3
            out[mode][b] = row
            print(
                f"  U-Net {mode} batch {b}: {row['forward_ms']:.2f} / {row['forward_backward_ms']:.2f} ms per image",
                flush=True,
            )
    return out


def best(timings: dict, mode: str, kind: str) -> float:
    """The fastest per-image time of `mode` over the batch sizes measured, in seconds."""
    return min(row[kind] for row in timings[mode].values()) / 1e3


def policy_modes(policy) -> tuple[str, str, str]:
    """(trajectory, inner step, edit) timing modes of a precision policy."""
    traj = "tf32" if policy.matmul_tf32 else "fp32"
    inner = "bf16" if policy.inner_dtype == torch.bfloat16 else traj
    edit = "bf16" if policy.edit_dtype == torch.bfloat16 else "fp32"
    return traj, inner, edit


def arm_bound(arm: dict, timings: dict, steps: int, inner: int, k: int, mask_samples: int) -> float:
    """Seconds per source of the U-Net calls an arm makes, at the best measured per-image times.

    null-text: T conditional DDIM-inversion calls; per step 1 conditional + 1 advancing call and `inner`
    forward + backward calls; editing: T guided calls over 2 (K + 1) rows. The per-image loop inverts once
    per counterfactual and edits K = 1. Direct inversion: T DDIM calls + T guided calls over 2 rows;
    the noise mask: `mask_samples` calls over K + 1 rows; then the editing pass.
    """
    traj, inner_mode, edit = policy_modes(arm["policy"])

    def fwd(mode):
        return best(timings, mode, "forward_ms")

    if arm["method"] == "direct":
        return (
            steps * fwd(traj)
            + steps * 2 * fwd(edit)
            + mask_samples * (k + 1) * fwd(edit)
            + steps * 2 * (k + 1) * fwd(edit)
        )
    nti = steps * fwd(traj) + steps * (
        2 * fwd(traj) + inner * best(timings, inner_mode, "forward_backward_ms")
    )
    if arm["per_image"]:
        return k * (nti + steps * 2 * 2 * fwd(edit))
    return nti + steps * 2 * (k + 1) * fwd(edit)


# --- 2. the arms -----------------------------------------------------------------------------


def make_arms(batches: list[int], device: torch.device) -> list[dict]:
    arms = [
        {
            "name": "per-image loop, reference",
            "preset": "reference",
            "batch": 1,
            "method": "null_text",
            "per_image": True,
        }
    ]
    for preset in ("reference", "fast", "fastest"):
        for b in batches:
            arms.append(
                {
                    "name": f"{preset} x{b}",
                    "preset": preset,
                    "batch": b,
                    "method": "null_text",
                    "per_image": False,
                }
            )
    arms.append(
        {
            "name": f"direct + noise blend, fastest x{batches[0]}",
            "preset": "fastest",
            "batch": batches[0],
            "method": "direct",
            "per_image": False,
        }
    )
    for arm in arms:
        arm["policy"] = resolve_precision(InversionConfig(precision=arm["preset"]), None, device)
    return arms


def run_arm(sd, arm: dict, images, steps: int, inner: int, k: int) -> dict:
    """Seconds per source and peak memory of one arm (early stopping off: fixed inner steps)."""
    inv = InversionConfig(
        method=arm["method"],
        precision=arm["preset"],
        num_inference_steps=steps,
        num_inner_steps=inner,
        early_stop_epsilon=0.0,
        early_stop_slope=0.0,
        batch_size=arm["batch"],
        learning_rate=5e-2,
    )
    blend = {"local_blend": True, "blend_mask": "noise"} if arm["method"] == "direct" else {}
    editor = Editor(
        sd, EditConfig(edit_batch_size=arm["batch"], **blend), inv, EngineComputeConfig(gpu_memory_gb=None)
    )
    n = len(images)
    if sd.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(sd.device)
    start = time.perf_counter()
    if arm["per_image"]:
        for image in images:
            for edit in EDITS[:k]:
                _, errors = edit_many(editor, [image], [SOURCE], [[edit]])
                assert not errors, errors
    else:
        _, errors = edit_many(editor, images, [SOURCE] * n, [EDITS[:k]] * n)
        assert not errors, errors
    sync(sd.device)
    seconds = (time.perf_counter() - start) / n
    peak = torch.cuda.max_memory_allocated() / 1024**3 if sd.device.type == "cuda" else float("nan")
    return {"seconds_per_source": seconds, "peak_gb": peak}


def phantoms(n: int, resolution: int) -> list[np.ndarray]:
    from prism_ray.phantom.render import PhantomAttributes, render_phantom

    attrs = PhantomAttributes(cardiomegaly=True, devices=frozenset({"pacemaker"}))
    return [
        np.repeat(render_phantom(attrs, seed=i, resolution=resolution)[:, :, None], 3, axis=2)
        for i in range(n)
    ]


# --- 3. the fine-tune core step --------------------------------------------------------------


def finetune_rates(sd, modes: list[tuple[str, int]], steps: int) -> dict:
    """img/s of `training.step.core_step` on cached latents: fp32 (TF32), bf16 autocast, bf16 weights."""
    import copy

    from prism_ray.training.diffusion import configure_unet, make_noise_scheduler, step_generator
    from prism_ray.training.step import core_step, make_adamw

    scheduler = make_noise_scheduler()
    side, dim = int(sd.unet.config.sample_size), int(sd.unet.config.cross_attention_dim)
    out = {}
    for mode, batch in modes:
        unet = copy.deepcopy(sd.unet)
        if mode == "bf16 weights":
            unet.to(torch.bfloat16)
        configure_unet(unet)
        optimizer = make_adamw(unet.parameters(), device=sd.device)
        latents = torch.randn(batch, int(unet.config.in_channels), side, side, device=sd.device)
        context = torch.randn(batch, 77, dim, device=sd.device)
        autocast = torch.bfloat16 if mode == "bf16 autocast" else None
        with tf32_mode(True):
            for step in range(steps + 2):
                if step == 2:  # after warm-up
                    sync(sd.device)
                    start = time.perf_counter()
                loss = core_step(
                    unet, optimizer, scheduler, latents, context, step_generator(0, 0, step), autocast
                )
            sync(sd.device)
        rate = batch * steps / (time.perf_counter() - start)
        out[f"{mode}, batch {batch}"] = {"img_per_s": rate, "last_loss": float(loss)}
        print(f"  fine-tune {mode} batch {batch}: {rate:.1f} img/s", flush=True)
        del unet, optimizer
        if sd.device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# --- the report ------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        (
            f"Machine: {meta['machine']}; {meta['model']}; T = {meta['steps']} DDIM steps, {meta['inner']} "
            f"inner steps (fixed), K = {meta['edits']} edits; arms run at T = {meta['short_steps']} and scaled "
            f"by {meta['steps']}/{meta['short_steps']}."
        ),
        "",
        "| U-Net per image (ms) | batch | fp32 fwd | fp32 fwd+bwd | TF32 fwd | TF32 fwd+bwd | bf16 fwd | bf16 fwd+bwd |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in meta["unet_batches"]:
        cells = [
            f"{result['unet'][m][b]['forward_ms']:.2f} | {result['unet'][m][b]['forward_backward_ms']:.2f}"
            for m in MODES
        ]
        lines.append(f"| | {b} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| arm | s / source | bound (s) | ratio to bound | peak GPU memory (GB) |",
        "|---|---|---|---|---|",
    ]
    for arm in result["arms"]:
        lines.append(
            f"| {arm['name']} | {arm['seconds_per_source']:.3f} | {arm['bound_s']:.3f} | "
            f"{arm['ratio_to_bound']:.2f} | {arm['peak_gb']:.1f} |"
        )
    check = result.get("full_length_check")
    if check:
        lines += [
            "",
            (
                f"Full-length check ({check['arm']}, T = {meta['steps']}): {check['seconds_per_source']:.3f} "
                f"s/source measured vs {check['extrapolated']:.3f} extrapolated "
                f"({check['relative_difference']:+.1%})."
            ),
        ]
    lines += ["", "| fine-tune core step | img/s |", "|---|---|"]
    lines += [f"| {name} | {row['img_per_s']:.1f} |" for name, row in result["finetune"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny family, tiny settings (a test runs this)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps the results are stated for")
    ap.add_argument("--short-steps", type=int, default=10, help="DDIM steps the arms actually run")
    ap.add_argument("--inner", type=int, default=10, help="fixed null-text inner steps")
    ap.add_argument("--edits", type=int, default=4, help="K edits per source")
    ap.add_argument("--sources", type=int, default=8, help="sources per batched arm (the loop runs 1)")
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--unet-batches", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--repeats", type=int, default=5, help="timed U-Net calls per cell")
    ap.add_argument("--finetune-steps", type=int, default=10)
    ap.add_argument("--out", default="outputs/bench_gpu")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.steps, args.short_steps, args.inner, args.edits = "cpu", 4, 2, 2, 2
        args.sources, args.batches, args.unet_batches, args.repeats, args.finetune_steps = (
            2,
            [2],
            [1, 2],
            1,
            2,
        )
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device (use --smoke on CPU)")
    t0 = time.perf_counter()
    sd = load_models(args)
    device = sd.device
    print(f"U-Net timings ({device})", flush=True)
    timings = unet_timings(sd, args.unet_batches, args.repeats)
    mask_samples = EditConfig().noise_mask_samples
    images = phantoms(args.sources, sd.resolution)
    scale = args.steps / args.short_steps
    arms = []
    for arm in make_arms(args.batches, device):
        measured = run_arm(
            sd,
            arm,
            images[: 1 if arm["per_image"] else args.sources],
            args.short_steps,
            args.inner,
            args.edits,
        )
        bound = arm_bound(
            arm,
            timings,
            args.steps,
            args.inner,
            args.edits,
            mask_samples,
        )
        seconds = measured["seconds_per_source"] * scale
        row = {
            "name": arm["name"],
            "preset": arm["preset"],
            "batch": arm["batch"],
            "method": arm["method"],
            "seconds_per_source": seconds,
            "bound_s": bound,
            "ratio_to_bound": seconds / bound,
            "peak_gb": measured["peak_gb"],
        }
        arms.append(row)
        print(
            f"  {row['name']}: {seconds:.3f} s/source (bound {bound:.3f}, x{row['ratio_to_bound']:.2f}), "
            f"peak {row['peak_gb']:.1f} GB",
            flush=True,
        )
    default = resolve_precision(InversionConfig(), None, device).name
    check_arm = next(
        a
        for a in make_arms(args.batches, device)
        if a["preset"] == default
        and a["batch"] == args.batches[0]
        and a["method"] == "null_text"
        and not a["per_image"]
    )
    full = run_arm(sd, check_arm, images[: args.batches[0]], args.steps, args.inner, args.edits)
    extrapolated = next(a for a in arms if a["name"] == check_arm["name"])["seconds_per_source"]
    check = {
        "arm": check_arm["name"],
        "seconds_per_source": full["seconds_per_source"],
        "extrapolated": extrapolated,
        "relative_difference": extrapolated / full["seconds_per_source"] - 1,
    }
    print("fine-tune core step", flush=True)
    ft_modes = [("fp32", 16), ("bf16 autocast", 16), ("bf16 weights", 16), ("bf16 weights", 32)]
    if args.smoke:
        ft_modes = [("fp32", 2), ("bf16 autocast", 2)]
    finetune = finetune_rates(sd, ft_modes, args.finetune_steps)
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    )
    result = {
        "meta": {
            "machine": f"{name}, torch {torch.__version__}",
            "model": "tiny family" if args.smoke else "SD1.5-shaped random weights, 512 px",
            "steps": args.steps,
            "short_steps": args.short_steps,
            "inner": args.inner,
            "edits": args.edits,
            "sources": args.sources,
            "unet_batches": args.unet_batches,
            "default_cuda_preset": resolve_precision(InversionConfig(), None, "cuda").name,
            "presets": {k: str(v) for k, v in PRESETS.items()},
            "minutes": (time.perf_counter() - t0) / 60,
            "command": "python benchmarks/bench_gpu.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        "unet": timings,
        "arms": arms,
        "full_length_check": check,
        "finetune": finetune,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "results.md").write_text(markdown(result))
    print(markdown(result))
    print(f"done in {result['meta']['minutes']:.1f} min", flush=True)
    return 0 if all(math.isfinite(a["seconds_per_source"]) for a in arms) else 1


if __name__ == "__main__":
    raise SystemExit(main())
