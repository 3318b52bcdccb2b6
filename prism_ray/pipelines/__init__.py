"""One module per job: its typed config and run(config, runner=None); no Ray imports."""
