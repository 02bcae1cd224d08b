"""The dashboard in a real browser (Debian's Chromium, headless) against the api and the
real pipeline: sign in with a token, upload a list through the file input, watch the batch
over server-sent events while pausing and resuming it, reach 100%, export XLSX. Screenshots
of the batch page at laptop and phone widths land in test-artifacts/."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import openpyxl
import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

from imagestream.devtools import corpus
from imagestream.devtools.imageserver import ImageServer, Reply

from .apiharness import Api, running_api, upload
from .helpers import wait_for
from .webhook_receiver import Receiver

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
ARTIFACTS = Path(__file__).parents[1] / "test-artifacts"
SAMPLES = corpus.mixed(8, sizes=((64, 48), (160, 120)), formats=("JPEG", "PNG"), seed=21)
COPIES = 40  # slow images, two at a time: long enough to pause and resume


@pytest.fixture(scope="module")
async def images() -> AsyncIterator[ImageServer]:
    routes = {f"slow/{s.name}": Reply(s.data, drip_s=0.03) for s in SAMPLES}
    server = ImageServer(routes)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def api(redis_url: str, database_url: str, pool: asyncpg.Pool) -> AsyncIterator[Api]:
    async with running_api(
        redis_url,
        database_url,
        pool,
        stages=True,
        FETCH_PER_HOST="2",
        WEBHOOK_ALLOWED_CIDRS="127.0.0.0/8",
        WEBHOOK_POLL_S="0.1",
    ) as api:
        yield api


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing: apt-get install chromium (scripts/test does)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield browser
        await browser.close()


async def signed_in(browser: Browser, api: Api, width: int = 1280) -> tuple[Page, list[str]]:
    page = await browser.new_page(viewport={"width": width, "height": 900}, accept_downloads=True)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    def console(message: ConsoleMessage) -> None:
        # A 401 before signing in is expected; any other error is a problem.
        if message.type == "error" and "401" not in message.text:
            problems.append(f"console: {message.text}")

    page.on("console", console)
    await page.goto(api.base + "/")
    await page.wait_for_selector("#login:not([hidden])")
    await page.fill("#token", api.admin)
    await page.click("#login-form button[type=submit]")
    await page.wait_for_selector("#who:not([hidden])")
    assert await page.text_content("#who-role") == "admin"
    return page, problems


async def test_upload_watch_pause_resume_export(
    browser: Browser, api: Api, images: ImageServer, tmp_path: Path
) -> None:
    page, problems = await signed_in(browser, api)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    listing = tmp_path / "catalogue.csv"
    rows = [f"{images.url(f'slow/{SAMPLES[i % 8].name}')}?n={i},SKU-{i}" for i in range(COPIES)]
    listing.write_text("url,sku\n" + "\n".join(rows) + "\nnot a url,SKU-X\n")

    await page.set_input_files("#file-input", str(listing))
    assert await page.input_value("#batch-name") == "catalogue"
    await page.fill("#batch-name", "Catalogue photos")
    await page.click("#start-batch")
    await page.wait_for_url(re.compile(r".*#/batches/[0-9a-f-]{36}$"))
    batch_id = page.url.rsplit("/", 1)[1]
    await page.wait_for_selector(".live.on")  # the event stream is connected

    # Pause while it runs: the page learns the new state from the stream.
    await page.wait_for_function("document.getElementById('t-succeeded').textContent !== '—'")
    await page.click("button:has-text('Pause')")
    await page.wait_for_selector(".badge.paused")
    await page.wait_for_selector("button:has-text('Resume'):visible")
    paused_at = await page.text_content("#pct")
    assert paused_at != "100%"
    async with api.session(api.viewer) as http, http.get(f"/api/v1/batches/{batch_id}") as r:
        assert (await r.json())["state"] == "paused"
    await page.click("button:has-text('Resume')")

    # Progress climbs to 100% on the page, fed by the event stream alone.
    seen: list[str] = []

    async def complete() -> bool:
        text = await page.text_content("#pct") or ""
        if not seen or seen[-1] != text:
            seen.append(text)
        return text == "100%" and await page.is_visible(".badge.completed")

    await wait_for(complete, timeout=120, interval=0.1)
    await page.wait_for_selector(".live:has-text('finished')")
    assert len(seen) >= 2 and seen[-1] == "100%"
    assert any(url.endswith(f"/api/v1/batches/{batch_id}/events") for url in requests)
    assert not any(url.endswith("/status") for url in requests)  # no polling
    assert await page.text_content("#t-succeeded") == str(COPIES)
    assert await page.text_content("#t-invalid") == "1"
    assert await page.is_visible("text=Invalid input rows (1)")

    await page.set_viewport_size({"width": 1280, "height": 900})
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / "dashboard-batch-1280.png", full_page=True)

    # Export to Excel through the menu: a one-time link, streamed to a file.
    await page.click("#export-menu")
    async with page.expect_download() as download_info:
        await page.click("button[data-format=xlsx]")
    download = await download_info.value
    target = tmp_path / download.suggested_filename
    await download.save_as(target)
    assert target.suffix == ".xlsx"
    sheet = openpyxl.load_workbook(io.BytesIO(target.read_bytes()))["results"]
    assert sheet.max_row == COPIES + 1
    assert {row[1] for row in sheet.iter_rows(min_row=2, values_only=True)} == {"succeeded"}

    await page.set_viewport_size({"width": 390, "height": 844})
    await page.evaluate("document.getElementById('toasts').replaceChildren()")
    await asyncio.sleep(0.3)
    # Nothing sticks out sideways at phone width.
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    await page.screenshot(path=ARTIFACTS / "dashboard-batch-390.png", full_page=True)
    assert not problems, problems
    await page.close()


async def test_the_upload_form_offers_the_local_profiles(
    browser: Browser, api: Api, images: ImageServer, tmp_path: Path
) -> None:
    page, problems = await signed_in(browser, api)
    offered = "els => els.map(e => e.value)"
    assert await page.eval_on_selector_all("#profiles option", offered) == ["facts", "content"]
    listing = tmp_path / "content.csv"
    listing.write_text(f"url\n{images.url(SAMPLES[1].name)}\n")
    await page.set_input_files("#file-input", str(listing))
    await page.fill("#profile", "content")
    await page.click("#start-batch")
    await page.wait_for_url(re.compile(r".*#/batches/[0-9a-f-]{36}$"))  # the new batch's page
    batch_id = page.url.rsplit("/", 1)[1]
    async with api.session(api.admin) as http, http.get(f"/api/v1/batches/{batch_id}") as r:
        batch = await r.json()
    assert (batch["analyzer"], batch["profile"]) == ("local", "content"), batch
    assert problems == []
    await page.close()


async def test_a_batch_with_a_webhook_shows_its_secret_once(
    browser: Browser, api: Api, images: ImageServer, tmp_path: Path
) -> None:
    page, problems = await signed_in(browser, api)
    listing = tmp_path / "hooked.csv"
    listing.write_text(f"url\n{images.url(f'slow/{SAMPLES[0].name}')}\n")
    receiver = Receiver("whsec_" + "A" * 32)  # its secret is known once the batch exists
    await receiver.up()
    try:
        await page.set_input_files("#file-input", str(listing))
        await page.fill("#webhook-url", receiver.url)
        await page.click("#start-batch")
        await page.wait_for_selector("#webhook-secret")
        receiver.secret = await page.text_content("#webhook-secret") or ""
        assert receiver.secret.startswith("whsec_")

        async def arrived() -> bool:
            return bool(receiver.accepted)

        await wait_for(arrived, timeout=60)
    finally:
        await receiver.down()
    # Verified with the secret the page showed (a request before it was read would be
    # refused and retried).
    assert receiver.accepted[0].body["type"] == "batch.completed"
    await page.click("a:has-text('Open the batch')")
    await page.wait_for_url(re.compile(r".*#/batches/[0-9a-f-]{36}$"))
    # The delivery log, with a Redeliver button for an admin: the receiver gets it again.
    await page.wait_for_selector("#webhooks td:has-text('batch.completed')")
    await page.wait_for_selector("#webhooks .badge:has-text('delivered')")
    await receiver.up()
    try:
        await page.click("#webhooks button:has-text('Redeliver')")

        async def again() -> bool:
            return len(receiver.accepted) == 2

        await wait_for(again, timeout=30)
    finally:
        await receiver.down()
    assert receiver.accepted[0].webhook_id == receiver.accepted[1].webhook_id
    assert problems == []
    await page.close()


async def test_list_system_and_admin_pages(browser: Browser, api: Api) -> None:
    page, problems = await signed_in(browser, api)
    await page.wait_for_selector("text=All batches")
    await page.wait_for_selector("tbody tr[data-id]")
    await page.screenshot(path=ARTIFACTS / "dashboard-batches-1280.png", full_page=True)
    await page.click("[data-nav=system]")
    await page.wait_for_selector("text=Services alive")
    await page.wait_for_function("document.querySelectorAll('.badge.ok').length >= 2")
    await page.screenshot(path=ARTIFACTS / "dashboard-system-1280.png", full_page=True)
    await page.click("[data-nav=admin]")
    await page.fill("#token-name", "reporting")
    await page.click("button:has-text('Create token')")
    secret = await page.text_content("#new-token", timeout=10_000)
    assert secret and secret.startswith("ist_")
    await page.screenshot(path=ARTIFACTS / "dashboard-admin-1280.png", full_page=True)
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.click("[data-nav=batches]")
    await page.wait_for_selector("tbody tr[data-id]")
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    await page.screenshot(path=ARTIFACTS / "dashboard-batches-390.png", full_page=True)
    assert not problems, problems
    await page.close()


async def test_a_viewer_sees_no_controls(browser: Browser, api: Api) -> None:
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.goto(api.base + "/")
    await page.fill("#token", api.viewer)
    await page.click("#login-form button[type=submit]")
    await page.wait_for_selector("#who:not([hidden])")
    assert await page.text_content("#who-role") == "viewer"
    await page.wait_for_selector("text=viewer token")
    assert await page.query_selector("#file-input") is None
    await page.click("#logout")  # then a wrong token is refused with a message
    await page.fill("#token", "ist_not-a-real-token")
    await page.click("#login-form button[type=submit]")
    await page.wait_for_selector("#login-error:has-text('invalid or revoked token')")
    await page.close()


async def test_the_batch_page_lists_near_duplicate_groups(
    browser: Browser, api: Api, images: ImageServer
) -> None:
    # Three images, each at two addresses: three groups of two exact copies.
    urls = [images.url(f"slow/{SAMPLES[i % 3].name}") + f"?copy={i}" for i in range(6)]
    status, created = await upload(api, ("url\n" + "\n".join(urls) + "\n").encode())
    assert status == 201, created
    batch_id = created["id"]

    async def done() -> bool:
        async with api.session(api.viewer) as http, http.get(f"/api/v1/batches/{batch_id}") as r:
            return (await r.json())["state"] == "completed"

    await wait_for(done, timeout=60, interval=0.2)
    page, problems = await signed_in(browser, api)
    await page.goto(f"{api.base}/#/batches/{batch_id}")
    panel = await page.wait_for_selector("#duplicates-panel:not([hidden])")
    assert panel is not None
    assert "3 groups, 6 images" in (await panel.text_content() or "")
    rows = await page.query_selector_all("#duplicates-panel tbody tr")
    firsts = [await row.eval_on_selector("td a", "a => a.href") for row in rows]
    assert firsts == urls[:3]  # each group's first image, in input order
    sizes = [await row.eval_on_selector("td.num", "td => td.textContent") for row in rows]
    assert sizes == ["2", "2", "2"]
    await page.screenshot(path=ARTIFACTS / "dashboard-duplicates-1280.png", full_page=True)
    assert not problems, problems
    await page.close()
