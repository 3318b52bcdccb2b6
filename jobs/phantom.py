"""Entrypoint for `ray job submit -- python jobs/phantom.py --config ...` (same as `prism-ray phantom`)."""

import sys

from prism_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["phantom", *sys.argv[1:]]))
