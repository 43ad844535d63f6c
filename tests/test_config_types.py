"""Nightly configs are typed at the boundary (bench/config.py, pydantic in strict mode): a
wrong type, an unknown key or bad nesting is refused before any work, in one line naming the
file, the key, what was expected and what was given; the shipped configs all pass."""

from pathlib import Path

import pytest
from hilq.bench import config

ROOT = Path(__file__).resolve().parents[1]
GOOD = '''name = "t"
[protocol]
min_duration_s = 0.1
[[bench]]
model = "digits-cnn"
variants = ["fp32"]
'''

# (text added or replaced, what the one line must name)
BAD = [
    ('rounds = "2"\n' + GOOD, 'config.rounds: expected a valid integer, got \'2\''),
    (GOOD.replace("[[bench]]", "[[bench]]\naccuracy = \"no\""),
     "bench[0].accuracy: expected a valid boolean, got 'no'"),
    (GOOD.replace("min_duration_s = 0.1", 'min_duration_s = "fast"'),
     "protocol.min_duration_s: expected a valid number, got 'fast'"),
    (GOOD.replace('variants = ["fp32"]', 'variants = "fp32"'),
     "bench[0].variants: expected a valid array, got 'fp32'"),
    ("regression_threshold = [0.05]\n" + GOOD,
     "config.regression_threshold: expected a valid number, got [0.05]"),
    (GOOD.replace("[protocol]", "[protocol]\nthreads = 1.5"),
     "protocol.threads: expected a valid integer, got 1.5"),
    ("colour = \"red\"\n" + GOOD, "config: unknown key 'colour'"),
    (GOOD + '[[search]]\nmodel = "digits-cnn"\nbudgets = { latency_ms = "50%" }\nsamples = "8"\n',
     "search[0].samples: expected a valid integer, got '8'"),
    (GOOD + '[[search]]\nmodel = "digits-cnn"\nbudgets = { latency_ms = "50%" }\n'
            'reuse_costs = "yes"\n', "search[0].reuse_costs: expected a valid boolean, got 'yes'"),
    (GOOD.replace("[protocol]", "[protocol.timing]"),
     "protocol: unknown key 'timing'"),
]


@pytest.mark.parametrize("text, says", BAD, ids=[s.split(":")[0] + str(i)
                                                  for i, (_, s) in enumerate(BAD)])
def test_a_malformed_config_is_one_line_naming_the_key(tmp_path, text, says):
    path = tmp_path / "night.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    line = str(e.value)
    assert "\n" not in line and line.startswith(str(path)) and says in line, line


def test_the_shipped_configs_pass(tmp_path):
    (tmp_path / "night.toml").write_text(GOOD)
    assert config.load(tmp_path / "night.toml").bench[0].variants == ("fp32",)
    shipped = sorted((ROOT / "configs").glob("*.toml"))
    assert len(shipped) >= 3
    for path in shipped:
        cfg = config.load(path)
        assert cfg.bench or cfg.search, path
