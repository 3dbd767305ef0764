"""docs/config.md, the config reference, matches the code."""

import importlib.util

from conftest import ROOT


def test_config_reference_page_is_current():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = ROOT / "docs" / "config.md"
    current = page.read_text(encoding="utf-8") if page.exists() else ""
    assert current == module.render(), "docs/config.md is not current: run python scripts/config_reference.py"
