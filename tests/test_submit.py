"""`prism-ray submit` and plain `ray job submit` against a real Ray head with token auth (its own processes)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The tiny augment job at its smallest: 3 DDIM steps, 1 inner step, one accepted edit per subgroup.
SMALL = ["inversion.num_inference_steps=3", "inversion.num_inner_steps=1", "subgroups.0.quota=1",
         "subgroups.1.quota=1", "filter.s_clip_min=-1", "compute.num_actors=1"]
CONFIGS = ["--config", str(REPO / "configs/augment_tiny.yaml"), "--config", str(REPO / "configs/compute/augment_cpu.yaml")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's env without any Ray address or auth of its own, nor pytest's markers (under them
    Ray behaves as in its own tests: the driver's log lines went missing); the venv's `python` first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "PYTEST_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def _wait_for_dashboard(url: str, token: str, head: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"Ray dashboard at {url} not up after {timeout_s:.0f}s")


def _stop(head: subprocess.Popen, tree: set[int]) -> None:
    """Stop only what this head started: its process group, then every descendant seen (workers
    and job drivers run in their own sessions). SIGTERM first; `ray start --block` may hang on it."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            pass
        for pid in tree:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (head.poll() is None or any(psutil.pid_exists(p) for p in tree)):
            time.sleep(0.5)
    head.wait(timeout=5)


def _descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


@pytest.fixture(scope="module")
def head():
    """A Ray head with RAY_AUTH_MODE=token in a short temp dir, on free ports; killed at the end."""
    temp_dir = tempfile.mkdtemp(prefix="prh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = secrets.token_hex(16)
    dashboard = _free_port()
    ports = {"port": _free_port(), "dashboard-port": dashboard, "ray-client-server-port": _free_port(),
             "dashboard-agent-listen-port": _free_port(), "dashboard-agent-grpc-port": _free_port(),
             "metrics-export-port": _free_port(), "runtime-env-agent-port": _free_port()}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
           "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats",
           *[f"--{k}={v}" for k, v in ports.items()]]
    with open(Path(temp_dir) / "ray_start.log", "w") as log:  # the child keeps its own copy of the fd
        proc = subprocess.Popen(cmd, env=_clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    tree: set[int] = set()
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_dashboard(address, token, proc)
        yield {"address": address, "token": token, "tree": tree, "pid": proc.pid}
    finally:
        tree |= _descendants(proc.pid)
        _stop(proc, tree)
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
        assert not left, f"Ray processes of this test survived: {left}"


def _prism(head: dict, *args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """`prism-ray ...` with only the token in its env (no RAY_AUTH_MODE): our header must carry it."""
    head["tree"] |= _descendants(head["pid"])  # job drivers and workers, while they are alive
    out = subprocess.run([str(BIN / "prism-ray"), *args, "--address", head["address"]], capture_output=True,
                         text=True, timeout=timeout, env=env or _clean_env(RAY_AUTH_TOKEN=head["token"]), cwd=REPO,
                         check=False)
    head["tree"] |= _descendants(head["pid"])
    return out


def _submit(head: dict, *overrides: str, wait: bool = True) -> subprocess.CompletedProcess:
    sets = [a for o in [*SMALL, *overrides] for a in ("--set", o)]
    return _prism(head, "submit", "augment", *CONFIGS, *sets, *([] if wait else ["--no-wait"]))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> str:
    from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset

    out = tmp_path_factory.mktemp("phantoms") / "data"
    return write_phantom_dataset(str(out), PhantomDatasetConfig(n_subjects=24)).manifest_uri


def _jobs(head: dict) -> str:
    out = _prism(head, "jobs")
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_config_errors_are_caught_before_the_cluster(head, phantoms, tmp_path):
    wrong_key = _submit(head, f"data.manifest={phantoms}", f"output={tmp_path}/a", "inversion.num_steps=3")
    assert wrong_key.returncode == 2 and "inversion.num_steps" in wrong_key.stderr
    assert wrong_key.stderr.count("\n") == 1
    pacemaker = _submit(head, f"data.manifest={phantoms}", f"output={tmp_path}/b", "subgroups.0.interventions=[Pacemaker=0]")
    assert pacemaker.returncode == 2 and "Pacemaker" in pacemaker.stderr and pacemaker.stderr.count("\n") == 1
    assert "prism-" not in _jobs(head)  # nothing was submitted


def test_submit_runs_the_job_and_a_resubmit_attaches(head, phantoms, tmp_path):
    from prism_ray.data.storage import read_table

    out = _submit(head, f"data.manifest={phantoms}", f"output={tmp_path}/out")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "augment: output " in out.stdout  # the job's logs were tailed
    rows = read_table(f"{tmp_path}/out/manifest.parquet").to_pylist()
    in_quota = [r for r in rows if r["quota_status"] == "in_quota" and r["accepted"]]
    assert {r["subgroup"] for r in in_quota} == {"effusion", "devices"} and len(in_quota) == 2
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["subgroups"]["effusion"]["accepted"] >= 1

    again = _submit(head, f"data.manifest={phantoms}", f"output={tmp_path}/out")
    assert again.returncode == 0 and "already SUCCEEDED; attaching" in again.stderr
    ids = [line.split()[0] for line in _jobs(head).splitlines()[1:]]
    assert len(ids) == 1 and ids[0].startswith("prism-augment-")
    status = _prism(head, "status", ids[0])
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout


def test_plain_ray_job_submit_with_absolute_paths(head, phantoms, tmp_path):
    """The documented `ray job submit -- python jobs/augment.py --config ...` path, its config outside the repo."""
    config = tmp_path / "resolved.yaml"
    sets = [a for o in [*SMALL, f"data.manifest={phantoms}", f"output={tmp_path}/plain"] for a in ("--set", o)]
    printed = subprocess.run([str(BIN / "prism-ray"), "augment", *CONFIGS, *sets, "--print-config"],
                             capture_output=True, text=True, check=True, cwd=REPO)
    config.write_text(printed.stdout)
    head["tree"] |= _descendants(head["pid"])
    out = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head["address"], "--working-dir", str(REPO),
         "--", "python", "jobs/augment.py", "--config", str(config)],
        capture_output=True, text=True, timeout=240, cwd=REPO, check=False,
        env=_clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head["token"]),  # the Ray CLI needs the mode too
    )
    assert out.returncode == 0 and "succeeded" in out.stdout, (out.stdout + out.stderr)[-2000:]
    assert (tmp_path / "plain" / "run_summary.json").exists()


