"""The playground at `GET /`: its files and headers in process, then the page in a real browser.

The browser tests drive headless Chromium (Debian's `chromium` and `chromium-driver`) with Selenium
against the real server on tiny models (an injected fault: an app built in process, over HTTP): the page loads nothing from elsewhere, streams a seeded
generation, stops one (the server counts it cancelled), shows the server's own error messages, asks
for the API key when the server has one, and its "copy as curl" command gives the same answer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from app.api.openai_schemas import CompletionRequest
from app.api.playground import FILES
from tests import sse
from tests.conftest import wait_until

KEY = "playground-key-0123456789"
PROMPT = "Once upon a time"
PAGE_FILES = ("playground.js", "playground.css", "icon.svg", "config.json")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000")


# ---- in process: files, headers, keys, the form's settings ------------------------------------------


def test_page_and_its_files_need_no_key_while_the_api_does(make_api):
    client = make_api(API_KEY=KEY)
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert 'src="playground/playground.js"' in page.get_data(as_text=True)
    for name in PAGE_FILES:
        assert client.get(f"/playground/{name}").status_code == 200, name
    assert client.get("/playground/config.json").get_json()["api_key_required"] is True
    # The API behind the page still wants the key, and the original API's POST / is unchanged.
    body = {"prompt": PROMPT, "max_tokens": 2}
    assert client.post("/v1/completions", json=body).status_code == 401
    legacy = {"text": {"plain": PROMPT}, "max_new_tokens": 4}
    assert client.post("/", json=legacy).status_code == 401
    answer = client.post("/", json=legacy, headers={"X-API-Key": KEY})
    assert answer.status_code == 200 and answer.get_json()["sentences"][0]["generated_text"].startswith(PROMPT)
    # Only the page's files are served, nothing else from its folder or beside it.
    assert client.get("/playground/index.html").status_code == 404
    assert client.get("/playground/../auth.py").status_code == 404
    # Flask's own /static/ route would serve the same files without the page's headers: there is none.
    assert client.get("/static/playground/playground.js", headers={"X-API-Key": KEY}).status_code == 404


@pytest.mark.parametrize("cors", [None, "https://ui.example"])
def test_page_and_files_carry_strict_security_headers(make_api, cors):
    client = make_api(**({"CORS_ORIGINS": cors} if cors else {}))
    for path in ["/"] + [f"/playground/{name}" for name in PAGE_FILES]:
        response = client.get(path)
        assert response.status_code == 200, path
        policy = dict(part.strip().split(" ", 1) for part in response.headers["Content-Security-Policy"].split(";"))
        assert policy["default-src"] == "'none'", path
        for directive in ("script-src", "style-src", "img-src", "connect-src"):
            assert policy[directive] == "'self'", (path, directive)  # this server only, nothing inline
        assert policy["frame-ancestors"] == "'none'" and policy["base-uri"] == "'none'", path
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
        assert response.headers["Referrer-Policy"] == "no-referrer", path
        assert response.headers["X-Frame-Options"] == "DENY", path
    # With CORS_ORIGINS the API still answers that origin's browsers, as before.
    api = client.get("/health", headers={"Origin": "https://ui.example"})
    assert api.headers.get("Access-Control-Allow-Origin") == cors


def test_the_form_takes_its_defaults_and_limits_from_the_server(make_api):
    fields = make_api(MAX_NEW_TOKENS=77, MAX_NUM_RETURN_SEQUENCES=3, MAX_STOP_SEQUENCES=2).get(
        "/playground/config.json").get_json()["fields"]
    assert fields["max_tokens"]["max"] == 77
    assert fields["n"]["max"] == 3
    assert fields["stop"]["max_items"] == 2
    for name, field in fields.items():
        assert field["default"] == CompletionRequest.model_fields[name].default, name
    assert (fields["temperature"]["min"], fields["temperature"]["max"]) == (0, 2)
    assert (fields["repetition_penalty"]["min"], fields["repetition_penalty"]["max"]) == (0.01, 100)


def test_the_page_has_no_inline_code_and_links_nothing_elsewhere():
    """What the Content-Security-Policy would block anyway, checked at the source."""
    html = (FILES / "index.html").read_text()
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=|<script(?![^>]*\ssrc=)", html, re.IGNORECASE)
    for name in ("index.html", "playground.js", "playground.css"):
        text = (FILES / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), name


# ---- in a real browser ---------------------------------------------------------------------------------


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        message = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI installs them, so their absence is a broken CI machine")
        pytest.skip(message)
    return browser, driver


@pytest.fixture
def browser(tmp_path):
    """A fresh headless Chromium (its own profile) that keeps its console log."""
    binary, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument("--user-data-dir=" + tempfile.mkdtemp(dir=tmp_path))
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def keyed_settings(tiny_models) -> dict:
    """A server that wants an API key, serving tiny GPT-Neo (a 2048-token context) with room for long runs."""
    return {"API_KEY": KEY, "MODEL_ID": tiny_models.repo_ids["gpt-neo"], "MAX_NEW_TOKENS": 2000}


@pytest.fixture(scope="module", autouse=True)
def _boot_servers_early(boot_early, tiny_models):
    boot_early("keyed_server", **keyed_settings(tiny_models))


@pytest.fixture(scope="module")
def keyed_server(start_server, tiny_models):
    server = start_server(shared=True, **keyed_settings(tiny_models))
    yield server
    server.stop()


def open_page(driver, server):
    driver.get(server.url + "/")
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "model-name"))


def fill(driver, **fields):
    for name, value in fields.items():
        element = driver.find_element(By.ID, name.replace("_", "-") if name == "api_key" else name)
        element.clear()
        element.send_keys(str(value))


def text_of(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def finished(driver) -> str:
    """Wait until the run ends; the finish reason the page shows."""
    WebDriverWait(driver, 120).until(lambda d: not d.find_element(By.ID, "generate").get_attribute("disabled")
                                     and text_of(d, "stat-finish") not in ("–", "running…"))
    return text_of(driver, "stat-finish")


def generated(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#output .generated')].map(e => e.textContent)")


def shown_error(driver) -> str:
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "error").is_displayed())
    return text_of(driver, "error")


def console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def run_curl(command: str) -> tuple[list[str], list[str], dict]:
    """Run the page's "copy as curl" command in a shell: each completion's text and finish reason, and
    the usage, as the server streams them."""
    out = subprocess.run(["bash", "-c", command], capture_output=True, check=True, timeout=120).stdout
    chunks = sse.json_events([out])
    choices = [choice for chunk in chunks for choice in chunk["choices"]]
    n = 1 + max(choice["index"] for choice in choices)
    texts = ["".join(c["text"] for c in choices if c["index"] == i) for i in range(n)]
    finishes = [next(c["finish_reason"] for c in choices if c["index"] == i and c["finish_reason"]) for i in range(n)]
    return texts, finishes, chunks[-1]["usage"]


def cancelled(server) -> float:
    metrics = requests.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    return float(re.search(r"^gpt_server_requests_cancelled_total (\S+)$", metrics, re.MULTILINE).group(1))


def test_the_page_loads_everything_from_the_server_alone(browser, gpt2_server):
    open_page(browser, gpt2_server)
    health = requests.get(gpt2_server.url + "/health", timeout=30).json()
    assert text_of(browser, "model-name") == health["model"]
    assert text_of(browser, "model-device") == health["device"]
    assert text_of(browser, "model-dtype") == health["dtype"]
    assert not browser.find_element(By.ID, "api-key").is_displayed()  # this server has no key
    # Every field starts at the server's default and carries its limits.
    fields = requests.get(gpt2_server.url + "/playground/config.json", timeout=30).json()["fields"]
    for name in ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "n"):
        field = browser.find_element(By.ID, name)
        assert float(field.get_attribute("value")) == fields[name]["default"], name
        if "max" in fields[name]:
            assert float(field.get_attribute("max")) == fields[name]["max"], name
    assert browser.find_element(By.ID, "seed").get_attribute("value") == ""  # no default: a random seed
    urls = browser.execute_script(
        "return performance.getEntries().filter(e => e.name.includes('://')).map(e => e.name)")
    assert {"/", "/playground/playground.js", "/playground/playground.css", "/playground/config.json",
            "/health"} <= {url.removeprefix(gpt2_server.url) for url in urls}
    assert all(url.startswith(gpt2_server.url + "/") for url in urls), urls
    assert console_errors(browser) == []  # no request refused by the policy, no script error


def test_generate_streams_the_text_and_shows_the_figures(browser, gpt2_server, tmp_path):
    open_page(browser, gpt2_server)
    fill(browser, max_tokens=300, seed=1234)
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    # Every change of the first completion's text, as the page makes it.
    browser.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
          const text = document.querySelector('#output .generated');
          if (text) window.seen.push(text.textContent.length);
        }).observe(document.getElementById('output'), {childList: true, subtree: true, characterData: true});
    """)
    browser.find_element(By.ID, "generate").click()
    finish = finished(browser)
    seen = browser.execute_script("return window.seen")
    steps = sorted(set(length for length in seen if length > 0))
    assert len(steps) >= 3, f"the text arrived in {len(steps)} step(s): {seen}"
    assert seen == sorted(seen)  # it only grows

    # The same request, sent again with the command the page offers, gives the same text and figures.
    command = browser.find_element(By.ID, "curl").get_attribute("textContent")
    assert command.startswith(f"curl -N '{gpt2_server.url}/v1/completions'")
    texts, finishes, usage = run_curl(command)
    assert generated(browser) == texts and texts[0]
    assert [finish] == finishes
    assert text_of(browser, "stat-prompt") == str(usage["prompt_tokens"])
    assert text_of(browser, "stat-completion") == str(usage["completion_tokens"])
    assert text_of(browser, "stat-total") == str(usage["total_tokens"])
    assert re.fullmatch(r"\d+ ms|\d+\.\d\d s", text_of(browser, "stat-ttft"))
    assert float(text_of(browser, "stat-speed")) > 0
    assert console_errors(browser) == []

    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "playground.png"
    assert browser.save_screenshot(str(shot))
    print(f"\nscreenshot of the playground after a generation: {shot}")
    if os.environ.get("PLAYGROUND_SCREENSHOT"):  # how docs/images/playground.png is made
        shutil.copyfile(shot, os.environ["PLAYGROUND_SCREENSHOT"])


