"""The dashboard's live stream of a run, in a real browser (Playwright, Debian's Chromium, the
page's clock faked): after an error it reconnects no sooner than 1 s, then 2 s, doubling to
30 s; it does not ask a service that refuses the stream again and again."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.api.runhelpers import add_run, serving

CHROMIUM = os.environ.get("TASKKIT_CHROMIUM", "/usr/bin/chromium")

pytestmark = pytest.mark.timeout(180)


def test_a_refused_stream_is_asked_again_after_1_2_4_s_up_to_30_s(
    api: Any, pg_schema_url: str
) -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("TASKKIT_REQUIRE_SERVICES", "1") == "0":
            pytest.skip(f"Chromium is not at {CHROMIUM}")
        pytest.fail(f"Chromium is not at {CHROMIUM}: apt-get install -y chromium", pytrace=False)
    from playwright.sync_api import sync_playwright

    run_id, _ = add_run(pg_schema_url, name="live", status="queued")
    with serving(api) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            asked: list[str] = []
            page.on("request", lambda r: asked.append(r.url) if "/events" in r.url else None)
            page.route("**/runs/*/events", lambda route: route.fulfill(status=503, body="down"))
            page.clock.install(time=1_000_000)
            page.clock.pause_at(2_000_000)

            def refused(then: Any) -> None:
                """``then()`` makes the page ask for the stream; returns once the page has
                handled the refusal (its error refreshes the page)."""
                with (
                    page.expect_request(f"{base}/runs/{run_id}/events"),
                    page.expect_response(lambda r: r.request.resource_type == "fetch"),
                ):
                    then()
                page.wait_for_timeout(500)  # the old loop asked again at once, many times

            refused(lambda: page.goto(base + "/"))
            assert len(asked) == 1
            for delay in (1000, 2000, 4000, 8000, 16000, 30000, 30000):
                count = len(asked)
                page.clock.run_for(delay - 1)
                page.wait_for_timeout(300)
                assert len(asked) == count, f"asked again before {delay} ms"
                refused(lambda: page.clock.run_for(1))
                assert len(asked) == count + 1, f"not asked again after {delay} ms"
        finally:
            browser.close()
