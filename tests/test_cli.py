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
