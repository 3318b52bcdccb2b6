"""cluster/ as written: KubeRay manifests, launcher files, Dockerfile and .dockerignore agree with the code.

Nothing is deployed here: the checks read the files and hold them against what the jobs need
(the pinned Ray, the configs' GPU counts, the paths inside the image, the project's config loader).
"""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import ray
import yaml
from packaging.specifiers import SpecifierSet

from prism_ray import cli
from prism_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
YAML_FILES = sorted(CLUSTER.glob("*.yaml"))
RAY_CONTAINERS = {"ray-head", "ray-worker"}
SUBMITTER = "ray-job-submitter"
GIB = 2**30
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
SUBMITTER_LABELS = {"prism-ray/job-submitter": "true"}
ACTOR_MEMORY = 16 * GIB  # host memory budget of one SD v1.5 + CLIP actor (cluster/README.md, Sizing)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kuberay() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in YAML_FILES for d in _docs(p) if d.get("apiVersion") == "ray.io/v1"]


def _ray_clusters() -> list[tuple[str, dict]]:
    """(file, RayClusterSpec) of the RayCluster and of every RayJob's own cluster."""
    return [(name, d["spec"] if d["kind"] == "RayCluster" else d["spec"]["rayClusterSpec"])
            for name, d in _kuberay()]


def _rayjobs() -> list[tuple[str, dict]]:
    return [(name, d) for name, d in _kuberay() if d["kind"] == "RayJob"]


def _launchers() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in YAML_FILES for d in _docs(p) if "provider" in d]


def _policies() -> list[dict]:
    return [d for p in YAML_FILES for d in _docs(p) if d.get("kind") == "NetworkPolicy"]


def _container(template: dict, name: str) -> dict:
    (found,) = [c for c in template["spec"]["containers"] if c["name"] == name]
    return found


def _templates(spec: dict) -> list[dict]:
    """The pod templates of a RayClusterSpec: head, then each worker group."""
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]


def _gpus_per_pod(group: dict) -> int:
    return int(_container(group["template"], "ray-worker")["resources"]["limits"]["nvidia.com/gpu"])


def _quantity(value: str | int) -> float:
    """A Kubernetes quantity ("64Gi", "500m", "16") as a number of bytes / cores."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    text = str(value)
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


# --- the Dockerfile and its build context -----------------------------------------------------


def _dockerfile() -> list[list[str]]:
    """Instructions as token lists (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (CLUSTER / "Dockerfile").read_text())
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [shlex.split(line) for line in lines]


def _base_image() -> str:
    (base,) = [tokens[1] for tokens in _dockerfile() if tokens[0] == "FROM"]
    return base


def _workdir() -> PurePosixPath:
    (workdir,) = [tokens[1] for tokens in _dockerfile() if tokens[0] == "WORKDIR"]
    return PurePosixPath(workdir)


def _copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY, flags (--chown=...) left out."""
    out = []
    for tokens in _dockerfile():
        if tokens[0] == "COPY":
            args = [t for t in tokens[1:] if not t.startswith("--")]
            out.append((args[:-1], args[-1]))
    return out


def _in_image(rel: str) -> PurePosixPath | None:
    """Where the repository file `rel` lands in the image, None if no COPY takes it."""
    for sources, dest in _copies():
        for src in sources:
            src = src.rstrip("/")
            base = _workdir() / dest
            if rel == src and (REPO / src).is_file():  # a file: into dest/ or as dest
                return base / PurePosixPath(src).name if dest.endswith("/") else base
            if rel.startswith(src + "/") and (REPO / src).is_dir():  # a folder: its contents into dest
                return base / rel[len(src) + 1:]
    return None


def _to_repo(path: str) -> str:
    """A path as a manifest names it (relative to the checkout, or absolute inside the image)."""
    if path.startswith("/"):
        return str(PurePosixPath(path).relative_to(_workdir()))
    return path


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern (relative to the context root, `**` = any folders) excludes a
    path that matches it or lies under a folder that matches it."""
    for pattern in patterns:
        assert not pattern.startswith("!"), "re-inclusion is not modelled here"
        regex = "".join(
            ".*" if part == "**" else re.escape(part).replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
            for part in re.split(r"(\*\*)", pattern)
        ).replace(".*/", "(.*/)?")
        parts = rel.split("/")
        if any(re.fullmatch(regex, "/".join(parts[: i + 1])) for i in range(len(parts))):
            return True
    return False


