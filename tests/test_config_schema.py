"""`hilq config schema|reference` (bench/config_schema.py): the JSON Schemas accept every
config and inventory the repository ships and refuse what the loaders refuse (an unknown
key, a wrong type), they follow the loaders' own definitions (a key the schema names is one
the loader takes; a key added to the inventory's KEYS appears without an edit), every key
is described, and docs/config-reference.md is what the command prints now."""

import json
import re
import textwrap
import tomllib
from pathlib import Path

import pytest
from hilq.bench import config, config_schema
from hilq.bench.cli import main
from jsonschema import Draft202012Validator
from test_config_types import BAD, GOOD
from test_inventory import GOOD as TESTED_INVENTORY

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [ROOT / "bench" / "nightly-local.toml", *sorted((ROOT / "configs").glob("*.toml"))]


def _validator(what: str) -> Draft202012Validator:
    schema = config_schema.SCHEMAS[what]()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _inventories() -> list[tuple[str, str]]:
    """(where, TOML) for every example inventory: the ```toml blocks of the Markdown pages
    and the inventory's own docstring that hold a [devices.NAME] table."""
    from hilq.devices import inventory

    found = [("devices/inventory.py", textwrap.dedent(inventory.__doc__.split("\n\n")[1])),
             ("tests/test_inventory.py", TESTED_INVENTORY)]
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```toml\n(.*?)```", page.read_text(), re.S):
            if "[devices." in block:
                found.append((page.name, block))
    return found


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    assert len(SHIPPED) >= 4
    errors = [e.message for e in _validator("nightly").iter_errors(tomllib.loads(path.read_text()))]
    assert not errors, (path, errors)


def test_every_example_inventory_is_valid():
    examples = _inventories()
    assert {where for where, _ in examples} >= {"devices/inventory.py", "README.md",
                                                "tests/test_inventory.py"}
    for where, text in examples:
        errors = [e.message for e in _validator("inventory").iter_errors(tomllib.loads(text))]
        assert not errors, (where, errors)


def _key(says: str) -> str:
    """The key a loader's one-line error names: `bench[0].accuracy: ...` -> accuracy."""
    quoted = re.search(r"unknown key '(\w+)'", says)
    return quoted[1] if quoted else says.split(":")[0].split(".")[-1]


@pytest.mark.parametrize("text, says", BAD, ids=[_key(s) for _, s in BAD])
def test_what_the_loader_refuses_the_schema_refuses_naming_the_key(text, says):
    validator = _validator("nightly")
    assert not list(validator.iter_errors(tomllib.loads(GOOD)))
    errors = list(validator.iter_errors(tomllib.loads(text)))
    assert errors, says
    assert any(_key(says) in f"{e.json_path} {e.message}" for e in errors), \
        [(e.json_path, e.message) for e in errors]


@pytest.mark.parametrize("text, key", [
    ('[devices.a]\nkind = "ssh"\nhots = "x"\nhost = "h"\n', "hots"),
    ('[devices.a]\nkind = "ssh"\nhost = "h"\nport = "22"\n', "port"),
    ('[devices.a]\nkind = "ssh"\nhost = "h"\nretries = true\n', "retries"),
    ('[devices.a]\nkind = "ssh"\nuser = "u"\n', "host"),
    ('[devices.a]\nkind = "serial"\n', "kind"),
    ('[devices.a]\nhost = "h"\n', "host"),          # no kind: local, which has no host
    ('[device.a]\n', "device"),
])
def test_a_bad_inventory_is_refused_naming_the_key(text, key):
    errors = list(_validator("inventory").iter_errors(tomllib.loads(text)))
    assert errors, text
    words = " ".join(f"{e.json_path} {e.message} " + " ".join(c.message for c in e.context or ())
                     for e in errors)
    assert key in words, words


def test_an_inventory_entry_without_kind_is_local():
    ok = tomllib.loads('[devices.a]\npower = "rapl"\n[devices.b]\nkind = "ssh"\nhost = "h"\n')
    assert not list(_validator("inventory").iter_errors(ok))


def test_a_key_added_to_the_inventory_appears_without_an_edit(monkeypatch):
    from hilq.devices import inventory

    monkeypatch.setitem(inventory.KEYS, "ssh", {**inventory.KEYS["ssh"], "baud": int})
    ssh = config_schema.inventory()["$defs"]["ssh"]
    assert ssh["properties"]["baud"] == {"type": "integer"}
    assert set(ssh["properties"]) == set(inventory.KEYS["ssh"])
    assert ssh["required"] == ["kind", *inventory.REQUIRED["ssh"]]


def _tables(schema: dict):
    yield "config", schema
    yield from schema["$defs"].items()


def test_every_key_the_schema_names_the_loader_takes_at_its_default():
    """Each key, written at the schema's default into a config, is not refused as unknown
    or mistyped by `config.parse`: the schema describes the loader, not a copy of it."""
    search = {"model": "digits-cnn", "budgets": {"latency_ms": "50%"}}
    for table, schema in _tables(config_schema.nightly()):
        for key, prop in schema["properties"].items():
            if prop.get("default") is None:
                continue
            d = tomllib.loads(GOOD)
            d["search"] = [dict(search)]
            entry = {"config": d, "protocol": d["protocol"], "bench": d["bench"][0],
                     "search": d["search"][0]}[table]
            entry[key] = prop["default"]
            try:
                config.parse(d)
            except config.ConfigError as e:
                assert "unknown key" not in str(e) and "expected" not in str(e), (table, key, e)


def test_every_nightly_key_is_described_once():
    """A description comes from the comment beside the field, or else `config.NOTES`:
    never missing, never in both places."""
    for table, keys in config.table_keys().items():
        for key, cls in keys.items():
            assert config_schema.describe(table, key, cls), f"{table}.{key}: no description"
            assert not (key in config_schema.comments(cls)
                        and key in config.NOTES.get(table, {})), f"{table}.{key}: twice"


@pytest.mark.parametrize("what", ["nightly", "inventory"])
def test_the_cli_prints_the_schema_as_json(what, capsys):
    assert main(["config", "schema", what]) == 0
    out, _ = capsys.readouterr()
    schema = json.loads(out)
    Draft202012Validator.check_schema(schema)
    assert schema == config_schema.SCHEMAS[what]()


def test_the_cli_writes_the_schema_to_a_file(tmp_path, capsys):
    assert main(["config", "schema", "--out", str(tmp_path / "s" / "nightly.json")]) == 0
    assert capsys.readouterr().out == ""
    assert json.loads((tmp_path / "s" / "nightly.json").read_text())["title"] == \
        "hilq nightly config"


@pytest.mark.parametrize("argv, needle", [
    (["config", "schema", "yaml"], "'yaml'"),
    (["config", "reference", "--out", "/proc/version/ref.md"], "/proc/version/ref.md"),
    (["config", "schema", "inventory", "--out", "{tmp}"], "{tmp}"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (rc, out)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert needle.replace("{tmp}", str(tmp_path)) in err, err


def test_the_checked_in_reference_is_what_the_command_prints(capsys):
    assert main(["config", "reference"]) == 0
    printed = capsys.readouterr().out
    page = ROOT / "docs" / "config-reference.md"
    assert page.read_text() == printed, (
        "docs/config-reference.md is stale: hilq config reference --out docs/config-reference.md")
    for key in ("regression_threshold", "min_duration_s", "variants", "budgets", "known_hosts"):
        assert f"| `{key}` |" in printed, key
