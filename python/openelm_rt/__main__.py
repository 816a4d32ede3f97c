"""`python -m openelm_rt ...` is the `openelm-rt` command."""
import sys

from .cli import main

sys.exit(main())
