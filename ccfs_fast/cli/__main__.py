"""`python -m ccfs_fast.cli`: the console script."""
from ccfs_fast.cli import entry

entry()
