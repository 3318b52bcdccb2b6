"""The SD v1.5 path rehearsed end to end: every shipped `configs/*_sd15.yaml` job through the CLI on a
rehearsal family (SD v1.5's architecture and a CLIP ViT-L/14-shaped scorer, random weights).

    python benchmarks/rehearsal_sd15.py --out outputs/rehearsal_sd15                      # full shape
    python benchmarks/rehearsal_sd15.py --out /tmp/rehearsal --scale reduced --resolution 64  # CI's

Stages, each a fresh `prism-ray` process (as a user runs them), timed, with the peak memory of its
process tree (the sum of RSS of the CLI process and every process under it: Ray's raylet, workers,
actors) sampled every 0.2 s:

  family      `prism-ray rehearsal-family`
  phantoms    `prism-ray phantom` (chest phantoms; a MIMIC-style copy of the manifest for the audit)
  finetune    configs/finetune_sd15.yaml + compute/finetune_cpu.yaml, one worker, ZeRO-2 over gloo, export
  classifier  configs/classifier_sd15.yaml + compute/classifier_cpu.yaml (the audit's classifier)
  augment     configs/augment_sd15.yaml on the exported folder, both subgroups
  audit       configs/audit_sd15.yaml on the exported folder, every intervention
  edit        `prism-ray edit` on two images with the exported folder
  submit      `prism-ray submit augment` (configs/augment_sd15.yaml) to a local Ray head started here

The configs run as shipped except for paths and the knobs a CPU needs (`CPU_KNOBS` below: steps,
inner steps, quotas, batch sizes, worker counts, and `filter.s_clip_min=-1`, because a randomly
initialised CLIP scores edits at random). Each stage's outputs are checked against its job contract;
`result.json` and `result.md` hold the times, memory and checks.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = REPO / "configs"

# The knobs a CPU needs, per stage (everything else is the shipped config).
CPU_KNOBS = {
    "finetune": ["train.max_steps=2", "train.micro_batch_size=1", "train.checkpoint_every=2",
                 "train.validation_every=2", "train.validation_steps=2", "train.log_every=1",
                 "compute.num_workers=1", "compute.cpus_per_worker=1"],
    "classifier": ["train.max_steps=2", "train.batch_size=4", "train.eval_every=2", "train.checkpoint_every=2",
                   "train.log_every=1", "compute.num_workers=1"],
    "method": ["inversion.num_inference_steps=3", "inversion.num_inner_steps=1", "filter.s_clip_min=-1"],
    "augment": ["subgroups.0.quota=1", "subgroups.1.quota=1", "compute.num_actors=1", "compute.batch_size=2"],
    "audit": ["max_sources=3", "compute.num_actors=1", "compute.batch_size=2", "stats.bootstrap=100"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/rehearsal_sd15")
    p.add_argument("--scale", choices=["full", "reduced"], default="full")
    p.add_argument("--resolution", type=int, default=128, help="image side (SD's is 512; a CPU needs less)")
    p.add_argument("--subjects", type=int, default=24, help="phantoms")
    p.add_argument("--stages", nargs="+", default=None, help="only these stages (default: all)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per stage")
    p.add_argument("--compute", choices=["cpu", "gpu"], default="cpu",
                   help="the shipped compute files: configs/compute/*_cpu.yaml or *_gpu.yaml (one GPU: 1 worker/actor)")
    p.add_argument("--finetune-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more finetune overrides, e.g. train.precision=fp32 train.zero_stage=0 (the full-shape "
                        "ZeRO-2 bf16 state, ~17 bytes per U-Net parameter, does not fit a 24 GB CPU node)")
    p.add_argument("--classifier", default=None,
                   help="the audit's classifier folder; default: trained here by the classifier stage "
                        "(CI passes 'tiny', the shipped family's, and skips that stage)")
    return p.parse_args(argv)


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


class Sampler:
    """Peak of the summed RSS of a process and all its descendants, sampled on a thread."""

    def __init__(self, pid: int, period: float = 0.2):
        self.pid, self.period, self.peak, self._stop = pid, period, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                total = 0
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(self.period)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "PYTEST_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def run_stage(name: str, args: list[str], log_dir: Path, timeout: float, env: dict | None = None,
              sample_pid: int | None = None) -> dict:
    """Run `prism-ray <args>` as a fresh process; its time, peak memory (process tree) and output."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([str(BIN / "prism-ray"), *args], stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                env=env or clean_env())
        sampler = Sampler(proc.pid)
        other = Sampler(sample_pid) if sample_pid else None
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        peak = sampler.stop()
        if other:
            peak = max(peak, other.stop())
    seconds = time.perf_counter() - t0
    text = log.read_text()
    print(f"[rehearsal] {name}: exit {rc}, {seconds:.0f}s, peak {peak / 2**30:.1f} GiB ({log})", flush=True)
    if rc != 0:
        print(text[-4000:], flush=True)
        raise SystemExit(f"stage {name} failed with exit {rc}: {log}")
    return {"seconds": round(seconds, 1), "peak_gib": round(peak / 2**30, 2), "log": str(log), "output": text}


