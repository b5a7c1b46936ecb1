"""/docs in a real browser: Swagger UI's "Try it out" reaches the gateway it came from.

Debian's headless Chromium, driven by chromedriver through the W3C WebDriver
protocol (JSON over HTTP, with http.client: no selenium). ./scripts/test.sh
installs both packages (chromium, chromium-driver).
"""

import http.client
import json
import shutil
import subprocess
import time
import uuid

import helpers
import pytest

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
# A W3C WebDriver element reference is this key's value.
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


class Browser:
    """One headless Chromium session through chromedriver on a free port."""

    def __init__(self, tmp_path):
        for program in ("chromium", "chromedriver"):
            if shutil.which(program) is None:
                pytest.fail(
                    f"{program} is missing: apt-get install chromium chromium-driver "
                    "(./scripts/test.sh does)"
                )
        self.port = helpers.free_port()
        self.driver = subprocess.Popen(
            ["chromedriver", f"--port={self.port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_for_driver()
        options = {
            "binary": shutil.which("chromium"),
            "args": [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"],
        }
        caps = {"browserName": "chrome", "goog:chromeOptions": options}
        session = self._send(
            "POST", "/session", {"capabilities": {"alwaysMatch": caps}}
        )
        self.session = f"/session/{session['sessionId']}"

    def _wait_for_driver(self):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                self._send("GET", "/status")
                return
            except OSError:
                time.sleep(0.1)
        pytest.fail("chromedriver did not start")

    def _send(self, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = None if body is None else json.dumps(body)
            conn.request(method, path, data, {"Content-Type": "application/json"})
            reply = json.loads(conn.getresponse().read())["value"]
        finally:
            conn.close()
        if isinstance(reply, dict) and "error" in reply:
            raise LookupError(f"{reply['error']}: {reply.get('message', '')[:300]}")
        return reply

    def command(self, method, path, body=None):
        """A command of this session, e.g. ('POST', '/url', {'url': ...})."""
        return self._send(method, self.session + path, body)

    def find(self, xpath, timeout=20):
        """The first element matching xpath, waiting until there is one."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = self.command(
                    "POST", "/element", {"using": "xpath", "value": xpath}
                )
                return found[ELEMENT]
            except LookupError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def click(self, xpath):
        self.command("POST", f"/element/{self.find(xpath)}/click", {})

    def text(self, xpath):
        return self.command("GET", f"/element/{self.find(xpath)}/text")

    def close(self):
        try:
            self.command("DELETE", "")
        finally:
            self.driver.terminate()
            self.driver.wait(10)


@pytest.fixture
def browser(tmp_path):
    browser = Browser(tmp_path)
    yield browser
    browser.close()


def test_try_it_out_sends_the_request_to_the_gateway_serving_the_page(
    gateway, clean_movies, browser
):
    # Try it out fills ?title= with the documented example, "new movie".
    title = f"A new movie {uuid.uuid4().hex[:8]}"
    status, _, _ = helpers.call(gateway.url, "POST", "/api/movies", {"title": title})
    assert status == 201
    browser.command("POST", "/url", {"url": f"{gateway.url}/docs"})
    block = '//div[contains(@class, "opblock-get")][.//*[@data-path="/api/movies"]]'
    browser.click(f'{block}//button[contains(@class, "opblock-summary-control")]')
    browser.click(f'{block}//button[contains(@class, "try-out__btn")]')
    browser.click(f'{block}//button[contains(@class, "execute")]')
    live = f'{block}//table[contains(@class, "live-responses-table")]'
    status = browser.text(
        f'{live}/tbody/tr/td[contains(@class, "response-col_status")]'
    )
    url = browser.text(f'{block}//div[contains(@class, "request-url")]/pre')
    assert url.startswith(f"{gateway.url}/api/movies?"), url
    assert status == "200", browser.text(live)
    assert title in browser.text(live)  # the answer of this test's own gateway
