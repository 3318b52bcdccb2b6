"""Entrypoint for `python jobs/tiny_family.py --set out=...` (same as `prism-ray tiny-family`)."""

import sys

from prism_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tiny-family", *sys.argv[1:]]))
