"""The operator dashboard in a real headless Chromium (Debian's `chromium`, driven by
playwright through its executable path; never `playwright install`). Skipped, with the
reason, where the `playwright` module or a Chromium cannot be had. Screenshots go to
`.run/screens/`."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.client import RingsideClient
from tests.integration.conftest import Cluster, await_until, is_stopped, wait_until

SCREENS = Path(__file__).resolve().parents[2] / ".run" / "screens"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        subprocess.run(argv, env=env, capture_output=True, timeout=600, check=False)
    return shutil.which("chromium")


@pytest.fixture
def browser() -> Iterator[Any]:
    # Not session-scoped: playwright's sync API keeps an event loop running in this
    # thread while it is open, and later tests' asyncio.run() would refuse to start.
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium: not on PATH, and `apt-get install chromium` did not provide it")
    with sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except Exception as exc:  # a browser that cannot start here is a skip, not a failure
            pytest.skip(f"Chromium at {executable} did not start: {exc}")
        yield browser
        browser.close()


def member_state(page: Any, name: str) -> str | None:
    row = page.query_selector(f'tr[data-member="{name}"]')
    return None if row is None else row.get_attribute("data-state")


async def update_while_redis_stalls(cluster: Cluster, player: str, seconds: float) -> None:
    async with await RingsideClient.connect(cluster.url, cluster.token(player)) as client:
        stall = asyncio.create_task(asyncio.to_thread(cluster.local.pause, "redis", seconds))
        await await_until(lambda: is_stopped(cluster, "redis"), 2, "Redis is stopped")
        await client.request("player.update", {"incr": {"xp": 1}})  # answered from memory
        await stall


def test_dashboard_shows_members_failure_and_drains_a_node(browser: Any, cluster: Cluster) -> None:
    SCREENS.mkdir(parents=True, exist_ok=True)
    base = cluster.local.admin_url("gateway")
    page = browser.new_page(viewport={"width": 1400, "height": 800})
    try:
        page.goto(f"{base}/?token={cluster.config.admin_token}")
        page.wait_for_function(
            "document.querySelectorAll('tr[data-role=node][data-state=alive]').length === 3", timeout=10_000
        )
        page.wait_for_selector("#ring path", timeout=5_000)
        assert "token" not in page.url  # taken out of the address bar at once
        assert page.text_content("#conn") == "live"
        page.screenshot(path=str(SCREENS / "dashboard-alive.png"))

        # Redis stalls under a write: the writing node shows as degraded, then recovers.
        writer = threading.Thread(  # a thread of its own: Playwright's sync API holds this one's loop
            target=asyncio.run, args=(update_while_redis_stalls(cluster, "dash-degraded", 5.0),)
        )
        writer.start()
        page.wait_for_selector("tr[data-role=node][data-degraded=true]", timeout=6_000)
        assert "Redis writes failing" in (page.text_content("#members") or "")
        page.screenshot(path=str(SCREENS / "dashboard-degraded.png"))
        writer.join(15)
        page.wait_for_function(
            "document.querySelectorAll('tr[data-degraded=true]').length === 0", timeout=10_000
        )

        killed_at = time.monotonic()
        cluster.local.kill("n3")
        page.wait_for_selector('tr[data-member="n3"][data-state="faulty"]', timeout=3_000)
        assert time.monotonic() - killed_at < 3.0
        page.screenshot(path=str(SCREENS / "dashboard-n3-faulty.png"))

        pid = cluster.local.pid("n2")
        assert pid is not None
        page.click('button[data-drain="n2"]')
        page.wait_for_selector("#confirm[open]", timeout=2_000)  # the confirm step
        page.screenshot(path=str(SCREENS / "dashboard-confirm-drain.png"))
        page.click("#confirm-yes")
        page.wait_for_function(
            "['leaving', 'left'].includes(document.querySelector('tr[data-member=n2]')?.dataset.state)"
            " || document.querySelector('tr[data-member=n2]') === null",
            timeout=15_000,
        )
        wait_until(lambda: cluster.local.pid("n2") is None, 20, "n2 exits after its drain")
        page.wait_for_selector("#actions li", timeout=3_000)
        assert "drain n2" in (page.text_content("#actions") or "")
        page.screenshot(path=str(SCREENS / "dashboard-n2-drained.png"))
        assert member_state(page, "n1") == "alive"
    finally:
        page.close()
