"""`python -m flows.cli` is `lvd`."""

from flows.cli import main

raise SystemExit(main())
