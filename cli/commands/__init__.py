"""Command groups of the `avatune` command line."""