def test_s3_output_on_a_loopback_server(head, phantoms):
    moto_server = pytest.importorskip("moto.server")
    fsspec = pytest.importorskip("fsspec")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",  # moto's fake keys
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        fs = fsspec.filesystem("s3", skip_instance_cache=True, endpoint_url=env["AWS_ENDPOINT_URL"],
                               key="testing", secret="testing")
        fs.mkdir("prism-submit")
        env_sets = [f"compute.env_vars.{k}={v}" for k, v in env.items()]  # reach the driver and the actors
        out = _submit(head, f"data.manifest={phantoms}", "output=s3://prism-submit/augment", *env_sets)
        assert out.returncode == 0, out.stderr[-2000:]
        assert fs.exists("prism-submit/augment/manifest.parquet")
        summary = json.loads(fs.cat("prism-submit/augment/run_summary.json"))
        assert summary["subgroups"]["devices"]["accepted"] >= 1
    finally:
        server.stop()


@pytest.fixture(scope="module")
def failed_job(head, tmp_path_factory) -> tuple[subprocess.CompletedProcess, str]:
    """A job that fails on the cluster (its manifest is missing): the submit's result and the job's id."""
    tmp = tmp_path_factory.mktemp("failed")
    out = _submit(head, f"data.manifest={tmp}/missing.parquet", f"output={tmp}/out")
    (sid,) = [line.split()[-1] for line in out.stderr.splitlines() if line.startswith("prism-ray submit: submitted ")]
    return out, sid


def test_a_job_failing_on_the_cluster_exits_1_with_its_error(failed_job):
    out, _ = failed_job
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert "FAILED (exit 1)" in last and "missing.parquet" in last


