"""Helpers to serve the app and drive it in Debian's headless Chromium through Playwright."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_available() -> bool:
    return Path(CHROMIUM).is_file() or shutil.which("chromium") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_PIDS: dict[str, int] = {}   # base URL -> the serving process, for memory measurements


@contextlib.contextmanager
def served_app(env: dict | None = None, timeout: float = 120.0):
    """`streamlit run app.py` on a free loopback port; yields the base URL once healthy. The
    server's output goes to a file (a pipe nobody reads would block it once full)."""
    import tempfile
    port = free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    base = f"http://127.0.0.1:{port}"
    SERVER_PIDS[base] = proc.pid
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                    if r.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise RuntimeError(f"streamlit did not become healthy: {log.read()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def chromium():
    """Debian's Chromium, headless, through Playwright (never a browser downloaded by a test tool)."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser, width: int = 1400, height: int = 1000, **context_args):
    """A page in a fresh browser context (its own cookies and storage: a new visitor)."""
    return browser.new_context(viewport={"width": width, "height": height}, **context_args).new_page()


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 1000):
    with chromium() as browser:
        yield new_page(browser, width, height)


# ---- driving the app as a person does ----
PAGE_LINKS = ["Home", "Patching", "Ablation", "Attribution", "DLA", "Logit lens", "Attention", "Weights"]
PAIR_LABELS = {"clean": "Clean prompt", "corrupted": "Corrupted prompt", "clean_answer": "Clean answer (one token)",
               "corrupted_answer": "Corrupted answer (one token)"}


def settle(page, timeout: float = 120.0) -> None:
    """Wait until the app has finished its run (twice 'notRunning' 250 ms apart: a click's rerun
    can start a moment after the click)."""
    deadline = time.time() + timeout
    idle = 0
    page.wait_for_timeout(250)
    while idle < 2:
        app = page.locator('[data-testid="stApp"]')
        state = app.get_attribute("data-test-script-state", timeout=timeout * 1000)
        connected = app.get_attribute("data-test-connection-state") == "CONNECTED"
        # Every page draws its sidebar links last: their presence means a run got to its end.
        idle = idle + 1 if state == "notRunning" and connected and sidebar_links(page).count() else 0
        if time.time() > deadline:
            raise TimeoutError(f"the app is still running after {timeout} s")
        page.wait_for_timeout(250)


def problems(page) -> list[str]:
    """Exceptions shown in the page (Streamlit's exception boxes or a traceback in the text)."""
    found = [e.inner_text()[:300] for e in page.locator('[data-testid="stException"]').all()]
    body = page.inner_text("body")
    if "Traceback" in body and not found:
        found.append(body[body.index("Traceback"):][:300])
    return found


def errors(page) -> list[str]:
    """The st.error messages shown in the page."""
    return [e.inner_text() for e in page.locator('[data-testid="stAlertContentError"]').all()]


def open_page(page, link: str) -> None:
    """Click the sidebar link to a page, as a person does, and wait for it to render."""
    import re
    # The link's text ends with its label (an icon's ligature name comes first, with no space).
    name = re.compile(r"(Home|app)\s*$" if link == "Home" else rf"{re.escape(link)}\s*$")
    sidebar_links(page).filter(has_text=name).first.click()
    settle(page)


def sidebar_links(page):
    # The app's own page links; Streamlit's default list is matched too, so these tests can be
    # run against versions of the app that used it (there Home is called "app").
    return page.locator('[data-testid="stSidebar"] [data-testid="stPageLink"] a, [data-testid="stSidebarNav"] a')


def current_link(page) -> str:
    """The page the browser shows, by its sidebar label (from the URL's path)."""
    path = page.url.split("?")[0].split("//", 1)[1].partition("/")[2].rstrip("/")
    return path.replace("_", " ") if path else "Home"


def pair_field(page, key: str):
    """The editor field for one part of the pair: Home's main editor, or the sidebar's elsewhere."""
    label = PAIR_LABELS[key]
    main = page.locator('[data-testid="stMain"]').get_by_label(label, exact=True)
    if main.count():
        return main.first
    sidebar = page.locator('[data-testid="stSidebar"]')
    field = sidebar.get_by_label(label, exact=True)
    if not field.count() or not field.first.is_visible():
        sidebar.locator("summary").filter(has_text="Prompt pair").click()
        page.wait_for_timeout(200)
    return sidebar.get_by_label(label, exact=True).first


def edit_pair(page, key: str, value: str) -> None:
    """Type into a pair field and leave it (Tab commits it), then wait for the rerun."""
    field = pair_field(page, key)
    field.fill(value)
    field.press("Tab")
    settle(page)


def sidebar_lds(page) -> tuple[float, float] | None:
    """The (LD_clean, LD_corr) the sidebar shows for the current pair, or None."""
    import re
    text = page.locator('[data-testid="stSidebar"]').inner_text().replace("−", "-")
    m = re.search(r"LD_clean = ([-+]\d+\.\d+) · LD_corr = ([-+]\d+\.\d+)", text)
    return (float(m.group(1)), float(m.group(2))) if m else None


def query(page) -> dict[str, str]:
    from urllib.parse import parse_qs, urlsplit
    return {k: v[0] for k, v in parse_qs(urlsplit(page.url).query, keep_blank_values=True).items()}


def eulerian_walk(n: int) -> list[int]:
    """A walk over n nodes that takes every ordered pair (i, j), i != j, exactly once (Hierholzer)."""
    unused = {i: [j for j in range(n) if j != i] for i in range(n)}
    stack, walk = [0], []
    while stack:
        node = stack[-1]
        if unused[node]:
            stack.append(unused[node].pop())
        else:
            walk.append(stack.pop())
    return walk[::-1]
