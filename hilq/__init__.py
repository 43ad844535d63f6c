"""hilq's core: what every layer shares and nothing else — the measurement record
(`measurement`), statistics on raw samples (`stats`) and accuracy figures (`accuracy`).

Standard library and numpy only, importing no other hilq package: these modules also travel
flat in the agent bundle to the device, and `quant`, `devices` and `bench` all import them.
The layers above (import-linter contracts in pyproject.toml, run by `tox -e lint`):

    bench  ->  quant | devices  ->  hilq (this core)
"""
