"""Entrypoint for `python jobs/rehearsal_family.py --set out=...` (same as `prism-ray rehearsal-family`)."""

import sys

from prism_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["rehearsal-family", *sys.argv[1:]]))
