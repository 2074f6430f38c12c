"""``python -m fewshot_sla`` runs the CLI."""

import sys

from fewshot_sla.cli import main

sys.exit(main())
