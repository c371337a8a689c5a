# -*- test-case-name: tests.e2e.test_dashboard -*-
"""
The dashboard in a real browser: Debian's headless Chromium, driven by
Selenium through the system chromedriver, against the real daemon
(C{--mock-upstream}) with traffic sent through it by the openai SDK.

Skipped only when chromium or chromium-driver is not installed (CI
installs both).  Every wait has a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.fake.browser import ADMIN_KEY, HOSTILE, Demo, chromium, start_browser
from tests.support import temp_dir

DEADLINE = 40.0


def live(base: str) -> Any:
    request = urllib.request.Request(base + "/dashboard/live", headers={"authorization": "Bearer " + ADMIN_KEY})
    with urllib.request.urlopen(request, timeout=20) as response:
        return json.load(response)


def until(condition: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class DashboardBrowserTests(SynchronousTestCase):
    def setUp(self) -> None:
        if chromium() is None:
            raise self.skipTest("chromium and chromium-driver are not installed")
        self.cwd = temp_dir(self)
        self.demo = Demo(self.cwd).start()
        self.addCleanup(self.demo.stop)

    def test_signed_in_dashboard(self) -> None:
        """
        A wrong key is refused on the form; the admin key shows the charts
        with data, every client's name as text (the one named like an
        image tag is those characters: no element made, no dialog, no CSP
        violation), budget bars and refusals; it fits a phone's width and
        follows the dark scheme; signing out forgets the key.
        """
        seen = self.demo.traffic(rounds=4)
        self.assertIn("200", seen)
        self.assertIn("401", seen)
        # Two samples with the traffic between them (the sampler ticks every 5 s).
        until(
            lambda: any(v for vs in live(self.demo.base)["series"]["requests_per_second"].values() for v in vs),
            "a rate",
        )

        from selenium.common.exceptions import NoAlertPresentException
        from selenium.webdriver.common.by import By

        browser = start_browser(temp_dir(self))
        self.addCleanup(browser.quit)
        browser.get(self.demo.base + "/dashboard")
        self.assertTrue(browser.current_url.endswith("/dashboard/"), browser.current_url)

        def text(selector: str) -> str:
            return str(browser.find_element(By.CSS_SELECTOR, selector).text)

        def sign_in(key: str) -> None:
            field = browser.find_element(By.ID, "key")
            field.clear()
            field.send_keys(key)
            browser.find_element(By.ID, "signin-button").click()

        sign_in("oaiproxy-admin-not-the-key-0123456789")
        until(lambda: "Wrong key" in text("#signin-error"), "the wrong key's message")
        self.assertFalse(browser.find_element(By.ID, "board").is_displayed())
        self.assertIsNone(browser.execute_script("return sessionStorage.getItem('oaiproxy.admin_key')"))

        sign_in(ADMIN_KEY)
        until(lambda: browser.find_element(By.ID, "board").is_displayed(), "the board")
        self.assertNotIn(ADMIN_KEY, browser.current_url)
        self.assertEqual(browser.execute_script("return sessionStorage.getItem('oaiproxy.admin_key')"), ADMIN_KEY)

        # The charts are drawn, with data.
        rps = until(lambda: browser.find_element(By.ID, "chart-rps").get_attribute("data-points"), "the rate chart")
        self.assertGreaterEqual(int(rps), 1)
        self.assertGreater(float(browser.find_element(By.ID, "chart-rps").get_attribute("data-max")), 0)
        inked = browser.execute_script(
            """
            const c = document.querySelector('#chart-rps canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++;
            return n;
            """
        )
        self.assertGreater(inked, 1000)
        until(lambda: browser.find_element(By.ID, "chart-spend").get_attribute("data-points"), "the spend chart")

        # Names are text: the hostile one is shown as its characters.
        def cells(table: str) -> list[str]:
            return [td.text for td in browser.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr td:first-child")]

        until(lambda: HOSTILE in cells("spend-clients"), "the clients' names")
        self.assertEqual(set(cells("spend-clients")), {"team-a", "batch-jobs", HOSTILE})
        self.assertIn("gpt-4o-mini", cells("spend-models"))
        names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".budget .name")]
        self.assertEqual(sorted(names), sorted(["team-a", "team-a", "batch-jobs", HOSTILE]))
        widths = browser.execute_script(
            "return [...document.querySelectorAll('.budget .fill')].map(e => parseFloat(e.style.width))"
        )
        self.assertTrue(all(w > 0 for w in widths), widths)
        self.assertIn("resets in", text("#budgets"))
        self.assertEqual(browser.execute_script("return document.querySelectorAll('img').length"), 0)
        self.assertEqual(browser.execute_script("return document.querySelectorAll('[onerror]').length"), 0)
        with self.assertRaises(NoAlertPresentException):
            browser.switch_to.alert.accept()

        # Refusals and upstreams.
        self.assertIn("invalid_api_key", text("#refusals"))
        self.assertIn("default", text("#upstreams"))

        # A phone's width: nothing wider than the screen.
        browser.set_window_size(390, 844)
        until(
            lambda: browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"),
            "the page to fit a phone",
        )
        # The dark scheme.
        light = browser.execute_script("return getComputedStyle(document.documentElement).backgroundColor")
        browser.execute_cdp_cmd(
            "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
        )
        dark = browser.execute_script("return getComputedStyle(document.documentElement).backgroundColor")
        self.assertNotEqual(light, dark)

        # No CSP violation, no script error, anywhere on the way.
        console = [entry["message"] for entry in browser.get_log("browser")]
        self.assertEqual(
            [m for m in console if "Content Security Policy" in m or "Refused to" in m or "Uncaught" in m], []
        )

        browser.find_element(By.ID, "signout").click()
        until(lambda: browser.find_element(By.ID, "signin").is_displayed(), "the sign-in form")
        self.assertIsNone(browser.execute_script("return sessionStorage.getItem('oaiproxy.admin_key')"))

    def test_the_hostile_name_would_be_caught(self) -> None:
        """
        The checks above can fail: markup put into the page the wrong way
        (innerHTML) makes an element, and the CSP refuses its handler.
        """
        from selenium.webdriver.common.by import By

        browser = start_browser(temp_dir(self))
        self.addCleanup(browser.quit)
        browser.get(self.demo.base + "/dashboard/")
        until(lambda: browser.find_element(By.ID, "key").is_displayed(), "the form")
        browser.execute_script("document.getElementById('scope').innerHTML = arguments[0]", HOSTILE)
        self.assertEqual(browser.execute_script("return document.querySelectorAll('img').length"), 1)
        until(
            lambda: any("Content Security Policy" in e["message"] for e in browser.get_log("browser")),
            "the CSP refusal",
        )

    def test_live_refused_without_the_admin_key(self) -> None:
        """
        The live figures need the admin key, on the real daemon too.
        """
        request = urllib.request.Request(
            self.demo.base + "/dashboard/live", headers={"authorization": "Bearer " + self.demo.keys["team-a"]}
        )
        with self.assertRaises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=20)
        self.assertEqual(raised.exception.code, 401)


class DashboardGroupTests(SynchronousTestCase):
    def test_a_group_shows_the_whole_group(self) -> None:
        """
        With C{--workers 2} whichever worker answers shows the group: both
        workers, their upstream views merged, every refusal of either, and
        the requests of both in the rates.
        """
        cwd = temp_dir(self)
        demo = Demo(cwd, "--workers", "2").start()
        self.addCleanup(demo.stop)
        assert demo.process is not None
        demo.process.wait_until(lambda out: out.count("oaiproxy listening on") >= 2)
        seen = demo.traffic(rounds=3)
        refused = seen["401"]
        total = sum(seen.values())

        def counted(answer: Any) -> int:
            return round(
                sum(sum(v) * answer["series"]["interval"] for v in answer["series"]["requests_per_second"].values())
            )

        def settled() -> Any:
            # (Until a sample after the last request: each worker samples
            # every 5 s, so the latest requests may not be in a rate yet.)
            answers = [live(demo.base) for _ in range(6)]
            good = all(
                a["group"]
                and a["workers"] == 2
                and a["upstreams"][0]["workers"] == 2
                and len([r for r in a["refusals"] if r["status"] == 401]) == refused
                and counted(a) >= total
                for a in answers
            )
            return answers if good else None

        answers = until(settled, "every worker to show the group's figures")
        for answer in answers:
            # Every request of both workers, once: the rates add up to them.
            self.assertGreaterEqual(counted(answer), total)
