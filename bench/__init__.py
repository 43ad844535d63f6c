"""hilq orchestration: config, runner, search, results store, regressions, reports, CLI."""

__version__ = "0.1.0"
