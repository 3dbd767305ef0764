"""`mt serve` as a user meets it: a real server on a loopback port, a real HTTP client, a headless browser."""

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT, one_line_error, request, start_server

pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra: pip install -e '.[serve]'")

from mt.serve import Batcher, Limits, create_app  # noqa: E402
from mt.translate import Translator  # noqa: E402

SENTENCES = ["Un homme fait du vélo.", "Deux chiens jouent dans la neige.", "Une femme lit un livre.",
             "Des enfants courent sur la plage.", "Un chat dort."]
LIMITS = Limits(max_chars=300, max_texts=40, max_body_bytes=30_000, max_beam=8, max_wait_ms=5)


@pytest.fixture(scope="module")
def translator(tiny_run) -> Translator:
    return Translator.load(tiny_run / "runs" / "tiny", device="cpu")


@pytest.fixture(scope="module")
def server(translator):
    """The base URL of an in-process server of the tiny run, on a free loopback port."""
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(translator, LIMITS, "tiny")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(timeout=30)


def mt_translate(run, *args) -> list[str]:
    """What `mt translate` prints for the sentences, one per line."""
    from typer.testing import CliRunner

    from mt.cli import app

    result = CliRunner().invoke(app, ["translate", "--run", str(run), "--device", "cpu", *args],
                                input="\n".join(SENTENCES) + "\n")
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


@pytest.mark.parametrize("beam", [1, 4])
def test_translations_are_mt_translates(server, tiny_run, beam):
    status, body = request(server + "/translate", {"text": SENTENCES, "beam_size": beam})
    assert status == 200
    assert body["translations"] == mt_translate(tiny_run / "runs" / "tiny", "--beam", str(beam))
    status, one = request(server + "/translate", {"text": SENTENCES[0], "beam_size": beam})
    assert status == 200 and one == {"translations": body["translations"][:1]}


def test_nbest_and_scores_are_mt_translates_json(server, tiny_run):
    status, body = request(server + "/translate", {"text": SENTENCES, "beam_size": 3, "nbest": 2, "scores": True})
    assert status == 200
    cli = [json.loads(line) for line in mt_translate(tiny_run / "runs" / "tiny", "--beam", "3", "--nbest", "2",
                                                      "--json")]
    assert body["nbest"] == [line["translations"] for line in cli]
    assert body["translations"] == [line["translations"][0]["text"] for line in cli]
    assert body["scores"] == [line["translations"][0]["score"] for line in cli]


def test_health_info_docs_and_the_page(server, translator):
    assert request(server + "/health") == (200, {"status": "ok"})
    status, info = request(server + "/info")
    assert status == 200 and info["run"] == "tiny" and info["vocabulary"] == translator.tokenizer.vocab_size
    assert info["parameters"] == translator.model.num_parameters()
    assert info["decode"]["beam_size"] == translator.config.decode.beam_size
    assert isinstance(info["best_valid_bleu"], float)
    status, schema = request(server + "/openapi.json")
    assert status == 200 and {"/translate", "/attention", "/health", "/info"} <= set(schema["paths"])
    status, docs = request(server + "/docs")
    assert status == 200 and b"swagger" in docs.lower()
    status, page = request(server + "/")
    assert status == 200 and b"<textarea" in page and b"/attention" in page


def test_the_attention_heatmap_is_a_png(server):
    status, png = request(server + "/attention", {"text": SENTENCES[0]})
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    status, body = request(server + "/attention", {"text": SENTENCES[0], "layer": 9})
    assert status == 422 and "layer 9" in body["error"]


BAD = [  # (what is sent, expected status, words the error names)
    (b'{"text": "Un chat', 400, "not valid JSON"),
    (b'{"text": "Un chat" "x"}', 400, "not valid JSON"),
    (b"\xff\xfe{}", 400, ""),
    (json.dumps({"text": 5}), 422, "text"),
    (json.dumps({"text": ["Un chat", 5]}), 422, "text"),
    (json.dumps({"texte": "Un chat"}), 422, "texte"),
    (json.dumps(["Un chat"]), 422, "body"),
    (json.dumps({"text": []}), 422, "empty list"),
    (json.dumps({"text": "Un chat", "beam_size": 0}), 422, "beam_size"),
    (json.dumps({"text": "Un chat", "beam_size": 1000}), 422, "beam_size"),
    (json.dumps({"text": "Un chat", "beam_size": True}), 422, "beam_size"),
    (json.dumps({"text": "Un chat", "beam_size": 2, "nbest": 3}), 422, "nbest 3"),
    (json.dumps({"text": "a" * 301}), 413, "--max-chars"),
    (json.dumps({"text": "a" * 100_000}), 413, "--max-body-bytes"),
    (json.dumps({"text": ["Un chat"] * 41}), 413, "--max-texts"),
    (json.dumps({"text": "Un\x00chat"}), 422, "U+0000"),
    (json.dumps({"text": "Un chat.\nUn chien."}), 422, "line break"),
    (json.dumps({"text": "Un \ud800 chat"}), 422, "surrogate"),
]


