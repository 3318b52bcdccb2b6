"""HTML run reports of the jobs: their tables, example grids and plots."""
