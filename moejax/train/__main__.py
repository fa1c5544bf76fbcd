"""`python -m moejax.train`: the same as `moejax-train`."""

from moejax.cli import main

main()
