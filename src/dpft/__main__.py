"""``python -m dpft``: the same as the ``dpft`` command."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
