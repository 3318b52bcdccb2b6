"""Shared fixtures: one tiny model family and (lazily) one local Ray per test session."""

from __future__ import annotations

import os

import pytest

# Deterministic, quiet, CPU-only defaults for every test process (and Ray workers it starts).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def pytest_configure(config):
    """One intra-op thread for the whole session: the tiny models are faster that way on 2 cores
    shared with Ray workers, and numerics do not change with the order tests run in."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _prism_ray_logger_restored():
    """`cli.main` gives the `prism_ray` logger its own handler and stops propagation (console.py), as a
    job process should; in the test process that would hide records from later tests' `caplog`."""
    import logging

    logger = logging.getLogger("prism_ray")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """Path of a freshly built tiny SD family (random weights, seed 0)."""
    from prism_ray.models.tiny import build_tiny_family

    return build_tiny_family(tmp_path_factory.mktemp("tiny") / "family")


@pytest.fixture(scope="session")
def tiny_sd(tiny_family):
    """The tiny family loaded on CPU in fp32 through the production loader."""
    from prism_ray.models.loading import load_sd_components

    return load_sd_components(str(tiny_family), device="cpu")


@pytest.fixture(scope="session")
def calm_sd(tiny_family):
    """Own copy of the tiny family with the U-Net's output layer scaled by 0.01.

    With random weights, guided (w = 7.5) DDIM steps of the raw tiny U-Net expand differences ~2x per
    step, so float rounding alone grows to percent-level errors over 10 steps; a small output layer
    makes eps small and the steps well conditioned, as a trained denoiser's are.
    """
    import torch

    from prism_ray.models.loading import load_sd_components

    sd = load_sd_components(str(tiny_family), device="cpu")
    with torch.no_grad():
        sd.unet.conv_out.weight.mul_(0.01)
        sd.unet.conv_out.bias.mul_(0.01)
    return sd


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts the tests' local Ray down at the end of the session."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_session):
    """A local Ray (2 CPUs) shared by the tests that need it; started again for a module if a test
    (e.g. one that runs a job in a fresh process, which must be the only Ray here) shut it down."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}},
        )
    return ray
