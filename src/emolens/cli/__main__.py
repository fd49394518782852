"""`python -m emolens.cli`."""

import sys

from emolens.cli import main

sys.exit(main())
