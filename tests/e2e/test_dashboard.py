"""The web dashboard (/ui) in a real browser: Debian's headless Chromium driven by
Playwright, against a real dispatcher and worker. Screenshots of each page are written to
test-output/dashboard/ (or $OCTASKLY_TEST_OUTPUT/dashboard/).

Nothing is mocked; the only stand-in is the confirm() dialog of the cancel button, which
the test accepts as a user would."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.e2e import procs
from tests.e2e.procs import SECRET, TOKENS, free_port, http, start, wait_for, wait_healthy

CHROMIUM = "/usr/lib/chromium/chromium"  # Debian's package; `make system-deps` installs it
OUTPUT = Path(os.environ.get("OCTASKLY_TEST_OUTPUT", Path(__file__).parents[2] / "test-output"))
SHOTS = OUTPUT / "dashboard"
TIMEOUT_MS = 20_000


@dataclasses.dataclass
class Cluster:
    api: str
    restart: Callable[[], None]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A dispatcher (authentication on, as by default) and one worker with 3 slots."""
    port, api_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    data = tmp_path / "data"
    env = procs.clean_env(OCTASKLY_SECRET_KEY=SECRET)
    dispatcher = ["dispatcher", "--port", str(port), "--api-port", str(api_port),
                  "--bind", "127.0.0.1", "--data-dir", str(data)]  # fmt: skip
    with procs.processes() as ps:
        ps.append(start(dispatcher, cwd=tmp_path, env=env))
        wait_healthy(api, ps[0], data_dir=data)
        ps.append(
            start(
                ["worker", "--name", "ui-worker", "--dispatcher-addr", f"127.0.0.1:{port}",
                 "--transport", "tcp", "--max-jobs", "3"],
                cwd=tmp_path, env=env,
            )
        )  # fmt: skip
        workers = lambda: http("GET", f"{api}/api/v1/workers")[1]["total"] == 1  # noqa: E731
        wait_for(workers, what="the worker")

        def restart() -> None:
            assert procs.stop(ps[0]) == 0
            ps[0] = start(dispatcher, cwd=tmp_path, env=env)
            wait_healthy(api, ps[0], data_dir=data)
            wait_for(workers, what="the worker back")

        yield Cluster(api, restart)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert os.access(CHROMIUM, os.X_OK), f"no {CHROMIUM}: run `make system-deps` (as root)"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield browser
        finally:
            await browser.close()


async def new_page(browser: Browser) -> tuple[Page, list[str]]:
    """A page whose console errors and failed requests are collected (a CSP violation or a
    script error shows up there)."""
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    # Chromium logs every 4xx answer as a console error; the 400s and 401s the tests cause
    # on purpose are handled by the page and expected
    expected = re.compile(r"Failed to load resource: .* status of 40[01] ")
    page.on(
        "console",
        lambda msg: (
            problems.append(f"console {msg.type}: {msg.text}")
            if msg.type == "error" and not expected.search(msg.text)
            else None
        ),
    )
    page.on("dialog", lambda dialog: dialog.accept())
    return page, problems


