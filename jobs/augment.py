"""Entrypoint for `ray job submit -- python jobs/augment.py --config ...` (same as `prism-ray augment`)."""

import sys

from prism_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["augment", *sys.argv[1:]]))
