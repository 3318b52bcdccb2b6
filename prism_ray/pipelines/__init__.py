"""One module per job: its typed config and run(config, runner); no Ray imports, and no import of
`prism_ray.distributed`: the runner (in-process, or a Ray adapter) is the caller's, for the CLI its job
registry's (`cli.JOBS`). Checked by the import-linter contract in pyproject.toml."""
