"""Entrypoint for `python jobs/edit.py IMAGE... --prompt ... --do ... --out DIR` (same as `prism-ray edit`)."""

import sys

from prism_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["edit", *sys.argv[1:]]))