def test_copy_as_curl_puts_the_command_on_the_clipboard(browser, gpt2_server):
    open_page(browser, gpt2_server)
    browser.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": gpt2_server.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    fill(browser, max_tokens=4, seed=7, n=2)
    browser.find_element(By.ID, "prompt").send_keys("it's a \"quoted\" prompt")
    browser.find_element(By.ID, "generate").click()
    finished(browser)
    browser.find_element(By.ID, "copy-curl").click()
    WebDriverWait(browser, 10).until(lambda d: text_of(d, "copy-note") == "copied")
    copied = browser.execute_async_script("navigator.clipboard.readText().then(arguments[0])")
    assert copied == browser.find_element(By.ID, "curl").get_attribute("textContent")
    texts, finishes, _ = run_curl(copied)  # quotes in the prompt survive the shell
    assert generated(browser) == texts and len(texts) == 2  # one panel per completion
    shown = browser.execute_script("return [...document.querySelectorAll('#output .finish')].map(e => e.textContent)")
    assert shown == finishes


def test_a_bad_value_shows_the_servers_own_error(browser, gpt2_server):
    open_page(browser, gpt2_server)
    fill(browser, temperature=5)
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    browser.find_element(By.ID, "generate").click()
    body = json.loads(re.search(r"-d '(.*)'$", browser.find_element(By.ID, "curl").get_attribute("textContent"),
                                re.DOTALL).group(1))
    answer = requests.post(gpt2_server.url + "/v1/completions", json={**body, "stream": False}, timeout=30)
    assert answer.status_code == 400
    assert shown_error(browser) == f"400 BAD REQUEST: {answer.json()['error']['message']}"
    assert "temperature" in shown_error(browser)
    assert generated(browser) == []


