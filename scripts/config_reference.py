"""Prints the config reference (every key, its default, what it does) as the Markdown table in README.md.

Usage: python scripts/config_reference.py
"""

from mt.config import reference


def table() -> str:
    rows = ["| key | default | what it does |", "| --- | --- | --- |"]
    rows += [f"| `{key}` | `{default}` | {text} |" for key, default, text in reference()]
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