@pytest.mark.parametrize(("sent", "status", "words"), BAD, ids=range(len(BAD)))
def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(server, sent, status, words):
    sent = sent if isinstance(sent, bytes) else sent.encode("utf-8", "surrogatepass")
    got, body = request(server + "/translate", raw=sent)
    assert got == status, body
    assert isinstance(body, dict) and set(body) == {"error"} and words in body["error"]
    assert request(server + "/health") == (200, {"status": "ok"})


def test_emoji_and_odd_text_translate(server):
    texts = ["Un chat 🐈 dort.", "   ", "", "Ça\tva ?", "ﬁn “guillemets” — ½"]
    status, body = request(server + "/translate", {"text": texts})
    assert status == 200 and len(body["translations"]) == 5 and body["translations"][1:3] == ["", ""]


def test_a_chunked_body_over_the_limit_is_refused_as_it_streams(server):
    import http.client

    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks = (b'{"text": "' + b"a" * 10_000 for _ in range(1)), (b"a" * 10_000 for _ in range(3)), [b'"}']
    connection.request("POST", "/translate", body=(c for group in chunks for c in group),
                       headers={"content-type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and "--max-body-bytes" in json.loads(response.read())["error"]


def test_concurrent_requests_share_batches(server):
    before = request(server + "/info")[1]["batches_decoded"]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda s: request(server + "/translate", {"text": s, "beam_size": 2}),
                                SENTENCES * 6))
    assert all(status == 200 for status, _ in answers)
    alone = {s: request(server + "/translate", {"text": s, "beam_size": 2})[1] for s in SENTENCES}
    assert [body for _, body in answers] == [alone[s] for s in SENTENCES * 6]
    batches = request(server + "/info")[1]["batches_decoded"] - before - len(SENTENCES)
    assert batches < 30, f"30 requests took {batches} batches"


def test_a_long_request_holds_back_a_short_one_for_one_batch_at_most():
    started = threading.Event()
    batches = []

    def translate(texts, beam, nbest):
        batches.append(list(texts))
        started.set()
        time.sleep(0.02)
        return [[t.upper()] for t in texts]

    batcher = Batcher(translate, max_tokens=10, max_wait=0.001)
    try:
        long = batcher.submit([f"long {i}" for i in range(100)], [2] * 100, None, 1)
        started.wait(5)
        short = batcher.submit(["short"], [2], None, 1)
        assert short.result(5) == [["SHORT"]]
        assert not long.done()
        assert next(i for i, b in enumerate(batches) if "short" in b) <= 1  # after the one decoding when it came
        assert long.result(10) == [[f"LONG {i}"] for i in range(100)]
        other = batcher.submit(["greedy"], [1], 1, 1)  # other settings: a batch of its own
        assert other.result(5) == [["GREEDY"]] and batches[-1] == ["greedy"]
    finally:
        batcher.close()


def test_a_batch_waits_for_the_clients_just_answered_but_a_lone_client_does_not_wait():
    batches, decoding = [], threading.Event()

    def translate(texts, beam, nbest):
        batches.append(sorted(texts))
        decoding.set()
        time.sleep(0.6)  # longer than max_wait
        return [[t] for t in texts]

    batcher = Batcher(translate, max_tokens=1000, max_wait=0.4)
    try:
        def client(name: str, again: str) -> None:  # sends `again` 50 ms after `name` is translated
            batcher.submit([name], [1], None, 1).add_done_callback(
                lambda _: threading.Timer(0.05, batcher.submit, ([again], [1], None, 1)).start())

        client("a", "a2")
        client("b", "b2")
        decoding.wait(5)
        batcher.submit(["c"], [1], None, 1).result(5)  # came while a and b decoded, and waited longer than max_wait
        assert batches[:2] == [["a", "b"], ["a2", "b2", "c"]]  # c waited for a's and b's clients to come back

        batcher.submit(["d"], [1], None, 1).result(5)  # one client from now on: d waits max_wait for the others
        start = time.monotonic()
        assert batcher.submit(["e"], [1], None, 1).result(5) == [["e"]]
        assert time.monotonic() - start < 0.6 + 0.2  # e did not wait: 0.6 to decode, not 1.0
    finally:
        batcher.close()