def test_a_failure_during_the_stream_shows_the_servers_message(browser, inprocess_server):
    # A decoding step fails once a sequence reaches 60 tokens (tests/faults: an injected out-of-memory),
    # in an app built in process with an engine of its own.
    server = inprocess_server(fresh=True)
    server.inject_faults(at_length=60)
    open_page(browser, server)
    fill(browser, max_tokens=200, temperature=0)
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    browser.find_element(By.ID, "generate").click()
    error = shown_error(browser)
    streamed = sse.json_events([subprocess.run(
        ["bash", "-c", browser.find_element(By.ID, "curl").get_attribute("textContent")],
        capture_output=True, check=True, timeout=120).stdout])
    failure = next(event["error"] for event in streamed if "error" in event)
    assert error == failure["message"]
    assert generated(browser)[0]  # the text before the failure stays
    server.stop()


def test_stop_cancels_the_generation_on_the_server(browser, keyed_server):
    open_page(browser, keyed_server)
    longest = int(browser.find_element(By.ID, "max_tokens").get_attribute("max"))
    fill(browser, api_key=KEY, max_tokens=longest, temperature=0, seed=5)
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    # This request, left alone, runs to its length (end-of-text does not cut it short).
    body = {"prompt": PROMPT, "max_tokens": longest, "temperature": 0, "seed": 5}
    alone = requests.post(keyed_server.url + "/v1/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}).json()
    assert alone["choices"][0]["finish_reason"] == "length", alone
    before = cancelled(keyed_server)

    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 60, poll_frequency=0.02).until(lambda d: any(generated(d)))
    browser.find_element(By.ID, "stop").click()
    assert finished(browser) == "stopped (cancelled on the server)"
    assert wait_until(lambda: cancelled(keyed_server) == before + 1, 30), "the server did not count it cancelled"
    assert wait_until(lambda: requests.get(keyed_server.url + "/health", timeout=10).json()["batch_size"] == 0, 30)
    assert len(generated(browser)[0]) < len(alone["choices"][0]["text"])
    assert int(text_of(browser, "stat-completion").lstrip("≈")) < longest


