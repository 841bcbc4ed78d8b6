"""`python -m mmcl.cli ...` (what torchrun / accelerate launch run)."""

import sys

from mmcl.cli import main

sys.exit(main())
