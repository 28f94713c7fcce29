"""`python -m geoexplora`: the same entry point as the `geoexplora` console script."""

import sys

from geoexplora.cli import main

sys.exit(main())
