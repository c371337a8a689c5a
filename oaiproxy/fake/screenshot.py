# -*- test-case-name: tests.e2e.test_dashboard -*-
"""
C{python -m oaiproxy.fake.screenshot docs/dashboard.png}: the README's
picture of the dashboard, made again.

It starts the daemon of L{oaiproxy.fake.browser.Demo} (the mock upstream,
three clients with budgets, prices, the admin key) in a temporary
directory, sends it a minute of uneven traffic with the openai SDK (chats,
streams, a wrong key, an upstream failing, slow streams), signs in to the
dashboard in headless Chromium and saves the whole page.  Needs the test
dependencies (C{pip install '.[test]'}) and Debian's C{chromium} and
C{chromium-driver}.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import threading
import time
from typing import Any, Optional, Sequence

from oaiproxy.fake.browser import ADMIN_KEY, Demo, start_browser

__all__ = ["main"]


def _slow_streams(demo: Demo, stop: threading.Event) -> None:
    """
    A few streams that pause upstream, so that the in-flight and open
    stream charts show something.
    """
    sdk = demo.client("batch-jobs")
    messages = [{"role": "user", "content": "a long answer, please"}]
    while not stop.is_set():
        try:
            for _ in sdk.chat.completions.create(model="fake-pause", messages=messages, stream=True, max_tokens=60):
                pass
        except Exception:
            pass


def capture(output: str, seconds: float, width: int, dark: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="oaiproxy-screenshot-") as cwd:
        demo = Demo(cwd).start()
        stop = threading.Event()
        slow = [threading.Thread(target=_slow_streams, args=(demo, stop), daemon=True) for _ in range(2)]
        try:
            for thread in slow:
                thread.start()
            began = time.monotonic()
            while time.monotonic() - began < seconds:
                # Uneven load: a few rounds, then a pause that varies.
                elapsed = time.monotonic() - began
                demo.traffic(rounds=1 + int(2 + 2 * math.sin(elapsed / 9)))
                time.sleep(0.3 + 0.3 * (1 + math.cos(elapsed / 7)))
            browser = start_browser(tempfile.mkdtemp(dir=cwd), width=width, height=900, dark=dark)
            try:
                _shoot(browser, demo.base, output, width)
            finally:
                browser.quit()
        finally:
            stop.set()
            demo.stop()


def _shoot(browser: object, base: str, output: str, width: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver: Any = browser
    driver.get(base + "/dashboard/")
    driver.find_element(By.ID, "key").send_keys(ADMIN_KEY)
    driver.find_element(By.ID, "signin-button").click()
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: d.find_element(By.ID, "chart-spend").get_attribute("data-points"))
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, height + 20)
    wait.until(lambda d: d.find_element(By.ID, "chart-rps").get_attribute("data-points"))
    time.sleep(0.5)  # the charts' resize settles (it is debounced)
    driver.save_screenshot(output)
    print(f"wrote {output} ({width}x{height})")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m oaiproxy.fake.screenshot")
    parser.add_argument("output", nargs="?", default="docs/dashboard.png")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to send traffic first")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--dark", action="store_true", help="the dark scheme")
    arguments = parser.parse_args(argv)
    capture(arguments.output, arguments.seconds, arguments.width, arguments.dark)


if __name__ == "__main__":
    main()
