"""Every shipped example config is valid and sends no credential in clear text: the only change
is that files it names exist."""

from pathlib import Path

import pytest
import yaml

from proxy.config import parse
from proxy.exposure import clear_text_warnings

EXAMPLES = sorted((Path(__file__).parents[2] / "config" / "examples").glob("*.yaml"))


def _point_files_into(node, folder: Path):
    """Replace every *_file / static / ca path with a file of that name in `folder`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str) and (key.endswith("_file") or key == "static"):
                target = folder / Path(value).name
                target.write_text("accounts: {}\n" if key == "static" else "placeholder\n")
                node[key] = str(target)
            else:
                _point_files_into(value, folder)
    elif isinstance(node, list):
        for item in node:
            _point_files_into(item, folder)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_example_config_is_valid(example, tmp_path):
    data = yaml.safe_load(example.read_text())
    _point_files_into(data, tmp_path)
    settings = parse(data, source=example.name, base_dir=tmp_path)
    assert settings.listeners
    assert clear_text_warnings(settings) == []


def test_there_are_examples():
    assert {e.name for e in EXAMPLES} >= {
        "printer-relay.yaml",
        "openldap.yaml",
        "active-directory.yaml",
    }
