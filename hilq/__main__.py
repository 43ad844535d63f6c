"""`python -m hilq`: the `hilq` command."""

from hilq.bench.cli import main

raise SystemExit(main())
