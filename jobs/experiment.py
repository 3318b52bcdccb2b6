"""Entrypoint for `ray job submit -- python jobs/experiment.py --config ...` (same as `prism-ray experiment`)."""

import sys

from prism_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", *sys.argv[1:]]))
