"""Config of the `augment` job: subgroups with quotas of accepted counterfactuals, on a Ray actor pool."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Literal, Union

from pydantic import Field, field_validator, model_validator

from prism_ray.data.captions import parse_interventions
from prism_ray.config import BaseConfig
from prism_ray.data.config import DataConfig
from prism_ray.engine.settings import EditConfig, InversionConfig
from prism_ray.models.config import ModelConfig
from prism_ray.scoring.filter import FilterConfig

SelectorValue = Union[bool, int, float, str]

# Subgroup names become folder names under the output URI: keep them path- and URI-safe.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SubgroupConfig(BaseConfig):
    """One subgroup: which source rows, which edits, and how many accepted counterfactuals to keep.

    `selector`: manifest column -> value (or a list of allowed values); all must match; empty
    selects every row. Numbers compare by value (1 matches a CheXpert 1.0).
    `interventions`: one edit each, in the compact form of `prism_ray.data.captions` ("Support
    Devices=0"; "a=1; b=0" for an edit that changes two attributes at once).
    `prompt`: the text-to-image prompt of `mode: samples` (the paper's "SD samples" arm).
    """

    name: str
    selector: dict[str, Union[SelectorValue, list[SelectorValue]]] = Field(default_factory=dict)
    interventions: list[str] = Field(default_factory=list)
    quota: int = Field(2500, ge=0, description="accepted counterfactuals (samples) to keep, exactly")
    prompt: str | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(f"must match {_NAME.pattern} (it names an output folder), got {name!r}")
        return name

    @field_validator("selector")
    @classmethod
    def _check_selector(cls, selector: dict) -> dict:
        for column, value in selector.items():
            if isinstance(value, list) and not value:
                raise ValueError(f"column {column!r}: empty list of values selects nothing")
        return selector

    @field_validator("interventions")
    @classmethod
    def _check_interventions(cls, interventions: list[str]) -> list[str]:
        canonical = []
        for spec in interventions:
            parsed = parse_interventions(spec)  # ValueError names the bad string
            if not parsed:
                raise ValueError(f"intervention {spec!r} is empty")
            canonical.append("; ".join(str(i) for i in parsed))
        if len(set(canonical)) != len(canonical):
            raise ValueError(f"duplicate interventions: {interventions}")
        return canonical

    def selector_values(self) -> dict[str, list[SelectorValue]]:
        return {c: (v if isinstance(v, list) else [v]) for c, v in self.selector.items()}


class SamplingConfig(BaseConfig):
    """Plain text-to-image sampling (`mode: samples`): DDIM with the reference betas."""

    num_inference_steps: int = Field(50, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0)
    batch_size: int = Field(4, ge=1, description="images denoised together")


class PlannerConfig(BaseConfig):
    """How rounds are sized (see prism_ray.pipelines.quota): attempts = remaining / p_hat * over_provision."""

    over_provision: float = Field(1.2, ge=1.0, le=10.0, description="safety factor on a round's attempts")
    initial_acceptance: float = Field(0.5, gt=0.0, le=1.0, description="acceptance prior before any result")
    prior_weight: float = Field(2.0, ge=0.0, description="pseudo-attempts behind the prior")
    min_acceptance: float = Field(0.05, gt=0.0, le=1.0, description="floor of the estimate (caps a round)")
    max_rounds: int = Field(5, ge=1)
    max_attempts_per_round: int | None = Field(None, ge=1, description="cap on one round's attempts")


class ComputeConfig(BaseConfig):
    """Where and how wide the job runs (not part of the results hash)."""

    num_actors: int = Field(1, ge=1, description="Ray Data actor pool size (one model copy each)")
    num_gpus_per_actor: float = Field(0.0, ge=0.0)
    num_cpus_per_actor: float = Field(1.0, gt=0.0)
    batch_size: int = Field(4, ge=1, description="sources per map_batches call (inverted together)")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per actor; default: its CPUs")
    env_vars: dict[str, str] = Field(
        default_factory=dict,
        description="non-secret env for the actors (e.g. AWS_ENDPOINT_URL); credentials: the cluster's",
    )
    kill_actor_once_after_batches: int | None = Field(
        None, ge=0, description="fault injection: an actor exits hard once, after this many finished batches"
    )


class AugmentConfig(BaseConfig):
    """`prism-ray augment`: filtered counterfactual augmentation sets (or SD samples) per subgroup."""

    model: ModelConfig = ModelConfig()
    data: DataConfig | None = Field(None, description="source manifest; required in counterfactual mode")
    subgroups: list[SubgroupConfig] = Field(..., min_length=1)
    mode: Literal["counterfactual", "samples"] = "counterfactual"
    inversion: InversionConfig = InversionConfig()
    edit: EditConfig = EditConfig()
    filter: FilterConfig = FilterConfig()
    sampling: SamplingConfig = SamplingConfig()
    output: str = Field(..., min_length=1, description="output folder, any fsspec URI")
    seed: int = Field(0, ge=0, lt=2**63, description="source order and sample generators")
    planner: PlannerConfig = PlannerConfig()
    compute: ComputeConfig = ComputeConfig()

    @model_validator(mode="after")
    def _check_subgroups(self) -> AugmentConfig:
        if self.mode == "counterfactual" and self.data is None:
            raise ValueError("data: counterfactual mode needs a source manifest (data.manifest)")
        names = [g.name for g in self.subgroups]
        if len(set(names)) != len(names):
            raise ValueError(f"subgroups: duplicate names {names}")
        for g in self.subgroups:
            if self.mode == "counterfactual" and not g.interventions:
                raise ValueError(f"subgroups.{g.name}.interventions: counterfactual mode needs at least one")
            if self.mode == "samples" and not (g.prompt and g.prompt.strip()):
                raise ValueError(f"subgroups.{g.name}.prompt: samples mode needs a prompt")
        return self

    def results_hash(self) -> str:
        """Hash of everything that changes an attempt's pixels or its accept decision.

        Quotas, selectors, planner and compute settings are left out on purpose: extending a
        quota or adding actors must keep the ids of finished work, so a re-run skips it.
        Subgroup names and interventions enter each id directly.
        """
        dump = self.model_dump(mode="json")
        model = {k: v for k, v in dump["model"].items() if k not in ("device", "cache_dir")}
        data_keys = ("image_column", "image_root", "adapter", "adapter_options")
        data = dump["data"] and {k: dump["data"][k] for k in data_keys}
        keep = {"model": model, "data": data, "mode": self.mode, "seed": self.seed}
        if self.mode == "counterfactual":
            keep.update(inversion=dump["inversion"], edit=dump["edit"], filter=dump["filter"])
        else:
            keep.update(sampling=dump["sampling"])
        canonical = json.dumps(keep, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
