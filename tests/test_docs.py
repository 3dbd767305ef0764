"""The README's config reference matches the code."""

import importlib.util

from conftest import ROOT


def test_readme_config_reference_is_current():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert module.table() in readme, "run python scripts/update_readme.py"
