"""Entrypoint for `ray job submit -- python jobs/finetune.py --config ...` (same as `prism-ray finetune`)."""

import sys

from prism_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
