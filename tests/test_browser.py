"""The search page in a real headless browser: Debian's chromium driven by Playwright for Python."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from conftest import SERVE_TOKEN

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def test_upload_shows_the_nearest_images_and_clusters_browse(request, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no {CHROMIUM}: `apt-get install chromium` (make test does it when run as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    url, _, out = request.getfixturevalue("service")
    table = pd.read_csv(os.path.join(out, "clusters.csv"))
    query = sorted(table["path"])[0]

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 900})
            context.add_cookies([{"name": "imgindex_token", "value": SERVE_TOKEN, "url": url}])
            page = context.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.goto(url)
            sync_api.expect(page.locator("#status")).to_contain_text(f"{len(table)} images")

            page.set_input_files("#file", query)
            page.wait_for_selector("#results[data-state=done], #results[data-state=error]", timeout=60_000)
            assert page.locator("#error").inner_text() == ""
            cards = page.locator("#results figure")
            assert cards.count() == min(12, len(table))
            assert cards.first.get_attribute("data-path") == query
            # 63-bit ids survive JavaScript (a plain JSON.parse would round them and every thumbnail would 404).
            assert cards.first.get_attribute("data-id") == str(table.set_index("path")["id"][query])
            assert "#1 · distance 0.0" in cards.first.inner_text()
            page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
            page.screenshot(path=str(tmp_path / "search.png"), full_page=True)
            assert (tmp_path / "search.png").stat().st_size > 10_000

            biggest = int(table["cluster"].value_counts().idxmax())
            page.get_by_role("button", name=f"cluster {biggest}:").click()
            members = page.locator("#cluster figure")
            sync_api.expect(members).to_have_count(int((table["cluster"] == biggest).sum()))
            assert members.first.get_attribute("data-path") == table[table["cluster"] == biggest]["path"].iloc[0]
            assert problems == []
        finally:
            browser.close()
