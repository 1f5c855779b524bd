"""The chat page at / in a real browser (Debian's headless Chromium, driven by chromedriver):
it asks for the key the API wants, streams an answer that is the API's own (greedy: the
target's), and shows beside it how the answer was made. A device node on the tiny pair, a real
verifier and Mosquitto. SPECEDGE_SCREENSHOT=docs/chat-page.png keeps the screenshot."""
from __future__ import annotations

import json
import os
import shutil
import urllib.request

import pytest
from conftest import device_node

FLEET = "chat-page"
KEY = "page-test-key"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def node(tiny_models, tiny_files, mosquitto, tmp_path_factory):
    key = tmp_path_factory.mktemp("key") / "key"
    key.write_text(KEY)
    with device_node(tiny_models, mosquitto.port, FLEET, {
            "device": {"id": "page"}, "generation": {"max_new_tokens": 24},
            "draft": {"model": str(tiny_files[0])},  # named as loaded: the page shows it
            "api": {"http_port": 0, "api_key_file": str(key)}}) as n:
        yield n


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Root in a container needs --no-sandbox; the rest keep Chromium off this closed network.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-quic", "--window-size=1000,720",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _until(browser, condition, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(lambda b: condition(b))


def test_the_page_streams_the_apis_own_answer_and_says_how_it_was_made(node, browser, tiny_files, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    port = node.http.port
    browser.get(f"http://127.0.0.1:{port}/")
    model = browser.find_element(By.ID, "model")
    _until(browser, lambda b: "key" in model.text)  # 401 from /v1/models: the API's own message
    key = browser.find_element(By.ID, "key")
    key.send_keys(KEY, Keys.TAB)  # a change event: the card is asked for again, with the key
    _until(browser, lambda b: f"draft: {tiny_files[0].stem} " in model.text)

    question = "def add(a, b):"
    browser.find_element(By.ID, "prompt").send_keys(question, Keys.ENTER)
    how = _until(browser, lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant .how"))[0]
    # The text as the page holds it (the tiny models' bytes include control characters, which
    # WebDriver's rendered .text would fold).
    shown = browser.execute_script("const a = document.querySelector('.assistant').cloneNode(true);"
                                   "a.querySelector('.how').remove(); return a.textContent;")

    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 128, "temperature": 0}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=120) as r:
        expected = json.load(r)["choices"][0]["message"]["content"]
    assert expected and shown == expected  # the browser's text is the target's answer
    for label in ("rounds", "accepted per round", "tokens/s", "bytes/token", "J/token", "exact"):
        assert label in how.text, label
    assert browser.find_element(By.CSS_SELECTOR, ".assistant .how .exact")  # greedy on the exact tiny target
    assert browser.find_elements(By.CSS_SELECTOR, ".error") == []
    _until(browser, lambda b: "target: tiny" in model.text)  # the card again: the version that answered

    shot = tmp_path / "chat-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("SPECEDGE_SCREENSHOT"):
        shutil.copy(shot, os.environ["SPECEDGE_SCREENSHOT"])
