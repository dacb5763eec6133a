"""The chat page at `/` in headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
Selenium; nothing downloads a browser): type, send, watch the answer stream in and match the API's
greedy answer, attach an image, stop a long answer and see its row freed, reload and keep the
history, no console errors, a screenshot."""

import shutil
import time
from pathlib import Path

import pytest

from tests.test_serve import loaded, metric, serve  # noqa: F401  (fixtures)

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no Chromium: install Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")

WAIT = 60  # seconds for any one page event


def wait_for(condition, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


@pytest.fixture
def browser(monkeypatch):
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not fetch anything

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    yield driver
    driver.quit()


def test_chat_page(browser, loaded, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with serve(loaded, max_batch=2) as server:
        d = browser
        d.get(server.url + "/")
        wait_for(lambda: d.find_element(By.ID, "status").text.startswith("model: tiny"), "the model list")
        js = "return document.body.dataset.busy"

        def set_field(field_id: str, value: str):
            field = d.find_element(By.ID, field_id)
            field.clear()
            field.send_keys(value, Keys.TAB)  # TAB fires "change", which stores it

        def ask(text: str):
            box = d.find_element(By.ID, "input")
            box.send_keys(text)
            # Record every length the answer passes through, to see it grow.
            d.execute_script("""
                window.lengths = [];
                new MutationObserver(() => {
                  const all = document.querySelectorAll('.msg.assistant');
                  if (all.length) window.lengths.push(all[all.length - 1].dataset.raw.length);
                }).observe(document.getElementById('messages'), {subtree: true, childList: true, attributes: true});
            """)
            d.find_element(By.ID, "send").click()

        def answers():
            return d.find_elements(By.CSS_SELECTOR, ".msg.assistant")

        # 1. Greedy answer, streamed, equal to the API's.
        set_field("temperature", "0")
        set_field("max-tokens", "40")
        ask("hello")
        wait_for(lambda: d.execute_script(js) == "1" or len(answers()) == 1, "the request to start")
        wait_for(lambda: d.execute_script(js) == "0", "the answer to finish")
        shown = answers()[-1].get_attribute("data-raw")
        api = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                                      max_tokens=40, temperature=0).choices[0].message.content
        assert shown == api and shown
        lengths = d.execute_script("return window.lengths")
        assert len({n for n in lengths if 0 < n < len(shown)}) >= 2, f"the answer did not grow: {lengths}"

        # 2. An image.
        image = tmp_path / "cat.png"
        from PIL import Image

        Image.new("RGB", (40, 24), (200, 120, 30)).save(image)
        d.find_element(By.ID, "attach").send_keys(str(image))
        wait_for(lambda: "1 image" in d.find_element(By.ID, "pending").text, "the image to attach")
        ask("What is in the picture?")
        wait_for(lambda: len(answers()) == 2 and d.execute_script(js) == "0", "the image answer")
        assert d.find_elements(By.CSS_SELECTOR, ".msg.user img")
        assert "error" not in answers()[-1].get_attribute("class")

        # 3. Stop a long answer: the row is freed.
        d.find_element(By.ID, "clear").click()
        set_field("max-tokens", "1500")
        ask("Tell me everything.")
        wait_for(lambda: answers() and len(answers()[-1].get_attribute("data-raw")) > 0, "the long answer to start")
        d.find_element(By.ID, "stop").click()
        wait_for(lambda: d.execute_script(js) == "0", "the page to stop")
        stopped = answers()[-1].get_attribute("data-raw")
        wait_for(lambda: metric(server, "herd_requests_running") == 0 and not server.app.state.worker.in_flight(),
                 "the stopped answer's row to be freed", timeout=30)
        full = server.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Tell me everything."}], max_tokens=1500,
            temperature=0).choices[0].message.content
        assert full.startswith(stopped) and len(stopped) < len(full), "the answer was not cut short"

        # 4. History survives a reload; no console errors; a screenshot.
        count = len(d.find_elements(By.CSS_SELECTOR, ".msg"))
        d.refresh()
        wait_for(lambda: d.find_element(By.ID, "status").text.startswith("model:"), "the reloaded page")
        assert len(d.find_elements(By.CSS_SELECTOR, ".msg")) == count == 2
        errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        shot = Path(tmp_path) / "chat_page.png"
        d.save_screenshot(str(shot))
        assert shot.stat().st_size > 1000
        print(f"screenshot: {shot}")
