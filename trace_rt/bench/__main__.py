"""``python -m trace_rt.bench``."""

import sys

from trace_rt.bench.cli import main

sys.exit(main())