def test_requests_of_other_settings_do_not_wait_for_what_another_batch_expects():
    def translate(texts, beam, nbest):
        time.sleep(0.05)
        return [[t] for t in texts]

    batcher = Batcher(translate, max_tokens=1000, max_wait=0.4)
    try:
        batcher.submit(["greedy"], [1], 1, 1).result(5)  # greedy batches now expect one request
        for future in [batcher.submit([f"beam {i}"], [1], 5, 1) for i in range(4)]:  # beam-5 ones, four
            future.result(5)
        start = time.monotonic()
        batcher.submit(["greedy again"], [1], 1, 1).result(5)
        assert time.monotonic() - start < 0.3  # not 0.4 more, waiting for four greedy requests
    finally:
        batcher.close()


def test_a_failed_batch_fails_its_requests_and_the_next_one_decodes():
    def translate(texts, beam, nbest):
        if "boom" in texts:
            raise ValueError("boom")
        return [[t] for t in texts]

    batcher = Batcher(translate, max_tokens=100, max_wait=0.001)
    try:
        with pytest.raises(ValueError):
            batcher.submit(["boom"], [1], None, 1).result(5)
        assert batcher.submit(["fine"], [1], None, 1).result(5) == [["fine"]]
    finally:
        batcher.close()


# The command


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_finish_the_requests_in_flight_and_exit_0(tiny_run, stop):
    process, url = start_server(["--run", str(tiny_run / "runs" / "tiny"), "--max-wait-ms", "800"])
    try:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(request, url + "/translate", {"text": SENTENCES * 4})
            time.sleep(0.4)  # the request waits in the batcher
            process.send_signal(stop)
            status, body = answer.result(60)
        assert status == 200 and len(body["translations"]) == 20
        assert process.wait(60) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        process.kill()


def test_a_missing_or_damaged_run_is_refused_at_start(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from mt.cli import app

    one_line_error(CliRunner().invoke(app, ["serve", "--run", str(tmp_path / "nowhere")]), "nowhere")
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_run / "runs" / "tiny", damaged)
    for checkpoint in damaged.glob("*.pt"):
        checkpoint.write_bytes(b"not a checkpoint")
    one_line_error(CliRunner().invoke(app, ["serve", "--run", str(damaged), "--port", "0"]), "damaged")


def test_a_port_in_use_is_one_line(tiny_run):
    import socket

    from typer.testing import CliRunner

    from mt.cli import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--run", str(tiny_run / "runs" / "tiny"), "--port", str(port)])
    one_line_error(result, f"cannot listen on 127.0.0.1:{port}")


# The page, in a real browser


def test_the_page_translates_what_is_typed_and_draws_the_heatmap(server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the dev extra)")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no chromium and chromedriver: apt-get install chromium chromium-driver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        browser.get(server + "/")
        box = browser.find_element(By.ID, "source")
        box.clear()
        box.send_keys(SENTENCES[1])
        browser.find_element(By.ID, "go").click()
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: (b.find_element(By.ID, "heatmap").get_attribute("src") or "").startswith("blob:"))
        wait.until(lambda b: b.execute_script("return document.getElementById('heatmap').naturalWidth") > 100)
        shown = browser.find_element(By.ID, "translation").text
        assert shown == request(server + "/translate", {"text": SENTENCES[1]})[1]["translations"][0]
        box.clear()
        box.send_keys("a" * 301)
        browser.find_element(By.ID, "go").click()
        wait.until(lambda b: "--max-chars" in b.find_element(By.ID, "error").text)
    finally:
        browser.quit()


def test_serve_without_the_extra_names_the_install_command(tiny_run):
    code = ("import sys; sys.modules['fastapi'] = None\n"
            "from mt.cli import main; sys.argv = ['mt', 'serve', '--run', sys.argv[1]]; main()")
    result = subprocess.run([sys.executable, "-c", code, str(tiny_run / "runs" / "tiny")], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: mt serve needs FastAPI and uvicorn: pip install -e '.[serve]'")


def test_the_server_runs_its_torch_work_on_one_thread():
    # A second thread that runs parallel torch operations slows every thread's (mt.serve's docstring).
    from mt.serve import on_model_thread

    threads = []

    def translate(texts, beam, nbest):
        threads.append(threading.current_thread())
        return [[t] for t in texts]

    loaded_on = on_model_thread(threading.current_thread)  # where `mt serve` loads the model
    batcher = Batcher(translate, max_tokens=100, max_wait=0.001)
    try:
        assert batcher.submit(["un"], [1], None, 1).result(5) == [["un"]]
        assert batcher.submit(["deux"], [1], 1, 1).result(5) == [["deux"]]
    finally:
        batcher.close()
    assert threads == [loaded_on, loaded_on] and loaded_on is not threading.main_thread()
    assert on_model_thread(len, "abc") == 3
    with pytest.raises(ValueError):  # an exception comes back to the caller
        on_model_thread(int, "x")
