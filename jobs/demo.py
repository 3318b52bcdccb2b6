"""Entrypoint for `ray job submit -- python jobs/demo.py --config ...` (same as `prism-ray demo`)."""

import sys

from prism_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
