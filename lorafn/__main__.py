"""`python -m lorafn` is the `lorafn` command."""

from lorafn.cli import main

main()
