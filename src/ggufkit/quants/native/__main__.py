"""`python -m ggufkit.quants.native [status|build]`: the native kernel library's state, or build it now."""

import sys

from . import main

sys.exit(main(sys.argv[1:]))
