"""Writes the current config reference (scripts/config_reference.py) into README.md between its markers.

Usage: python scripts/update_readme.py
"""

from pathlib import Path

from config_reference import table

START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"

if __name__ == "__main__":
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text(encoding="utf-8")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    readme.write_text(head + START + table() + "\n" + END + tail, encoding="utf-8")
