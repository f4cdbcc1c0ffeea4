"""`python -m extproc.cli` is `epp`."""

from extproc.cli.main import main

raise SystemExit(main())
