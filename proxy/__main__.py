"""`python -m proxy` runs the same command line as the `shared-ollama-proxy` script."""

import sys

from .entry import main

sys.exit(main())
