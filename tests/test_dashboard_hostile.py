"""The dashboard in headless Chromium with hostile ids: they are shown as text, no script runs.

Ids come from producers and may hold any characters. A run whose SKUs and stores are
HTML and script fragments is served by the real API; Chromium loads the dashboard
with a hostile SKU and store selected, so the ids reach every place the page shows
them (selectors, sentiment, alerts table). The dumped DOM must hold them as text
only: no element they could create, no marker their payloads would set. The page's
Content-Security-Policy is checked too (it blocks inline script even if a future
change inserted HTML again).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from lambdalake.settings import Settings
from serving.app import create_app, running_server
from tests.serving_lake import write_small_run
from tests.test_dashboard import CHROMIUM, _chromium

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it as root)"
)

# Each payload, if it ever ran, would leave data-pwned on <body> (and a new element).
HOSTILE_SKUS = [
    """<img src=x onerror="document.body.dataset.pwned='img'">""",
    """"><script>document.body.dataset.pwned='script'</script>""",
    """</script><svg onload="document.body.dataset.pwned='svg'"></svg>""",
    """'; document.body.dataset.pwned='quote'; //""",
]
HOSTILE_STORE = """<b onmouseover="document.body.dataset.pwned='store'">S&amp;1</b>"""
PLAIN_SKU = "SKU-00001"


class DomSummary(HTMLParser):
    """Element names and the text of <option> and <td> elements of a dumped DOM."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.texts: dict[str, list[str]] = {"option": [], "td": []}
        self._open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))
        if tag in self.texts:
            self._open.append(tag)
            self.texts[tag].append("")

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1] == tag:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._open:
            self.texts[self._open[-1]][-1] += data


def test_hostile_ids_are_rendered_as_text_and_no_script_runs(tmp_path: Path) -> None:
    root = tmp_path / "lake"
    today = datetime.now(UTC).date()
    skus = [*HOSTILE_SKUS, PLAIN_SKU]
    write_small_run(root, skus=skus, stores=[HOSTILE_STORE, "S1"], today=today)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, lake_uri=str(root), home=tmp_path / "home", partitions=4
    )
    with running_server(create_app(settings)) as base:
        page = httpx.get(f"{base}/dashboard")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "default-src 'none'" in csp
        assert "<script>" not in page.text  # no inline script to allow
        listing = httpx.get(f"{base}/dashboard/api/skus").json()
        assert set(listing["skus"]) == set(skus)

        for sku in HOSTILE_SKUS:
            url = f"{base}/dashboard?" + urlencode({"sku": sku, "store": HOSTILE_STORE})
            dom = _chromium(["--dump-dom", url], tmp_path / f"chrome-{HOSTILE_SKUS.index(sku)}")
            assert dom.returncode == 0, dom.stderr[-2000:]
            html = dom.stdout
            match = re.search(r'data-rendered="([^"]*)"', html)
            assert match, f"the page never finished a refresh:\n{html[:3000]}"
            rendered = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
            assert "error" not in rendered, rendered.get("error")
            assert rendered["forecast"] >= 28 and rendered["sales"] >= 20, rendered
            assert "data-pwned" not in html, "a hostile id ran as script"

            parsed = DomSummary()
            parsed.feed(html)
            tags = [t for t, _ in parsed.elements]
            assert "img" not in tags and "svg" not in tags, "a hostile id became an element"
            assert not [a for t, a in parsed.elements if t == "b" and "onmouseover" in a]
            scripts = [a.get("src") for t, a in parsed.elements if t == "script"]
            assert scripts == [
                "/dashboard/static/chart.umd.min.js",
                "/dashboard/static/dashboard.js",
            ]
            # Every id is shown exactly as sent: in the selectors and in the alerts table.
            assert set(skus) <= set(parsed.texts["option"])
            assert HOSTILE_STORE in parsed.texts["option"]
            assert sku in parsed.texts["td"] and HOSTILE_STORE in parsed.texts["td"]


def test_the_api_key_never_travels_in_the_page_url(tmp_path: Path) -> None:
    root = tmp_path / "lake"
    write_small_run(root, skus=[PLAIN_SKU], stores=["S1"], today=datetime.now(UTC).date())
    key = "dashboard-test-key-0123456789"
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, lake_uri=str(root), home=tmp_path / "home", partitions=4, api_keys=key
    )
    with running_server(create_app(settings)) as base:
        assert httpx.get(f"{base}/dashboard", params={"key": key}).status_code == 400
        # Without a key the page loads (it holds no data) and asks for one; no data is shown.
        dom = _chromium(["--dump-dom", f"{base}/dashboard"], tmp_path / "chrome-key")
        assert dom.returncode == 0, dom.stderr[-2000:]
        parsed = DomSummary()
        parsed.feed(dom.stdout)
        form = [a for t, a in parsed.elements if t == "form" and a.get("id") == "key-form"]
        assert form and "hidden" not in form[0], "the key form should be shown"
        assert PLAIN_SKU not in dom.stdout
        assert "this server needs an API key" in dom.stdout
