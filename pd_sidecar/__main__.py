import sys

from pd_sidecar.cli import main

sys.exit(main())
