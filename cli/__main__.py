"""`python -m cli`: the `avatune` command line."""

from cli.main import app

app(prog_name="avatune")
