"""Entrypoint for `ray job submit -- python jobs/audit.py --config ...` (same as `prism-ray audit`)."""

import sys

from prism_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["audit", *sys.argv[1:]]))
