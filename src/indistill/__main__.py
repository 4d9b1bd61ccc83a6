"""``python -m indistill``: the same command line as the ``indistill`` script."""

import sys

from .cli import main

if __name__ == "__main__":  # importing this module (docs, tools) must not run the CLI
    sys.exit(main())
