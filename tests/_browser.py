"""Open an HTML file in real headless Chromium (Debian's chromium + chromium-driver, through
selenium) and report what a reader's browser sees: console errors, images that did not
load, and screenshots."""

from __future__ import annotations

import base64
import shutil
import tempfile
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# root in a container: no sandbox; no network, no GPU, nothing that phones home
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1600", "--hide-scrollbars"]


def available() -> str | None:
    """None when the browser can run here, else why not."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} missing: apt-get install chromium chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium missing: pip install -e '.[dev]'"
    return None


def inspect_page(html_path: Path, screenshot_dir: Path, name: str) -> dict:
    """Load ``html_path``; returns {errors: [...console errors...], images: n, broken: [...alt
    texts...], height: px, shots: [paths]} and writes ``<name>-top.png`` (the first screen)
    and ``<name>-full.png`` (the whole page) under ``screenshot_dir``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="peftlab-chromium-")
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(120)
        driver.get(Path(html_path).resolve().as_uri())
        driver.execute_async_script(  # every <img> finished (loaded or failed)
            "const done = arguments[arguments.length - 1];"
            "Promise.all([...document.images].map(i => i.complete ? 0 : new Promise(r => {"
            "i.onload = r; i.onerror = r;}))).then(() => done(0));")
        images = driver.execute_script(
            "return [...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);")
        height = driver.execute_script("return document.documentElement.scrollHeight;")
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        screenshot_dir.mkdir(parents=True, exist_ok=True)
        top = screenshot_dir / f"{name}-top.png"
        driver.save_screenshot(str(top))
        full = screenshot_dir / f"{name}-full.png"
        width = driver.execute_script("return document.documentElement.scrollWidth;")
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 16000), "scale": 1}})
        full.write_bytes(base64.b64decode(shot["data"]))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return {"errors": errors, "images": len(images), "height": height, "shots": [top, full],
            "broken": [alt for alt, complete, w, h in images if not complete or w == 0 or h == 0]}
