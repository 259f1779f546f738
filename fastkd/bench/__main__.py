"""``python -m fastkd.bench``: see :mod:`fastkd.bench.cli`."""
import sys

from fastkd.bench.cli import main

sys.exit(main())
