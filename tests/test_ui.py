"""The page at /ui (PROTOCOL.md §15) in a real headless browser: Debian's chromium through
chromedriver and the selenium package (`make test` installs them), against a real queen with a
key, its hive and a worker on the real model. Screenshots land in the test's tmp dir."""
import json
import shutil
import sys
import time

import openai
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import REPO, start_queen, wait_until

sys.path.insert(0, str(REPO))
import rbee  # noqa: E402  (its QueenClient, to check /v2/status)

KEY = "ui-test-key-0123456789abcdef"


@pytest.fixture
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "chromium and chromium-driver are missing: make sysdeps installs them"
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,800"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def until(driver, predicate, timeout=30, what="the page"):
    """Wait for `predicate(driver)`; the page redraws its panels every 2 s, so an element found a
    moment ago may be gone: such a read is tried again."""
    return WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
                         ).until(lambda d: predicate(d), message=what)


def text(driver, selector):
    """The text of the first element `selector` matches, read at once in the page ("" if none)."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : ''",
                                 selector)


def click(driver, element):
    """A real click on `element`, brought to the middle of the screen (clear of the sticky header)."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()
    return True


def worker_ids(driver):
    return driver.execute_script("return [...document.querySelectorAll('#workers tbody tr[data-worker-id]')]"
                                 ".map((row) => row.dataset.workerId)")


def test_the_page_shows_the_cluster_streams_a_chat_and_unloads_a_worker(roles, env, model_path, browser, tmp_path):
    queen = start_queen(roles, dict(env, RBEE_API_KEY=KEY))
    model = "file:" + model_path
    openai.OpenAI(base_url=queen.url + "/v1", api_key=KEY, max_retries=0).completions.create(
        model=model, prompt="hi", max_tokens=2)   # a worker is up
    status = rbee.QueenClient(queen.url, KEY).status()
    [worker] = status["workers"]

    browser.get(queen.url + "/ui")
    # without the key nothing shows but the key's form
    key_input = until(browser, lambda d: d.find_element(By.ID, "key-input").is_displayed() and
                      d.find_element(By.ID, "key-input"), what="the key form")
    assert not browser.find_element(By.ID, "app").is_displayed()
    key_input.send_keys(KEY)
    browser.find_element(By.ID, "key-connect").click()
    # the worker and its node
    until(browser, lambda d: worker_ids(d) == [worker["worker_id"]], what="the worker's row")
    row = text(browser, '#workers tr[data-worker-id="%s"]' % worker["worker_id"])
    assert model in row and "localhost" in row and "cpu:0" in row and "0/4" in row, row
    node = text(browser, '.node[data-node="localhost"]')
    assert "hive up" in node and "RAM" in node, node
    assert text(browser, "#models table").count(model_path) == 1
    until(browser, lambda d: "Model loaded" in text(d, "#feed"), what="the live feed")
    browser.save_screenshot(str(tmp_path / "ui-1280x800.png"))

    # a chat answer streams from the real model, with its timings
    chat_model = browser.find_element(By.ID, "chat-model")
    chat_model.clear()
    chat_model.send_keys(model)
    browser.find_element(By.ID, "chat-input").send_keys("Say hello")
    browser.find_element(By.ID, "chat-send").click()
    until(browser, lambda d: "tokens/s" in text(d, "#chat-stats"), 60, "the chat's answer")
    answers = browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg.assistant")
    assert len(answers) == 1 and answers[0].text.strip() not in ("", "…")
    assert "first token" in text(browser, "#chat-stats")
    until(browser, lambda d: "Inference complete" in text(d, "#feed"), what="the job in the feed")

    # phone size: the same page, nothing wider than the screen
    browser.set_window_size(390, 844)
    time.sleep(0.5)
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
    browser.save_screenshot(str(tmp_path / "ui-390x844.png"))
    browser.set_window_size(1280, 800)

    # the unload button: the worker goes, on the page and in /v2/status
    unload = 'button.unload[data-worker-id="%s"]' % worker["worker_id"]
    until(browser, lambda d: click(d, d.find_element(By.CSS_SELECTOR, unload)), what="the unload button")
    wait_until(lambda: not rbee.QueenClient(queen.url, KEY).status()["workers"], 30, what="the worker unloaded")
    until(browser, lambda d: not worker_ids(d), what="the row gone")
    assert browser.find_element(By.ID, "workers-empty").is_displayed()

    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], json.dumps(errors, indent=1)
    assert (tmp_path / "ui-1280x800.png").stat().st_size > 10000
    assert (tmp_path / "ui-390x844.png").stat().st_size > 10000


def test_a_wrong_key_shows_the_form_again_and_nothing_else(roles, env, browser):
    queen = start_queen(roles, dict(env, RBEE_API_KEY=KEY))
    browser.get(queen.url + "/ui")
    until(browser, lambda d: d.find_element(By.ID, "key-input").is_displayed(), what="the key form")
    browser.find_element(By.ID, "key-input").send_keys("not-the-key")
    browser.find_element(By.ID, "key-connect").click()
    until(browser, lambda d: "refused" in text(d, "#key-error"), what="the refusal")
    assert not browser.find_element(By.ID, "app").is_displayed()
    assert not worker_ids(browser)