def test_a_shortfall_exits_3(head, phantoms, tmp_path):
    """A filter nothing passes and one round: the job ends with exit 3, so does `prism-ray submit`."""
    out = _submit(head, f"data.manifest={phantoms}", f"output={tmp_path}/short", "filter.s_clip_min=1.0",
                  "subgroups.1.quota=0", "planner.max_rounds=1")
    assert out.returncode == 3, out.stderr[-2000:]
    assert "(exit 3)" in out.stderr and "incomplete" in out.stderr


def test_status_of_a_failed_job_names_its_error(head, failed_job):
    """Not Ray's "..., last available logs (truncated to 20,000 chars):" with nothing after it."""
    status = _prism(head, "status", failed_job[1])
    assert status.returncode == 0 and status.stdout.count("\n") == 1, status.stdout
    assert "FAILED (exit 1)" in status.stdout and "missing.parquet" in status.stdout
    assert "last available logs" not in status.stdout


def test_jobs_shows_the_job_and_its_configs_not_the_wrapper(head, failed_job):
    (row,) = [line for line in _jobs(head).splitlines() if line.startswith(failed_job[1] + " ")]
    assert "FAILED" in row and "printf" not in row and "PRISM_RAY_CONFIG" not in row
    assert "augment --config configs/augment_tiny.yaml --config configs/compute/augment_cpu.yaml --set" in row
    assert "missing.parquet" in row  # the --set overrides, as given


def test_the_token_in_rays_default_file_is_enough(head, tmp_path):
    """Where `ray get-auth-token --generate` and a local `ray.init()` keep it: ~/.ray/auth_token, no env var."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(head["token"] + "\n")
    out = _prism(head, "jobs", env=_clean_env(HOME=str(home)))
    assert out.returncode == 0 and out.stdout.startswith("ID "), out.stderr[-2000:]


def test_without_a_token_the_cluster_refusal_is_one_line(head, tmp_path):
    home = tmp_path / "empty-home"
    home.mkdir()
    for args in (("jobs",), ("status", "prism-augment-0123")):
        out = _prism(head, *args, env=_clean_env(HOME=str(home)))
        assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr[-2000:]
        assert "wants a token" in out.stderr and "RAY_AUTH_TOKEN" in out.stderr and "Traceback" not in out.stderr
    wrong = _prism(head, "jobs", env=_clean_env(HOME=str(home), RAY_AUTH_TOKEN="not-the-token"))
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1 and "RAY_AUTH_TOKEN was refused" in wrong.stderr


def test_paths_the_cluster_cannot_use_exit_2_before_any_upload(head, tmp_path):
    before = _jobs(head).splitlines()[1:]
    shipped = _prism(head, "submit", "augment", *CONFIGS)  # the tiny configs as shipped: runs/... paths
    assert shipped.returncode == 2 and shipped.stderr.count("\n") == 1, shipped.stderr[-2000:]
    assert "config field 'data.manifest': relative path 'runs/phantoms/manifest.parquet'" in shipped.stderr
    assert "runs/ is excluded" in shipped.stderr and "'output'" in shipped.stderr

    relative_out = _submit(head, f"data.manifest={tmp_path}/m.parquet", "output=results/augment")
    assert relative_out.returncode == 2 and relative_out.stderr.count("\n") == 1
    assert "config field 'output': relative path 'results/augment'" in relative_out.stderr

    # configs/augment_sd15.yaml's CLIP is a hub id; cluster/runtime_env.yaml sets HF_HUB_OFFLINE=1
    sd15 = ["--config", str(REPO / "configs/augment_sd15.yaml"), "--set", f"data.manifest={tmp_path}/m.parquet",
            "--set", f"output={tmp_path}/sd15"]
    hub = _prism(head, "submit", "augment", *sd15)
    assert hub.returncode == 2 and hub.stderr.count("\n") == 1
    assert "config field 'model.clip_path': 'openai/clip-vit-large-patch14' is a hub id" in hub.stderr
    assert "HF_HUB_OFFLINE=1" in hub.stderr
    assert _jobs(head).splitlines()[1:] == before  # nothing was submitted
