"""`python -m dptrain` (what torchrun launches) is the `dptrain` command."""

from .cli import main

main()
