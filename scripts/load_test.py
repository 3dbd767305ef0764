"""Load test of `mt serve`: starts it on a trained run, on the loopback interface only, and measures it.

Rows: one client sending one sentence at a time (the baseline); N concurrent clients x M one-sentence
requests (sentences/s, p50 and p99 latency, errors); `mt translate` on the same sentences as one file;
/health's latency while one request of all the sentences decodes; the bad-input set (each must get a 4xx
JSON error). Every translation is compared with `mt translate`'s for the same beam. Bounded: each request
times out, and the whole test stops after --timeout seconds. `--screenshot PNG` also opens the page in
headless Chromium (selenium), types a sentence and saves what it shows.

Usage: MT_DATA_PATH=../shared/data python scripts/load_test.py --run runs/multi30k [--clients 32]
           [--requests 50] [--beam 5] [--precision fp32] [--test multi30k:test_2016_flickr] [--screenshot page.png]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mt.corpora import resolve
from mt.data import read_lines

BAD_INPUTS = [b'{"text": "Un chat', b"\xff\xfe{}", b'{"text": 5}', b'{"text": []}', b'{"text": "a\\u0000b"}',
              json.dumps({"text": "a" * 100_000}).encode(), json.dumps({"text": ["Un chat."] * 5000}).encode(),
              json.dumps({"text": "Un chat 🐈 et un chien"}).encode()]  # the last one translates: 200


def post(url: str, body: bytes, timeout: float) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def translate(url: str, texts, beam: int, timeout: float = 120) -> tuple[int, dict, float]:
    start = time.perf_counter()
    status, body = post(url + "/translate", json.dumps({"text": texts, "beam_size": beam}).encode(), timeout)
    return status, body, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--precision", help="for mt translate and mt serve alike (default: the run's)")
    parser.add_argument("--test", default="multi30k:test_2016_flickr")
    parser.add_argument("--baseline", type=int, default=200, help="sentences sent one at a time by one client")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the whole test")
    parser.add_argument("--screenshot", type=Path)
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout
    signal.signal(signal.SIGALRM, lambda *_: sys.exit(f"load_test: over --timeout {args.timeout:.0f} s"))
    signal.alarm(int(args.timeout))

    sentences = read_lines(resolve(args.test).src)
    precision = ["--precision", args.precision] if args.precision else []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source.fr"
        source.write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
        start = time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "mt", "translate", "--run", str(args.run), "--input",
                              str(source), "--beam", str(args.beam), *precision], capture_output=True, text=True,
                             check=True)
        file_seconds = time.perf_counter() - start
    expected = dict(zip(sentences, cli.stdout.splitlines(), strict=True))

    server = subprocess.Popen([sys.executable, "-m", "mt", "serve", "--run", str(args.run), "--host", "127.0.0.1",
                               "--port", "0", *precision], stderr=subprocess.PIPE, text=True)
    try:
        line = server.stderr.readline()
        if "serving" not in line:
            sys.exit(f"load_test: mt serve did not start: {line}{server.stderr.read()}")
        url = line.split(" on ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:"), url
        threading.Thread(target=server.stderr.read, daemon=True).start()  # its log, drained
        rows, mismatches, errors = [], 0, 0

        def check(status: int, body: dict, texts: list[str]) -> None:
            nonlocal mismatches, errors
            if status != 200:
                errors += 1
                return
            mismatches += sum(got != expected[t] for got, t in zip(body["translations"], texts, strict=True))

        # One client, one sentence at a time.
        start = time.perf_counter()
        for text in sentences[: args.baseline]:
            check(*translate(url, [text], args.beam)[:2], [text])
        single = args.baseline / (time.perf_counter() - start)
        rows.append(("1 client, one sentence at a time", f"{single:.1f} sent/s", ""))

        # N clients x M requests of one sentence each.
        def client(i: int) -> list[float]:
            latencies = []
            for j in range(args.requests):
                if time.monotonic() > deadline:
                    break
                text = sentences[(i * args.requests + j) % len(sentences)]
                status, body, seconds = translate(url, [text], args.beam)
                check(status, body, [text])
                latencies.append(seconds)
            return latencies

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            latencies = [s for one in pool.map(client, range(args.clients)) for s in one]
        loaded = len(latencies) / (time.perf_counter() - start)
        file_rate = len(sentences) / file_seconds
        rows += [
            (f"{args.clients} clients x {args.requests} requests", f"{loaded:.1f} sent/s",
             f"{loaded / single:.2f}x one client; {loaded / file_rate:.2f}x mt translate"),
            (f"latency under {args.clients} clients", f"p50 {percentile(latencies, 0.5) * 1000:.0f} ms",
             f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms"),
            (f"mt translate --input ({len(sentences)} sentences, start-up included)", f"{file_rate:.1f} sent/s", ""),
        ]

        # /health while one request of every sentence decodes.
        with ThreadPoolExecutor(1) as pool:
            everything = pool.submit(translate, url, sentences, args.beam, 600)
            health = []
            while not everything.done():
                start = time.perf_counter()
                with urllib.request.urlopen(url + "/health", timeout=10) as response:
                    assert response.status == 200
                health.append(time.perf_counter() - start)
                time.sleep(0.05)
            status, body, seconds = everything.result()
            check(status, body, sentences)
        rows.append((f"/health during a {len(sentences)}-sentence request ({seconds:.1f} s)",
                     f"max {max(health) * 1000:.0f} ms", f"{len(health)} polls"))

        # Bad input: a 4xx JSON error each (the last one translates), and the server still serving.
        statuses = [post(url + "/translate", body, 60)[0] for body in BAD_INPUTS]
        bad = sum(not 400 <= s < 500 for s in statuses[:-1]) + (statuses[-1] != 200)
        errors += bad
        rows.append(("bad-input set", " ".join(map(str, statuses)), f"{bad} unexpected"))
        rows.append(("errors; translations unlike mt translate's", str(errors), str(mismatches)))

        if args.screenshot:
            screenshot(url, sentences[0], args.screenshot)
            rows.append(("page screenshot", str(args.screenshot), ""))

        server.send_signal(signal.SIGTERM)
        rows.append(("exit code after SIGTERM", str(server.wait(60)), ""))
    finally:
        server.kill()

    settings = f"beam {args.beam}, precision {args.precision or 'of the run'}, {os.cpu_count()} CPUs"
    print(f"| measure ({args.run}, {settings}) | value | |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 1 if errors or mismatches else 0


def screenshot(url: str, text: str, path: Path) -> None:
    """Types `text` into the page in headless Chromium, waits for the translation and the heatmap, saves a PNG."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1000"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    browser = webdriver.Chrome(options=options, service=service)
    try:
        browser.get(url + "/")
        box = browser.find_element(By.ID, "source")
        box.clear()
        box.send_keys(text)
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 60).until(
            lambda b: b.execute_script("return document.getElementById('heatmap').naturalWidth") > 0)
        browser.save_screenshot(str(path))
    finally:
        browser.quit()


if __name__ == "__main__":
    sys.exit(main())
