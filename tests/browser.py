"""A playground server and a headless Chromium for tests and benchmarks, both always stopped, every wait bounded.

Chromium and its driver are Debian's (`chromium`, `chromium-driver`, installed by scripts/setup.sh), driven by
Selenium with the driver path given, so Selenium Manager never downloads anything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("FT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FT_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--window-size=1440,1100",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists() and not shutil.which(p)]
    if missing:
        message = f"{', '.join(missing)} missing: scripts/setup.sh installs Debian's chromium and chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class Playground:
    """`finetune-operator playground TARGET` as a child process in its own session."""

    def __init__(self, target: Path, *args: str, timeout: float = 300, wait: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "finetune_operator", "playground", str(target), "--port", str(self.port)]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [*command, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True,
        )  # fmt: skip
        self.output: list[str] = []
        self.ready = threading.Event()
        self.serving = False
        self.models_loaded = threading.Event()
        self.loaded_after: float | None = None
        """Seconds from the start until the process said both models are loaded."""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if wait:
            self.wait_serving(timeout)

    def wait_serving(self, timeout: float = 300) -> None:
        """Until the process says where it serves; stops it and fails with its output if it does not."""
        if not self.ready.wait(timeout) or not self.serving:
            self.stop()
            raise AssertionError(f"the playground did not start in {timeout} s:\n" + "".join(self.output[-40:]))
        self.seconds_to_ready = time.monotonic() - self.started

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if line.startswith("playground: http"):
                self.serving = True
                self.ready.set()
            elif line.startswith(("loaded base", "error: the models could not be loaded")):
                self.loaded_after = time.monotonic() - self.started
                self.models_loaded.set()
        self.ready.set()  # the process ended: stop waiting
        self.models_loaded.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self.reader.join(timeout=5)


@contextlib.contextmanager
def playground(target: Path, *args: str, wait: bool = True) -> Iterator[Playground]:
    server = Playground(target, *args, wait=wait)
    try:
        yield server
    finally:
        server.stop()


class InProcessPlayground:
    """The same app served from this process (what the CLI's `launch` does, without a new interpreter): for the
    tests that vary the output, not the command; Gradio, torch and transformers are imported once."""

    def __init__(self, target: Path) -> None:
        from finetune_operator.playground.app import launch
        from finetune_operator.playground.engine import Engine
        from finetune_operator.playground.target import resolve

        self.engine = Engine(resolve(target))
        self.app, url = launch(self.engine, "127.0.0.1", free_port(), block=False)
        self.url = url if url.endswith("/") else url + "/"

    def stop(self) -> None:
        self.app.close()
        self.engine.wait_loaded(120)  # the loader thread ends before the next test loads its own models


@contextlib.contextmanager
def in_process_playground(target: Path) -> Iterator[InProcessPlayground]:
    from finetune_operator.playground.app import OFFLINE_ENV

    before = {key: os.environ.get(key) for key in OFFLINE_ENV}  # launch sets them for the playground process
    server = InProcessPlayground(target)
    try:
        yield server
    finally:
        server.stop()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    require_browser()
    os.environ["SE_AVOID_STATS"] = "true"  # Selenium Manager's usage statistics, should it ever run
    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, condition: Any, timeout: float = 120) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def textarea(driver: Any, elem_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea").get_attribute("value")


def type_prompt(driver: Any, text: str) -> None:
    """Type like a person: Enter starts a new line in the multi-line prompt box (Shift+Enter would submit)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
    box.clear()
    lines = text.split("\n")
    for index, line in enumerate(lines):
        box.send_keys(line)
        if index < len(lines) - 1:
            box.send_keys(Keys.ENTER)


def click(driver: Any, elem_id: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, elem_id).click()


def compare(driver: Any, prompt: str, timeout: float = 300) -> tuple[str, str, str]:
    """Type the prompt, press Compare, wait until both answers are complete; (base, tuned, state line)."""
    from selenium.webdriver.common.by import By

    type_prompt(driver, prompt)
    click(driver, "compare-button")
    wait_for(driver, lambda d: d.find_element(By.ID, "compare-state").text.startswith(("done", "stopped")), timeout)
    return (
        textarea(driver, "base-answer"),
        textarea(driver, "tuned-answer"),
        driver.find_element(By.ID, "compare-state").text,
    )
