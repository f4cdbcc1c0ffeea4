"""`python -m vllm_sim`: same as the vllm-sim console script."""

import sys

from vllm_sim.cli import main

sys.exit(main())
