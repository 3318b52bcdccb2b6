"""`prism-ray` lists its jobs and reports config errors in one line."""

import subprocess
import sys


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "prism_ray.cli", *args], capture_output=True, text=True)


def test_help_lists_jobs():
    out = _cli("--help")
    assert out.returncode == 0
    assert "tiny-family" in out.stdout


def test_config_error_is_one_line(tmp_path):
    out = _cli("tiny-family", "--set", f"out={tmp_path}", "--set", "resolution=70")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "'resolution'" in out.stderr


def test_tiny_family_job_writes_a_loadable_folder(tmp_path):
    out = _cli("tiny-family", "--set", f"out={tmp_path / 'fam'}", "--set", "seed=3")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "fam" / "unet" / "config.json").exists()


def test_help_does_not_import_the_jobs():
    code = "import sys; from prism_ray import cli; cli.build_parser(); print('prism_ray.pipelines.augment' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_broken_job_import_is_shown_not_hidden(monkeypatch):
    import pytest

    from prism_ray import cli

    monkeypatch.setitem(cli.JOBS, "augment", cli.Job("", "prism_ray.no_such_module:Config", "prism_ray.x:run"))
    with pytest.raises(ModuleNotFoundError, match="prism_ray.no_such_module"):
        cli.main(["augment", "--print-config"])


def test_config_files_merge_in_order_and_set_wins(tmp_path):
    job, compute = tmp_path / "job.yaml", tmp_path / "compute.yaml"
    job.write_text("out: a\nseed: 1\nresolution: 32\n")
    compute.write_text("seed: 2\n")
    out = _cli("tiny-family", "--config", str(job), "--config", str(compute), "--set", "resolution=48", "--print-config")
    assert out.returncode == 0, out.stderr
    assert "seed: 2" in out.stdout and "resolution: 48" in out.stdout and "out: a" in out.stdout


def test_the_registry_names_the_runner_of_every_job_that_needs_one():
    """Pipelines never pick their runner (no import of prism_ray.distributed: `lint-imports`): a job whose
    run(config, runner) has no default gets it from JOBS, and every reference there loads a callable."""
    import inspect

    from prism_ray import cli

    for name, job in cli.JOBS.items():
        runner_param = inspect.signature(cli._load(job.run)).parameters["runner"]
        assert (runner_param.default is inspect.Parameter.empty) == (job.runner is not None), name
        runner = cli.load_runner(job)
        loaded = list(runner.values()) if isinstance(runner, dict) else [runner] if runner else []
        assert all(callable(r) and r.__module__.startswith("prism_ray.distributed.") for r in loaded), name


def test_every_job_has_a_one_line_entrypoint_and_tiny_configs_load():
    from pathlib import Path

    from prism_ray import cli
    from prism_ray.config import load_config

    repo = Path(__file__).resolve().parents[1]
    for name in cli.JOBS:
        script = repo / "jobs" / f"{name.replace('-', '_')}.py"
        assert f'main(["{name}", *sys.argv[1:]])' in script.read_text(), script
    for path in sorted((repo / "configs").glob("*_*.yaml")):
        name = path.stem.rsplit("_", 1)[0]
        compute = sorted((repo / "configs" / "compute").glob(f"{name}_*.yaml"))
        for extra in [None, *compute]:
            files = [path] + ([extra] if extra else [])
            load_config(cli._load(cli.JOBS[name].config), files)  # validates, or raises naming the field


def test_cross_field_checks_run_when_the_config_loads(tmp_path):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "finetune_tiny.yaml"
    out = _cli("finetune", "--config", str(config), "--set", "train.precision=fp16", "--print-config")
    assert out.returncode == 2 and "train.precision" in out.stderr and out.stderr.count("\n") == 1


def test_version_is_the_package_version():
    from importlib.metadata import version

    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"prism-ray {version('prism-ray')}"


def test_print_config_shows_defaults_and_marks_missing_required_fields():
    out = _cli("augment", "--set", "seed=5", "--print-config")
    assert out.returncode == 0, out.stderr
    assert "output: <required>" in out.stdout and "subgroups: <required>" in out.stdout
    assert "seed: 5" in out.stdout and "num_inference_steps: 50" in out.stdout  # defaults, nested ones too


def test_print_config_still_rejects_a_wrong_key():
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "augment_tiny.yaml"
    out = _cli("augment", "--config", str(config), "--set", "outptu=x", "--print-config")
    assert out.returncode == 2 and "'outptu'" in out.stderr and out.stderr.count("\n") == 1


def test_submit_checks_the_config_before_any_cluster(tmp_path):
    """No cluster at this address: a config error still exits 2 with its one line, never 1."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "augment_tiny.yaml"
    args = ("submit", "augment", "--config", str(config), "--address", "http://127.0.0.1:9")
    wrong = _cli(*args, "--set", "inversion.num_steps=3")
    assert wrong.returncode == 2 and "inversion.num_steps" in wrong.stderr and wrong.stderr.count("\n") == 1
    unknown = _cli(*args, "--set", "subgroups.0.interventions=[Pacemaker=0]")
    assert unknown.returncode == 2 and "Pacemaker" in unknown.stderr
    unreachable = _cli(*args, "--set", f"output={tmp_path}")
    assert unreachable.returncode == 1 and "127.0.0.1:9" in unreachable.stderr.strip().splitlines()[-1]


def test_cluster_commands_are_not_jobs():
    from prism_ray import cli

    assert set(cli.CLUSTER_COMMANDS).isdisjoint(cli.JOBS)
    args = cli.build_parser().parse_args(["logs", "prism-augment-0123", "--follow"])
    assert args.job == "logs" and args.submission_id == "prism-augment-0123" and args.follow


def test_an_unreachable_ray_address_is_one_line_and_exit_1(tmp_path):
    """RAY_ADDRESS naming a port nothing listens on: ray.init would retry for minutes; the job says so at once."""
    import os
    import socket

    from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset

    data = write_phantom_dataset(str(tmp_path / "data"), PhantomDatasetConfig(n_subjects=12, seed=1))
    with socket.socket() as s:  # a free port, closed again: connections to it are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(
        [sys.executable, "-m", "prism_ray.cli", "augment", "--config", "configs/augment_tiny.yaml",
         "--set", f"data.manifest={data.manifest_uri}", "--set", f"output={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{port}"),
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("prism-ray augment:")]
    assert len(errors) == 1 and f"RAY_ADDRESS=127.0.0.1:{port}: nothing answers" in errors[0], out.stderr
    assert "Traceback" not in out.stderr
