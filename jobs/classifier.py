"""Entrypoint for `ray job submit -- python jobs/classifier.py --config ...` (same as `prism-ray classifier`)."""

import sys

from prism_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["classifier", *sys.argv[1:]]))
