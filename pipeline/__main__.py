"""`python -m pipeline ...` and `torchrun ... -m pipeline ...` run the CLI."""

from pipeline.cli import main

main()
