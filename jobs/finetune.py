"""Entrypoint: `ray job submit --working-dir . -- python jobs/finetune.py --config configs/finetune_tiny.yaml`."""

import argparse
import os

import ray

from prism_ray.config import load_config
from prism_ray.distributed.trainer import finetune
from prism_ray.pipelines.finetune import FinetuneConfig

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    config = load_config(FinetuneConfig, args.config, args.overrides)  # fails here, before Ray starts
    ray.init(address=os.environ.get("RAY_ADDRESS"))  # the cluster under `ray job submit`, else local
    result = finetune(config)
    print(f"run {result.run_path}: step {result.final_step}, model {result.model_path}")
