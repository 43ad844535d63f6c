"""hilq: hardware-in-the-loop benchmarking of quantized neural networks.

This package is two things. Its own modules are the core every layer shares and nothing
else — the measurement record (`measurement`), statistics on raw samples (`stats`) and
accuracy figures (`accuracy`): standard library and numpy only, since they also travel flat
in the agent bundle to the device. And it is the namespace the layers are installed under:
`hilq.quant`, `hilq.devices`, `hilq.bench` (import-linter contracts in pyproject.toml, run
by `tox -e lint`):

    hilq.bench  ->  hilq.quant | hilq.devices  ->  hilq.measurement | stats | accuracy

In a source checkout the layers keep their top-level folders (`bench/ quant/ devices/`
beside `hilq/`); the wheel maps them under `hilq/`. The path below makes a checkout import
them by the same names the wheel installs.
"""

import os as _os

_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "bench")) \
        and _os.path.isfile(_os.path.join(_ROOT, "bench", "__init__.py")):
    __path__.append(_ROOT)      # a source checkout: hilq.bench is ../bench
