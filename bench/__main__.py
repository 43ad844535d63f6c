from hilq.bench.cli import main

raise SystemExit(main())
