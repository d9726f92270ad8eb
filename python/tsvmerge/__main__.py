"""`python -m tsvmerge`: the command line (as torchrun starts it: `torchrun ... -m tsvmerge merge ...`)."""
import sys

from .cli import main

sys.exit(main())
