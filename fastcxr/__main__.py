"""`python -m fastcxr …` runs the command line (as `accelerate launch -m fastcxr` would)."""

from fastcxr.cli import app

app()