def test_with_an_api_key_a_wrong_key_shows_401_and_the_right_one_works(browser, keyed_server):
    open_page(browser, keyed_server)
    key = browser.find_element(By.ID, "api-key")
    assert key.is_displayed() and key.get_attribute("type") == "password"
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    fill(browser, max_tokens=8, seed=3)
    for typed, sent in (("", {}), ("wrong-key", {"Authorization": "Bearer wrong-key"})):
        fill(browser, api_key=typed)
        browser.find_element(By.ID, "generate").click()
        refusal = requests.post(keyed_server.url + "/v1/completions", json={"prompt": PROMPT}, headers=sent, timeout=30)
        assert refusal.status_code == 401
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").text.startswith("401"))
        assert shown_error(browser) == f"401 UNAUTHORIZED: {refusal.json()['error']['message']}"

    fill(browser, api_key=KEY)
    browser.find_element(By.ID, "generate").click()
    assert finished(browser) in ("length", "stop")
    assert not browser.find_element(By.ID, "error").is_displayed()
    command = browser.find_element(By.ID, "curl").get_attribute("textContent")
    assert f"-H 'Authorization: Bearer {KEY}'" in command
    assert run_curl(command)[0] == generated(browser)

    # The key is kept for this tab's session only (sessionStorage), never in localStorage.
    open_page(browser, keyed_server)
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == KEY
    assert browser.execute_script("return localStorage.length") == 0
    assert console_errors(browser) == [] or all("401" in error for error in console_errors(browser))

