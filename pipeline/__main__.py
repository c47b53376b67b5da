"""``python -m pipeline <step> ...`` is the same as ``finetune <step> ...``."""

import sys

from pipeline.cli import main

sys.exit(main())
