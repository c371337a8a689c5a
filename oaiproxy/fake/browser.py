# -*- test-case-name: tests.e2e.test_dashboard -*-
"""
The dashboard in a real browser, for its end-to-end test and its
screenshot (L{oaiproxy.fake.screenshot}): the daemon with clients (one of
them named like markup), budgets, prices and an admin key; traffic sent
through it with the openai SDK; and Debian's headless Chromium driven by
Selenium through the system chromedriver.

Nothing downloads a browser or a driver: both are the system's, given by
path, so Selenium Manager never runs (and C{SE_OFFLINE} says so should it
try).  Selenium and the openai SDK are test dependencies (C{.[test]}),
imported only here.
"""

from __future__ import annotations

import os
import shutil
import threading
from typing import TYPE_CHECKING, Any, Optional

from oaiproxy.access.clients import file_entry, mint_key
from oaiproxy.fake.processes import Process, start_proxy

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

__all__ = ["HOSTILE", "Demo", "chromium", "start_browser"]

#: A client name that would run script if it were ever put in as markup.
HOSTILE = "<img src=x onerror=alert(1)>"

#: Flags for a headless Chromium that stays off the network and the disk's
#: shared memory, as in a CI container.
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
)

#: The admin key the demo's daemon reads from its file.
ADMIN_KEY = "oaiproxy-admin-demo-0123456789abcdefghijklmnop"


def chromium() -> Optional[tuple[str, str]]:
    """
    The system's Chromium and its chromedriver, if both are installed.
    """
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        return None
    return browser, driver


def start_browser(
    user_data_dir: str, width: int = 1400, height: int = 1000, dark: bool = False, scale: float = 1.0
) -> "WebDriver":
    """
    A headless Chromium on a fresh profile, its console kept (for CSP
    violations) and C{window.alert} recorded rather than shown.
    """
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = chromium()
    if found is None:
        raise RuntimeError("chromium and chromium-driver are not installed")
    browser, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    options.add_argument(f"--window-size={width},{height}")
    options.add_argument(f"--force-device-scale-factor={scale}")
    if dark:
        options.add_argument("--force-dark-mode")
        options.add_argument("--blink-settings=preferredColorScheme=0")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver, log_output=os.path.join(user_data_dir, "chromedriver.log"))
    session = webdriver.Chrome(options=options, service=service)
    if dark:
        session.execute_cdp_cmd(
            "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
        )
    return session


class Demo:
    """
    The daemon with the mock upstream, three clients with budgets (one
    named L{HOSTILE}), a prices file and the admin key, in C{cwd}.

    @ivar keys: each client's key, by name.
    """

    def __init__(self, cwd: str, *args: str) -> None:
        self.cwd = cwd
        self.keys = {"team-a": mint_key(), "batch-jobs": mint_key(), HOSTILE: mint_key()}
        budgets = {
            "team-a": "usd_per_month = 0.01\ntokens_per_day = 20000\n",
            "batch-jobs": "tokens_per_day = 3000\n",
            HOSTILE: "tokens_per_day = 1000\n",
        }
        clients = os.path.join(cwd, "clients.toml")
        with open(clients, "w", encoding="utf-8") as out:
            for name, key in self.keys.items():
                out.write(file_entry(name, key) + budgets[name] + "\n")
        prices = os.path.join(cwd, "prices.toml")
        with open(prices, "w", encoding="utf-8") as out:
            out.write('[models."gpt-4o-mini"]\ninput = 0.15\noutput = 0.60\n')
            out.write('[models."gpt-4o"]\ninput = 2.50\noutput = 10.00\n')
        admin = os.path.join(cwd, "admin_key")
        with open(admin, "w", encoding="utf-8") as out:
            out.write(ADMIN_KEY + "\n")
        os.chmod(admin, 0o600)
        self.args = [
            "--mock-upstream",
            "--client-keys-file",
            clients,
            "--prices-file",
            prices,
            "--admin-key-file",
            admin,
            *args,
        ]
        self.process: Optional[Process] = None
        self.base = ""

    def start(self) -> "Demo":
        self.process, self.base = start_proxy(self.cwd, self.args, {})
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def client(self, name: str, key: Optional[str] = None) -> Any:
        """
        An openai SDK client of C{name} (or with C{key}), through the proxy.
        """
        import openai

        return openai.OpenAI(api_key=key or self.keys[name], base_url=self.base + "/v1", max_retries=0, timeout=20.0)

    def traffic(self, rounds: int = 3, stop: Optional[threading.Event] = None) -> dict[str, int]:
        """
        Requests of every kind, C{rounds} times: chats and streams of each
        client (until its budget refuses it), a wrong key, a model the mock
        fails with a 500.  Returns the count of each status seen.
        """
        import openai

        seen: dict[str, int] = {}

        def count(sdk: Any, **request: Any) -> None:
            try:
                result = sdk.chat.completions.create(messages=messages, **request)
                if request.get("stream"):
                    for _ in result:
                        pass
                key = "200"
            except openai.APIStatusError as error:
                key = str(error.status_code)
            except openai.APIConnectionError:
                key = "connection"
            seen[key] = seen.get(key, 0) + 1

        messages = [{"role": "user", "content": "Say hello to the dashboard."}]
        wrong = self.client("team-a", key="sk-proxy-not-a-real-key-0000000000000000")
        for round_ in range(rounds):
            if stop is not None and stop.is_set():
                break
            for name in self.keys:
                sdk = self.client(name)
                model = "gpt-4o" if name == "team-a" and round_ % 2 else "gpt-4o-mini"
                count(sdk, model=model, max_tokens=60)
                count(sdk, model=model, max_tokens=60, stream=True)
            count(wrong, model="gpt-4o-mini")
            count(self.client("batch-jobs"), model="fake-500", max_tokens=60)
        return seen
