"""`python -m bridge` runs the roombus command line."""

from bridge.cli import main

raise SystemExit(main())
