"""`python -m lbagent ...` is the `lbagent` command."""

import sys

from lbagent.cli import main

sys.exit(main())
