"""Shared fixtures: the real data (MT_DATA_PATH), one tiny trained run, and small corpora written by the tests.

Tiers: a test that trains a model, starts `mt` in another process or times something is marked `slow`,
explicitly or by asking for a fixture that trains (`tiny_run`, `in_tmp`); `pytest -m "not slow"` runs the
rest in under a minute.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The tests' corpora are new files every run: their Arrow copies go to a datasets cache of the test session's
# own (set before `datasets` is imported, which reads it once), not into the user's.
HF_CACHE = tempfile.mkdtemp(prefix="mt-tests-hf-")
os.environ["HF_DATASETS_CACHE"] = HF_CACHE


def pytest_unconfigure(config):
    shutil.rmtree(HF_CACHE, ignore_errors=True)


TRAINING_FIXTURES = {"tiny_run", "trained", "in_tmp"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def data_path() -> Path:
    """The folder holding multi30k/ (from MT_DATA_PATH, or ../shared/data beside the repo).

    Outside CI a machine without the data skips the tests that need it; in CI they fail instead.
    """
    candidates = [Path(p) for p in os.environ.get("MT_DATA_PATH", "").split(os.pathsep) if p]
    candidates.append(ROOT.parent / "shared" / "data")
    for folder in candidates:
        if (folder / "multi30k" / "train.fr").is_file():
            return folder.resolve()
    message = "Multi30k not found: set MT_DATA_PATH to the folder that holds multi30k/"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_path) -> Path:
    """A folder holding runs/tiny/, a model trained by `mt train --config configs/tiny.yaml` in another process,
    once per test session: for every test that only needs a trained model. Tests must not change it."""
    folder = tmp_path_factory.mktemp("tiny")
    result = subprocess.run(
        [sys.executable, "-m", "mt", "train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--quiet"],
        cwd=folder, env={**os.environ, "MT_DATA_PATH": str(data_path)}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, data_path) -> Path:
    """Runs the test in an empty folder, with MT_DATA_PATH pointing at the real data."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MT_DATA_PATH", str(data_path))
    return tmp_path


def write_pair(folder: Path, name: str, src: list[str], tgt: list[str]) -> tuple[Path, Path]:
    """Writes an aligned pair `name.fr` / `name.en` and returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / f"{name}.fr", folder / f"{name}.en"
    for path, lines in zip(paths, (src, tgt), strict=True):
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return paths


def one_line_error(result, pattern):
    """Exit code 2, no traceback, and the error on one line (after any progress messages)."""
    import re

    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    assert "Traceback" not in result.output
    assert re.search(pattern, errors[0]), errors[0]


def request(url: str, body=None, raw: bytes | None = None, timeout: float = 60) -> tuple[int, dict | bytes]:
    """(status, JSON body or bytes) of a GET, or of a POST of `body` as JSON or of `raw` bytes."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, content, kind = response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as e:
        status, content, kind = e.code, e.read(), e.headers.get_content_type()
    return status, json.loads(content) if kind == "application/json" else content


def start_server(args, **env) -> tuple[subprocess.Popen, str]:
    """`mt serve` in a process of its own on a free port, and its URL once it listens."""
    process = subprocess.Popen([sys.executable, "-m", "mt", "serve", "--port", "0", "--device", "cpu", *args],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    line = process.stderr.readline()
    assert "serving" in line, line + process.stderr.read()
    url = line.split(" on ")[1].split()[0]
    assert request(url + "/health") == (200, {"status": "ok"})
    return process, url