async def shot(page: Page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 5_000
    print(f"screenshot: {path}")
    return path


def api_json(method: str, url: str, body: Any = None, token: str | None = None) -> Any:
    status, data = http(method, url, body, token)
    assert status in (200, 201), (status, data)
    return data


def rows(first: int, last: int, total: int) -> str:
    """The pager's text: first, en dash, last, " of ", total."""
    return f"{first}\u2013{last} of {total}"


async def log_in(page: Page, api: str, token: str) -> None:
    await page.goto(f"{api}/ui")
    assert page.url == f"{api}/ui/"  # /ui redirects to the page
    await page.fill("#token", token)
    await page.click("#login-button")
    await expect(page.locator("#app")).to_be_visible()


async def test_an_admin_logs_in_submits_watches_it_finish_live_and_cancels_another(
    cluster: Cluster, browser: Browser
) -> None:
    api = cluster.api
    admin = TOKENS[api]
    page, problems = await new_page(browser)

    # -- login: a wrong token is refused with a message, the right one gets in --
    await page.goto(f"{api}/ui")
    await expect(page.locator("#login-form")).to_be_visible()
    await shot(page, "login")
    await page.fill("#token", "not-a-token")
    await page.click("#login-button")
    await expect(page.locator("#login-error")).to_contain_text("refused")
    await expect(page.locator("#app")).to_be_hidden()
    await page.fill("#token", admin)
    await page.click("#login-button")
    await expect(page.locator("#whoami")).to_have_text(re.compile(r"\(admin\)"))
    # a marker that a full page load would wipe: everything below happens without one
    await page.evaluate("window.__sameDocument = 'yes'")

    # -- overview: the worker with its load bar, live indicator, queue by priority --
    await expect(page.locator("#live")).to_have_text("live")
    worker_row = page.locator("#workers tbody tr", has_text="ui-worker")
    await expect(worker_row).to_be_visible()
    await expect(worker_row.locator(".load")).to_have_text("0/3")
    await expect(page.locator("#queue .bar-row")).to_have_count(4)

    # -- submit from the form; the task page follows its output and its end, live --
    await page.click("nav >> text=Submit")
    await page.fill("#sub-command", "echo hello-from-the-ui; sleep 2; echo to-stderr >&2")
    await page.select_option("#sub-priority", "high")
    await page.click("#submit-button")
    await expect(page).to_have_url(re.compile(r"#/task/[0-9a-f-]{36}$"))
    task_id = page.url.rsplit("/", 1)[1]
    status = page.locator("#task-status")
    await expect(status).to_have_attribute("data-status", "running")
    await expect(page.locator("#task-log")).to_contain_text("hello-from-the-ui")
    await expect(status).to_have_attribute("data-status", "completed")
    await expect(page.locator("#log-state")).to_have_text("ended: completed, exit 0")
    await expect(page.locator("#task-log .stderr")).to_have_text("to-stderr\n")
    await expect(page.locator("#task-cancel")).to_be_hidden()
    await expect(page.locator('#task-fields dd[data-field="priority"]')).to_have_text("high")
    await shot(page, "task-detail")
    record = api_json("GET", f"{api}/api/v1/tasks/{task_id}")
    assert (record["status"], record["stdout"], record["priority"]) == (
        "completed",
        "hello-from-the-ui\n",
        "high",
    )

    # -- bad input in the form: the browser's own check, the page's, and the API's field
    # error are shown, and nothing is submitted --
    before = api_json("GET", f"{api}/api/v1/stats")["database"]["total_tasks"]
    await page.click("nav >> text=Submit")
    await page.fill("#sub-command", "echo never")
    await page.fill("#sub-timeout", "0")
    await page.click("#submit-button")
    assert await page.eval_on_selector("#sub-timeout", "e => e.validity.rangeUnderflow")
    await page.fill("#sub-timeout", "")
    await page.fill("#sub-env", "no equals sign")
    await page.click("#submit-button")
    await expect(page.locator("#submit-error")).to_have_text(
        "environment line 1: expected NAME=value"
    )
    await page.fill("#sub-env", "1BAD=x")
    await page.click("#submit-button")
    await expect(page.locator("#submit-error")).to_contain_text(
        "environment variable name '1BAD' is not valid"
    )
    await expect(page).to_have_url(re.compile(r"#/submit$"))
    await shot(page, "submit")
    assert api_json("GET", f"{api}/api/v1/stats")["database"]["total_tasks"] == before

    # -- task table: paging, a status filter, cancel of a running task from its row --
    long = api_json("POST", f"{api}/api/v1/tasks", {"command": "sleep 300"})["id"]
    # while it runs, the overview shows it: one of the worker's three slots busy
    await page.click("nav >> text=Overview")
    await expect(worker_row.locator(".load")).to_have_text("1/3")
    await expect(worker_row.locator("td").nth(1)).to_have_text("busy")
    await expect(page.locator("#count-running")).to_have_text("1")
    api_json("POST", f"{api}/api/v1/tasks/batch", {"tasks": [{"command": "true"}] * 30})
    await page.click("nav >> text=Tasks")
    await expect(page.locator("#page-info")).to_have_text(rows(1, 25, 32))
    await expect(page.locator("#task-table tbody tr")).to_have_count(25)
    await page.click("#next")
    await expect(page.locator("#page-info")).to_have_text(rows(26, 32, 32))
    await expect(page.locator("#task-table tbody tr")).to_have_count(7)
    await expect(page.locator("#next")).to_be_disabled()
    await page.select_option("#filter-status", "running")
    await expect(page).to_have_url(re.compile(r"#/tasks\?status=running$"))
    row = page.locator(f'#task-table tbody tr[data-id="{long}"]')
    await expect(row).to_have_attribute("data-status", "running")
    await expect(page.locator("#task-table tbody tr")).to_have_count(1)
    await shot(page, "tasks")
    await row.locator("button.cancel").click()
    # it leaves the "running" filter live, and the dispatcher has it cancelled
    await expect(row).to_have_count(0)
    await expect(page.locator("#no-tasks")).to_be_visible()
    assert api_json("GET", f"{api}/api/v1/tasks/{long}")["status"] == "cancelled"
    await page.select_option("#filter-status", "cancelled")
    await expect(row).to_have_attribute("data-status", "cancelled")
    await expect(row.locator("button.cancel")).to_have_count(0)
    # the worker filter (a worker id): all ran on ui-worker, none on another
    await page.select_option("#filter-status", "")
    await page.fill("#filter-worker", "ui-worker")
    await page.click("#filters button[type=submit]")
    await expect(page.locator("#page-info")).to_have_text(rows(1, 25, 32))
    await page.fill("#filter-worker", "no-such-worker")
    await page.click("#filters button[type=submit]")
    await expect(page.locator("#no-tasks")).to_be_visible()
    await expect(page.locator("#page-info")).to_have_text(rows(0, 0, 0))

    # -- overview again: counts and the throughput sparkline reflect what ran --
    await page.click("nav >> text=Overview")
    await expect(page.locator("#count-completed")).to_have_text("31")
    await expect(page.locator("#count-cancelled")).to_have_text("1")
    points = await page.get_attribute("#throughput-line", "points")
    assert points and len(points.split()) >= 2, points
    await expect(page.locator("#recent tbody tr")).to_have_count(10)
    await shot(page, "overview")

    assert await page.evaluate("window.__sameDocument") == "yes", "the page was reloaded"
    assert problems == []
    print(f"dashboard: task {task_id} seen running then completed live; 32 tasks paged 25+7;")
    print(f"  task {long} cancelled from its row; screenshots in {SHOTS}")


async def test_a_client_sees_only_its_own_tasks_as_text_and_a_revoked_token_logs_out(
    cluster: Cluster, browser: Browser
) -> None:
    api = cluster.api
    admin_task = api_json("POST", f"{api}/api/v1/tasks", {"command": "echo admin-only"})["id"]
    issued = api_json("POST", f"{api}/api/v1/tokens", {"role": "client", "subject": "carol"})
    page, problems = await new_page(browser)
    await log_in(page, api, issued["token"])
    await expect(page.locator("#whoami")).to_have_text("carol (client)")
    # no cluster panels for a client, a note instead
    await expect(page.locator("#cluster-panels")).to_be_hidden()
    await expect(page.locator("#client-note")).to_be_visible()

    # markup in a command is shown as text and never runs
    markup = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
    hostile = f"echo '{markup}' \"$GREETING\""
    await page.click("nav >> text=Submit")
    await page.fill("#sub-command", hostile)
    await page.fill("#sub-env", "GREETING=hi there\nEMPTY=")
    await page.click("#submit-button")
    await expect(page.locator("#task-status")).to_have_attribute("data-status", "completed")
    await expect(page.locator("#task-command")).to_have_text(hostile)
    await expect(page.locator("#task-log")).to_have_text(f"{markup} hi there\n")
    await page.click("nav >> text=Tasks")
    rows = page.locator("#task-table tbody tr")
    await expect(rows).to_have_count(1)  # carol's task, not the admin's
    await expect(rows.first.locator("td.cmd")).to_have_text(hostile)
    assert await page.locator(f'tr[data-id="{admin_task}"]').count() == 0
    assert await page.evaluate("window.__xss") is None
    assert await page.locator("#task-table img").count() == 0
    await shot(page, "client-tasks")

    # the token lives in this tab's sessionStorage only
    stored = await page.evaluate("sessionStorage.getItem('octaskly.token')")
    assert stored == issued["token"]
    assert await page.evaluate("localStorage.length") == 0

    # revoked while logged in: the next request sends the user back to the login form
    api_json("DELETE", f"{api}/api/v1/tokens/{issued['id']}")
    await page.click("nav >> text=Overview")
    await expect(page.locator("#login-form")).to_be_visible()
    await expect(page.locator("#login-error")).to_contain_text("revoked")
    assert await page.evaluate("sessionStorage.getItem('octaskly.token')") is None
    assert problems == []


async def test_the_dashboards_files_are_served_without_a_token_with_a_strict_policy(
    cluster: Cluster,
) -> None:
    api = cluster.api
    with urllib.request.urlopen(f"{api}/ui/", timeout=10) as resp:
        page = resp.read().decode()
        headers = resp.headers
    assert "<script" in page and "app.js" in page
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    # nothing from elsewhere: no CDN, no remote font
    for asset in ("", "app.js", "app.css"):
        with urllib.request.urlopen(f"{api}/ui/{asset}", timeout=10) as resp:
            text = resp.read().decode()
        assert not re.search(r"https?://", text), asset
    assert json.loads(urllib.request.urlopen(f"{api}/health", timeout=10).read())["status"]


async def test_the_page_reconnects_to_a_restarted_dispatcher_and_stays_live(
    cluster: Cluster, browser: Browser
) -> None:
    api = cluster.api
    page, problems = await new_page(browser)
    await log_in(page, api, TOKENS[api])
    await page.evaluate("window.__sameDocument = 'yes'")
    await page.click("nav >> text=Tasks")
    await expect(page.locator("#live")).to_have_text("live")
    await asyncio.to_thread(cluster.restart)  # SIGTERM, then the same command again
    # the stream broke and came back by itself; no new login (the token is still good)
    await expect(page.locator("#live")).to_have_text("live", timeout=30_000)
    task = api_json("POST", f"{api}/api/v1/tasks", {"command": "echo after-restart"})["id"]
    row = page.locator(f'#task-table tbody tr[data-id="{task}"]')
    await expect(row).to_have_attribute("data-status", "completed")
    await expect(page.locator("#app")).to_be_visible()
    assert await page.evaluate("window.__sameDocument") == "yes"
    # Chromium logs the reconnect attempts made while the dispatcher was down
    unexpected = [p for p in problems if "ERR_CONNECTION_REFUSED" not in p]
    assert unexpected == []