# --- the contract checks, per stage ----------------------------------------------------------------


def read_table(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def check_images(rows: list[dict], resolution: int) -> int:
    from PIL import Image

    for r in rows:
        with Image.open(r["image_uri"]) as im:
            assert im.size == (resolution, resolution), f"{r['image_uri']}: {im.size} != {resolution}"
    return len(rows)


def check_augment(folder: Path, resolution: int) -> dict:
    rows = read_table(folder / "manifest.parquet")
    summary = json.loads((folder / "summary.json").read_text())
    accepted = [r for r in rows if r.get("accepted", True)]
    assert {r["subgroup"] for r in accepted} == {"remove_devices", "remove_effusion"}, "both subgroups"
    for r in rows:
        for key in ("s_clip", "l1", "lpips"):
            if key in r and r[key] is not None:
                assert np.isfinite(r[key]), f"{key} of {r['image_uri']} is not finite"
    for name, s in summary["subgroups"].items():
        assert s["accepted"] >= s["quota"], f"{name}: {s['accepted']} accepted < quota {s['quota']}"
    return {"rows": len(rows), "images_at_resolution": check_images(rows, resolution),
            "accepted": {n: s["accepted"] for n, s in summary["subgroups"].items()}}


def check_audit(folder: Path, interventions: int) -> dict:
    rows = read_table(folder / "rows.parquet")
    cochange = read_table(folder / "cochange.parquet")
    assert rows and cochange, "audit rows and co-change table"
    assert (folder / "report.html").stat().st_size > 0
    specs = {r["intervention"] for r in rows}
    assert len(specs) >= 2, f"interventions applied: {sorted(specs)}"
    return {"rows": len(rows), "cochange_rows": len(cochange), "interventions_applied": len(specs),
            "interventions_configured": interventions}


def check_edit(folder: Path, resolution: int) -> dict:
    from PIL import Image

    edits = sorted(folder.glob("*/edit_*.png"))
    assert len(edits) == 2, f"edit wrote {len(edits)} counterfactuals, expected 2"
    sizes = {Image.open(p).size for p in edits}
    assert sizes == {(resolution, resolution)}, f"edit PNG sizes {sizes} != {resolution}"
    return {"counterfactuals": len(edits)}


# --- data ------------------------------------------------------------------------------------------


def mimic_copy(manifest: Path, out: Path) -> Path:
    """The phantom manifest with MIMIC-CXR's demographic columns (sex M/F, integer age, race)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_table(manifest)
    races = ["white", "black", "asian"]
    for i, r in enumerate(rows):
        r["sex"] = "F" if r.pop("Sex") == "Female" else "M"
        r["age"] = max(18, int(r.pop("Age")))
        r["race"] = races[i % len(races)]
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out


# --- a local Ray head for the submit stage -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head() -> tuple[subprocess.Popen, dict]:
    temp_dir = tempfile.mkdtemp(prefix="prh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    token, dashboard = secrets.token_hex(16), free_port()
    ports = {"port": free_port(), "dashboard-port": dashboard, "ray-client-server-port": free_port(),
             "dashboard-agent-listen-port": free_port(), "dashboard-agent-grpc-port": free_port(),
             "metrics-export-port": free_port(), "runtime-env-agent-port": free_port()}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
           "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats",
           *[f"--{k}={v}" for k, v in ports.items()]]
    log = open(Path(temp_dir) / "ray_start.log", "w")  # the head keeps it open until it ends
    proc = subprocess.Popen(cmd, env=clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    import urllib.request

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ray start exited with {proc.returncode} ({temp_dir}/ray_start.log)")
        try:
            req = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return proc, {"address": address, "token": token, "temp_dir": temp_dir}
        except OSError:
            pass
        time.sleep(1.0)
    raise SystemExit("the local Ray head did not come up in 180 s")


def stop_head(proc: subprocess.Popen) -> None:
    """Kill the head's process group and every process under it (job drivers run in their own sessions)."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in tree:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait(timeout=30)


# --- the rehearsal ---------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    logs, res = out / "logs", args.resolution
    wanted = set(args.stages or ["family", "phantoms", "finetune", "classifier", "augment", "audit", "edit",
                                 "submit"])
    stages: dict[str, dict] = {}
    t0 = time.perf_counter()

    def stage(name: str, cli: list[str], **kw) -> dict | None:
        if name not in wanted:
            return None
        stages[name] = run_stage(name, cli, logs, args.timeout, **kw)
        return stages[name]

    family = out / "family"
    stage("family", ["rehearsal-family", *sets(f"out={family}", f"scale={args.scale}", f"resolution={res}")])
    sd, scorer = family / "sd15", family / "clip-vit-large-patch14"
    if "family" in stages:
        stages["family"]["disk_gb"] = round(sum(p.stat().st_size for p in family.rglob("*") if p.is_file()) / 1e9, 2)

    data = out / "phantoms"
    stage("phantoms", ["phantom", *sets(f"out={data}", f"dataset.n_subjects={args.subjects}",
                                         f"dataset.resolution={res}", "dataset.p_effusion=0.5")])
    manifest = data / "manifest.parquet"
    mimic = mimic_copy(manifest, out / "manifest_mimic.parquet") if manifest.exists() else None
    data_sets = [f"data.manifest={manifest}", f"data.image_root={data}"]

    runs = out / "runs"
    ft = stage("finetune", ["finetune", "--config", str(CONFIGS / "finetune_sd15.yaml"),
                            "--config", str(CONFIGS / f"compute/finetune_{args.compute}.yaml"),
                            *sets(f"model.path={sd}", *data_sets, f"run.storage_path={runs}", *CPU_KNOBS["finetune"],
                                 *args.finetune_set)])
    export = runs / "finetune-sd15-chexpert" / "model"
    if ft is not None:
        assert (export / "unet" / "diffusion_pytorch_model.safetensors").exists(), f"no export at {export}"
        ft["export"] = str(export)

    classifiers = out / "classifiers"
    if args.classifier:
        wanted.discard("classifier")
    stage("classifier", ["classifier", "--config", str(CONFIGS / "classifier_sd15.yaml"),
                         "--config", str(CONFIGS / f"compute/classifier_{args.compute}.yaml"),
                         *sets(*data_sets, f"run.storage_path={classifiers}", *CPU_KNOBS["classifier"])])
    classifier = args.classifier or classifiers / "chexpert-attributes" / "model"

    method = [f"model.path={export}", f"model.clip_path={scorer}", *CPU_KNOBS["method"]]
    aug = stage("augment", ["augment", "--config", str(CONFIGS / "augment_sd15.yaml"),
                            "--config", str(CONFIGS / f"compute/augment_{args.compute}.yaml"),
                            *sets(*method, *data_sets, f"output={out / 'augment'}", *CPU_KNOBS["augment"])])
    if aug is not None:
        aug["checks"] = check_augment(out / "augment", res)

    aud = stage("audit", ["audit", "--config", str(CONFIGS / "audit_sd15.yaml"),
                          "--config", str(CONFIGS / f"compute/augment_{args.compute}.yaml"),
                          *sets(*method, f"data.manifest={mimic}", f"classifiers.0.path={classifier}",
                                f"output={out / 'audit'}", *CPU_KNOBS["audit"])])
    if aud is not None:
        aud["checks"] = check_audit(out / "audit", 5)

    images = sorted(r["image_uri"] for r in read_table(manifest) if r["Support Devices"] == 1)[:2] if (
        manifest.exists()) else []
    ed = stage("edit", ["edit", *images, "--prompt", "Chest X-ray showing Support Devices", "--do",
                        "Support Devices=0", "--model", str(export), "--out", str(out / "edit"),
                        *sets(f"model.clip_path={scorer}", *CPU_KNOBS["method"][:2], "inversion.precision=fastest")])
    if ed is not None:
        ed["checks"] = check_edit(out / "edit", res)

    if "submit" in wanted:
        head, info = start_head()
        try:
            sub = stage("submit", ["submit", "augment", "--config", str(CONFIGS / "augment_sd15.yaml"),
                                   "--config", str(CONFIGS / f"compute/augment_{args.compute}.yaml"),
                                   *sets(*method, *data_sets, f"output={out / 'submit_augment'}", *CPU_KNOBS["augment"]),
                                   "--address", info["address"]],
                        env=clean_env(RAY_AUTH_TOKEN=info["token"]), sample_pid=head.pid)
            sub["checks"] = check_augment(out / "submit_augment", res)
        finally:
            stop_head(head)

    result = {"scale": args.scale, "resolution": res, "subjects": args.subjects, "finetune_set": args.finetune_set,
              "total_seconds": round(time.perf_counter() - t0, 1),
              "stages": {k: {kk: vv for kk, vv in v.items() if kk != "output"} for k, v in stages.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    lines = ["| stage | s | peak GiB (process tree) | checks |", "|---|---|---|---|"]
    for k, v in result["stages"].items():
        lines.append(f"| {k} | {v['seconds']:.0f} | {v['peak_gib']:.1f} | {json.dumps(v.get('checks', ''))} |")
    (out / "result.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return result


if __name__ == "__main__":
    main()