# --- entrypoints and the files they name ------------------------------------------------------


# A job or config path, relative to the checkout or absolute inside the image (group 1 = the prefix).
NAMED = re.compile(r"((?:/[\w.-]+)+/)?((?:jobs/[\w-]+\.py)|(?:configs/[\w/-]+\.yaml))")


def _entrypoint(job: dict) -> tuple[str, list[str], list[str]]:
    """(job name, config files in the repo, --set overrides) of a RayJob's entrypoint."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python", argv
    name = PurePosixPath(argv[1]).stem.replace("_", "-")
    configs, overrides = [], []
    for flag, value in zip(argv[2::2], argv[3::2], strict=True):  # flag, value pairs
        assert flag in ("--config", "--set"), f"unexpected argument {flag}"
        (configs if flag == "--config" else overrides).append(value)
    return name, [_to_repo(c) for c in configs], overrides


def _job_config(name: str, configs: list[str], overrides: Sequence[str] = ()):
    return load_config(cli._load(cli.JOBS[name].config), [REPO / c for c in configs], overrides)


def _gpu_demand(config) -> tuple[float, float]:
    """(GPUs, CPUs per GPU process) a job config asks for: Train workers or augment actors."""
    compute = config.compute
    if hasattr(compute, "num_workers"):
        return (compute.num_workers if compute.use_gpu else 0), compute.cpus_per_worker
    return compute.num_actors * compute.num_gpus_per_actor, compute.num_cpus_per_actor


# --- tests ------------------------------------------------------------------------------------


def test_every_yaml_in_cluster_parses_to_mappings():
    assert {p.name for p in YAML_FILES} >= {
        "kuberay-raycluster.yaml", "kuberay-networkpolicy.yaml", "kuberay-rayjob-finetune.yaml",
        "kuberay-rayjob-augment.yaml", "aws-cluster.yaml", "gcp-cluster.yaml", "runtime_env.yaml",
    }
    for path in YAML_FILES:
        docs = _docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path.name


def test_kuberay_manifests_are_one_raycluster_and_a_rayjob_per_job():
    kinds = sorted((d["kind"], name) for name, d in _kuberay())
    assert kinds == [("RayCluster", "kuberay-raycluster.yaml"), ("RayJob", "kuberay-rayjob-augment.yaml"),
                     ("RayJob", "kuberay-rayjob-finetune.yaml")]
    assert sorted(_entrypoint(job)[0] for _, job in _rayjobs()) == ["augment", "finetune"]
    for name, spec in _ray_clusters():
        assert _container(spec["headGroupSpec"]["template"], "ray-head"), name
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", f"{name}: work on the head"
        assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["gpu"], name
    for name, job in _rayjobs():
        assert job["spec"]["shutdownAfterJobFinishes"] is True, name


def test_ray_version_is_the_pinned_one_everywhere():
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-(gpu|cu\d+)", _base_image())
    assert match, f"base image {_base_image()} is not an official Ray GPU tag"
    assert match.group(1) == ray.__version__
    for name, spec in _ray_clusters():
        assert spec["rayVersion"] == ray.__version__, name
    (ray_pin,) = re.findall(r'"ray\[[\w,]+\]([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert ray.__version__ in SpecifierSet(ray_pin), f"pyproject.toml pins ray{ray_pin}"


def test_all_nodes_run_the_one_project_image():
    templates = [t for _, spec in _ray_clusters() for t in _templates(spec)]
    templates += [job["spec"]["submitterPodTemplate"] for _, job in _rayjobs()]
    images = {c["image"] for t in templates for c in t["spec"]["containers"]}
    images |= {launcher["docker"]["image"] for _, launcher in _launchers()}
    assert len(images) == 1 and images.pop().endswith("/prism-ray:0.1.0")


def _token_env(container: dict) -> tuple[str | None, dict | None]:
    env = {e["name"]: e for e in container.get("env", [])}
    mode = env.get("RAY_AUTH_MODE", {}).get("value")
    token = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    return mode, token


def test_token_auth_is_on_with_the_token_from_a_secret():
    for name, spec in _ray_clusters():
        auth = spec["authOptions"]
        assert auth["mode"] == "token" and auth["secretName"], name
        secret = {"name": auth["secretName"], "key": "auth_token"}  # the key KubeRay reads
        templates = _templates(spec)
        containers = [c for t in templates for c in t["spec"]["containers"] if c["name"] in RAY_CONTAINERS]
        assert len(containers) == len(templates), name
        for container in containers:
            assert _token_env(container) == ("token", secret), f"{name}: {container['name']}"
    for name, job in _rayjobs():
        submitter = _container(job["spec"]["submitterPodTemplate"], SUBMITTER)
        secret = {"name": job["spec"]["rayClusterSpec"]["authOptions"]["secretName"], "key": "auth_token"}
        assert _token_env(submitter) == ("token", secret), name
    for name, launcher in _launchers():
        assert any("export RAY_AUTH_MODE=token" in cmd for cmd in launcher["setup_commands"]), name
        assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"], name
        assert launcher["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token", name


def test_gpu_workers_tolerate_the_gpu_taint_and_have_shm_and_memory_for_the_actor():
    for name, spec in _ray_clusters():
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            worker = _container(group["template"], "ray-worker")
            limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
            gpus = int(limits["nvidia.com/gpu"])
            assert gpus >= 1 and requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"], name
            assert GPU_TOLERATION in pod["tolerations"], name
            (shm_mount,) = [m for m in worker["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            (shm,) = [v for v in pod["volumes"] if v["name"] == shm_mount["name"]]
            assert shm["emptyDir"]["medium"] == "Memory", name
            shm_bytes = _quantity(shm["emptyDir"]["sizeLimit"])
            # The object store lives in /dev/shm, and a memory emptyDir counts against the pod's limit.
            assert int(group["rayStartParams"]["object-store-memory"]) <= shm_bytes, name
            assert _quantity(limits["memory"]) >= gpus * ACTOR_MEMORY + shm_bytes + 8 * GIB, name


def test_rayjobs_run_the_rayclusters_pods():
    (cluster,) = [spec for name, spec in _ray_clusters() if name == "kuberay-raycluster.yaml"]
    for name, job in _rayjobs():
        spec = job["spec"]["rayClusterSpec"]
        assert spec["headGroupSpec"] == cluster["headGroupSpec"], name
        for mine, theirs in zip(spec["workerGroupSpecs"], cluster["workerGroupSpecs"], strict=True):
            for key in ("groupName", "rayStartParams", "template"):
                assert mine[key] == theirs[key], f"{name}: worker {key} differs from the RayCluster's"
            assert mine["replicas"] == mine["minReplicas"] == mine["maxReplicas"], name


def test_gpu_capacity_covers_what_the_compute_configs_ask_for():
    demands = {}
    for name, job in _rayjobs():
        job_name, configs, overrides = _entrypoint(job)
        gpus, cpus = _gpu_demand(_job_config(job_name, configs, overrides))
        demands[job_name] = (gpus, cpus)
        (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        per_pod = _gpus_per_pod(group)
        assert group["replicas"] * per_pod == gpus, f"{name}: {group['replicas']} pods for {gpus} GPUs"
        cpu_limit = _container(group["template"], "ray-worker")["resources"]["limits"]["cpu"]
        assert _quantity(cpu_limit) >= cpus * per_pod, name
    assert demands and all(gpus > 0 for gpus, _ in demands.values())
    most = max(gpus for gpus, _ in demands.values())
    (cluster,) = [spec for name, spec in _ray_clusters() if name == "kuberay-raycluster.yaml"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["maxReplicas"] * _gpus_per_pod(group) >= most, "the RayCluster cannot grow to the jobs' GPUs"
    for name, launcher in _launchers():
        gpu_types = [t for t in launcher["available_node_types"].values() if t["resources"].get("GPU")]
        assert sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu_types) >= most, name
        assert all(t["resources"]["CPU"] >= max(c for _, c in demands.values()) for t in gpu_types), name


def test_named_jobs_and_configs_exist_and_are_in_the_image():
    named: dict[tuple[str, str], set[str]] = {}  # (prefix, repo path) -> files naming it
    for path in YAML_FILES:
        for prefix, rel in NAMED.findall(path.read_text()):
            named.setdefault((prefix, rel), set()).add(path.name)
    assert {rel for _, rel in named} >= {
        "jobs/finetune.py", "jobs/augment.py", "configs/finetune_sd15.yaml", "configs/augment_sd15.yaml",
        "configs/compute/finetune_gpu.yaml", "configs/compute/augment_gpu.yaml",
    }
    for (prefix, rel), files in named.items():
        assert (REPO / rel).is_file(), f"{sorted(files)} name {rel}, which does not exist"
        where = _in_image(rel)
        assert where is not None, f"{sorted(files)} name {rel}, which cluster/Dockerfile does not copy"
        if prefix:  # a path inside the image (RayJob entrypoints) must be where the COPY puts it
            assert PurePosixPath(prefix + rel) == where, f"{prefix}{rel}: the image has it at {where}"
    for name, job in _rayjobs():  # RayJobs run what the image holds, not a checkout
        assert "working_dir" not in job["spec"].get("runtimeEnvYAML", ""), name
        argv = shlex.split(job["spec"]["entrypoint"])
        assert all(a.startswith(f"{_workdir()}/") for a in argv if a.endswith((".py", ".yaml"))), name


def test_rayjob_configs_validate_and_write_to_storage():
    for name, job in _rayjobs():
        job_name, configs, overrides = _entrypoint(job)
        config = _job_config(job_name, configs, overrides)
        output = config.output if job_name == "augment" else config.run.storage_path
        assert output.startswith("s3://"), f"{name}: writes to {output}, which goes with the cluster"
        assert config.model.path.startswith("s3://"), f"{name}: HF_HUB_OFFLINE=1 needs the weights on storage"


def test_every_job_and_config_pair_named_in_cluster_validates():
    pairs = 0
    for path in [*YAML_FILES, CLUSTER / "README.md"]:
        text = re.sub(r"\\\n[\s#]*", " ", path.read_text())  # join shell continuations (also in comments)
        for script, job, args in re.findall(
            r"(?:jobs/([\w-]+)\.py|prism-ray submit ([\w-]+))((?:\s+--(?:config|set)\s+\S+)+)", text
        ):
            configs = re.findall(r"--config\s+(\S+)", args)
            _job_config(job or script.replace("_", "-"), [_to_repo(c) for c in configs])
            pairs += 1
    assert pairs >= 7  # the two RayJobs, both launcher files, the README's commands


def test_dockerignore_keeps_environments_out_and_everything_the_image_copies_in():
    patterns = _dockerignore()
    for rel in [".venv", ".venv/bin/python", ".git/HEAD", "outputs/x.png", "runs/r/ckpt", ".pytest_cache/v",
                "prism_ray.egg-info", "prism_ray/engine/__pycache__/editor.cpython-311.pyc"]:
        assert _ignored(rel, patterns), rel
    copied = []
    for sources, _ in _copies():
        for src in sources:
            root = REPO / src
            files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
            copied += [str(p.relative_to(REPO)) for p in files if "__pycache__" not in p.parts]
    assert "prism_ray/data/config.py" in copied and "jobs/augment.py" in copied
    assert any(rel.startswith("prism_ray/phantom/assets/") for rel in copied)  # package data
    assert [rel for rel in copied if _ignored(rel, patterns)] == []


def test_dockerfile_installs_the_project_on_the_images_torch():
    runs = [" ".join(tokens[1:]) for tokens in _dockerfile() if tokens[0] == "RUN"]
    assert any("pip install --no-cache-dir .[s3,dicom]" in run for run in runs)
    (torch_run,) = [run for run in runs if "torch==" in run]
    assert "import" in torch_run and "||" in torch_run, "torch is installed only when the image lacks it"
    for needed in ("pyproject.toml", "README.md", "prism_ray", "jobs", "configs"):
        assert any(needed in sources for sources, _ in _copies()), needed


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _admits(policies: list[dict], labels: dict, port: int) -> bool:
    """Whether an ingress rule of `policies` lets a pod with `labels` connect to `port`."""
    for policy in policies:
        for rule in policy["spec"]["ingress"]:
            ports = [p["port"] for p in rule.get("ports", [])]
            peers = [peer["podSelector"] for peer in rule["from"] if "podSelector" in peer]
            if (not ports or port in ports) and any(_selects(peer, labels) for peer in peers):
                return True
    return False


def test_network_policy_admits_only_ray_pods_and_job_submitters_to_the_head():
    policies = _policies()
    assert policies, "no NetworkPolicy in cluster/"
    for _, spec in _ray_clusters():
        head_labels = {**spec["headGroupSpec"]["template"]["metadata"]["labels"], "ray.io/node-type": "head"}
        (group,) = spec["workerGroupSpecs"]
        worker_labels = {**group["template"]["metadata"]["labels"], "ray.io/node-type": "worker"}
        on_head = [p for p in policies if _selects(p["spec"]["podSelector"], head_labels)]
        on_workers = [p for p in policies if _selects(p["spec"]["podSelector"], worker_labels)]
        assert on_head and on_workers
        submitter = SUBMITTER_LABELS
        assert _admits(on_head, worker_labels, 6379) and _admits(on_head, worker_labels, 8265)
        assert _admits(on_head, submitter, 8265)
        assert not _admits(on_head, submitter, 6379), "submitters need the Job API only"
        assert not _admits(on_head, {"app": "anything-else"}, 8265)
        assert _admits(on_workers, head_labels, 10002) and not _admits(on_workers, submitter, 8265)
    for policy in policies:  # no rule or peer that admits every pod (of a namespace)
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), policy["metadata"]["name"]
            assert all(peer.get("podSelector", {}).get("matchLabels") for peer in rule["from"])
    for name, job in _rayjobs():
        assert job["spec"]["submitterPodTemplate"]["metadata"]["labels"] == SUBMITTER_LABELS, name


def test_launchers_are_valid_ray_configs_with_a_private_dashboard():
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert sorted(name for name, _ in _launchers()) == ["aws-cluster.yaml", "gcp-cluster.yaml"]
    for name, launcher in _launchers():
        prepared = prepare_config(copy.deepcopy(launcher))  # what `ray up` does before validating
        validate_config(prepared)
        head = " ".join(prepared["head_start_ray_commands"])
        assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head, name
        assert launcher["available_node_types"][launcher["head_node_type"]]["resources"]["CPU"] == 0, name


def test_the_head_service_stays_inside_the_cluster():
    for name, spec in _ray_clusters():
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP", name
    for path in YAML_FILES:
        for doc in _docs(path):
            assert doc.get("kind") not in ("Service", "Ingress"), f"{path.name}: exposes the head"
