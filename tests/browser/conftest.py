"""Browser tests: the portal in the system's headless Chromium (Debian's chromium and
chromium-driver, installed by scripts/install-test-deps), driven by Selenium, in front of the
same real servers as the integration tests. One browser serves the whole test session.

Every test here carries the `browser` and `integration` markers (collection fails otherwise),
so `-m "not integration"` leaves them out with the other tests that open sockets.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.servers.fixtures import dovecot, postfix, test_ca  # noqa: F401
from tests.servers.slapd import slapd, slapd_factory  # noqa: F401

HERE = Path(__file__).parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# Where the tests save the README's screenshots (committed; each run overwrites them).
SCREENSHOTS = HERE.parents[1] / "docs" / "screenshots"
# iPhone 12 to 15's viewport, and a laptop's.
SIZES = {"phone": (390, 844, True), "desktop": (1280, 900, False)}


def pytest_collection_modifyitems(config, items):
    unmarked = [
        item.nodeid
        for item in items
        if item.path.is_relative_to(HERE)
        and not (item.get_closest_marker("browser") and item.get_closest_marker("integration"))
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests in tests/browser need both markers (add `pytestmark = [pytest.mark.integration,"
            " pytest.mark.browser]` to the module):\n  " + "\n  ".join(unmarked)
        )


@pytest.fixture(scope="session")
def browser() -> Iterator[webdriver.Chrome]:
    for program in (CHROMIUM, CHROMEDRIVER):
        if not Path(program).exists():
            raise RuntimeError(
                f"{program} is missing: run scripts/install-test-deps (Debian chromium and "
                "chromium-driver)"
            )
    profile = tempfile.mkdtemp(prefix="apppass-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # as root (CI containers)
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: webdriver.Chrome, name: str) -> list[Path]:
    """Save the page as docs/screenshots/NAME-phone.png and NAME-desktop.png (the viewport of
    each size), then return to the desktop size. The page is not reloaded (a code page would
    be refused: it is shown once)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    saved = []
    for size, (width, height, mobile) in SIZES.items():
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        )
        driver.execute_script("window.scrollTo(0, 0)")
        path = SCREENSHOTS / f"{name}-{size}.png"
        driver.save_screenshot(str(path))
        saved.append(path)
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return saved
