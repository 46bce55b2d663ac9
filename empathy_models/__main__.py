"""``python -m empathy_models`` runs the CLI."""

import sys

from .cli import main

sys.exit(main())
