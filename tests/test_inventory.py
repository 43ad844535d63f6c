"""devices/inventory.py: devices.toml parsing and validation."""

import pytest
from hilq.devices import inventory
from hilq.devices.errors import DeviceError
from hilq.devices.local import LocalDevice
from hilq.devices.ssh import SSHDevice

GOOD = """
[devices.edge1]
kind = "ssh"
host = "127.0.0.1"
port = 2222
user = "bench"
key_file = "~/.ssh/id_ed25519"
known_hosts = "~/.ssh/known_hosts"
python = "python3"
workdir = "/tmp/hilq"
runtimes = ["ort"]
power = "none"

[devices.box]
kind = "local"
power = "rapl"
"""


def _write(tmp_path, text):
    p = tmp_path / "devices.toml"
    p.write_text(text)
    return p


def test_local_exists_without_a_file():
    devs = inventory.load(None)
    assert list(devs) == ["local"]
    assert isinstance(inventory.open_device("local", devs), LocalDevice)


def test_issue_example_parses_and_opens(tmp_path):
    devs = inventory.load(_write(tmp_path, GOOD))
    assert set(devs) == {"local", "edge1", "box"}
    dev = inventory.open_device("edge1", devs)
    assert isinstance(dev, SSHDevice) and dev.port == 2222 and dev.user == "bench"
    assert not dev.key_file.startswith("~")
    assert inventory.open_device("box", devs).power == "rapl"


@pytest.mark.parametrize("text, words", [
    ('[devices.a]\nkind = "ssh"\nhots = "x"\nhost="h"\nuser="u"\nkey_file="k"\n', "'hots'"),
    ('[devices.a]\nkind = "ssh"\nhost = "h"\nuser = "u"\n', "key_file"),
    ('[devices.a]\nkind = "serial"\n', "kind"),
    ('[devices.a]\nkind = "ssh"\nhost="h"\nuser="u"\nkey_file="k"\nport="22"\n', "port"),
    ('[devices.a]\npower = "watts"\n', "power"),
    ('[device.a]\n', "'device'"),
    ('[devices.a\n', "TOML"),
])
def test_bad_inventory_is_one_line_naming_the_key(tmp_path, text, words, monkeypatch):
    # no agent and no ~/.ssh/id_*: a missing key_file is then an error (with them it is not)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with pytest.raises(DeviceError) as e:
        inventory.load(_write(tmp_path, text))
    assert words in str(e.value) and "\n" not in str(e.value) and e.value.kind == "bad_input"


def test_unknown_device_name(tmp_path):
    with pytest.raises(DeviceError, match="unknown device 'nope'"):
        inventory.open_device("nope", inventory.load(None))
