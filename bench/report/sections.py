"""The report's sections, in order: each title written once, beside the builder that fills
it from the run's data. A section for something the run did not do (no sweep, no power
meter, no search) is left off the page; `Report.sections` still lists it, False, and
`hilq report` names them in one line, so what is missing is said, not shown as an empty
heading. The summary is always there."""

from __future__ import annotations

from . import history, runs, searches, sweeps
from .data import RunData
from .model import Section

REGISTRY = [
    ("Summary", runs.summary),
    ("Latency distribution", runs.distribution),
    ("Accuracy on the device", runs.device_accuracy),
    ("Accuracy vs latency", runs.accuracy_vs_latency),
    ("Energy per inference", runs.energy),
    ("Memory", runs.memory),
    ("MLPerf scenarios (LoadGen)", runs.scenarios),
    ("Batch sweep", sweeps.batch_sweep),
    ("Sequence-length sweep", sweeps.seq_len_sweep),
    ("Bit allocation", searches.allocation),
    ("Predicted vs measured latency", searches.predicted),
    ("Per-layer error of the searched configuration", searches.debug),
    ("Nightly trends", history.trends),
    ("Regressions", history.regressions),
    ("Devices and versions", history.devices),
]
SECTIONS = tuple(title for title, _ in REGISTRY)


def build(data: RunData) -> list[Section]:
    """Every section, built; `shown` tells the renderers which ones the page carries."""
    return [Section(title, builder(data)) for title, builder in REGISTRY]


def shown(sections: list[Section]) -> list[Section]:
    """The summary and every section with something to show."""
    return [s for s in sections if s.has_data or s.title == REGISTRY[0][0]]
