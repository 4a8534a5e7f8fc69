"""difflab serve end to end in a real headless Chromium (selenium + the system's chromedriver):
generate a gallery, inpaint under a mask painted with mouse actions on the canvas, and see a
corrupt upload refused with a visible message.

The browser is Debian's ``chromium`` with ``chromium-driver`` (``bash scripts/setup.sh dev``
installs them where it can); the driver is given by path, so Selenium Manager never downloads
anything. The tests are skipped, saying why, only where no browser or driver is installed.

Screenshots for the docs: ``DIFFLAB_SCREENSHOTS=docs/images DIFFLAB_SCREENSHOT_RUN=runs/shapes
pytest tests/test_serve_browser.py -k screenshots`` (a text model: the prompts below).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_pipeline import CLASSES, UNET, write_run

pytest.importorskip("flask", reason="difflab serve needs the serve extra (Flask)")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                "(pip install -e '.[dev]')")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

from difflab.data import to_uint8  # noqa: E402
from difflab.serve import ServeLimits, create_app, load_models  # noqa: E402
from difflab.serve.app import LOOPBACK_HOSTS  # noqa: E402
from difflab.serve.images import read_image  # noqa: E402

BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DRIVERS = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage", "--window-size=1280,1000")


def find(paths: tuple[str, ...], name: str) -> str | None:
    return next((p for p in paths if os.access(p, os.X_OK)), None) or shutil.which(name)


def start_browser(profile: str):
    """Headless Chromium through the system chromedriver, or a skip saying what is missing."""
    browser, driver = find(BROWSERS, "chromium"), find(DRIVERS, "chromedriver")
    if browser is None or driver is None:
        pytest.skip("no Chromium/chromedriver installed (apt-get install chromium "
                    "chromium-driver, or bash scripts/setup.sh dev as root)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


class ServerThread:
    """The app on a free loopback port, served by werkzeug in a daemon thread."""

    def __init__(self, app):
        self.app = app
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return r.read()

    def stop(self) -> None:
        self.server.shutdown()
        self.app.extensions["difflab_jobs"].close(timeout=10)


def serve(runs: list[Path], **limits) -> ServerThread:
    app = create_app(load_models(runs), ServeLimits(**limits), trusted_hosts=LOOPBACK_HOSTS)
    return ServerThread(app)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """(driver, server, folder) over a random-weight class-conditional 8x8 model."""
    root = tmp_path_factory.mktemp("browser")
    write_run(root / "digits", "unet", {**UNET, "num_classes": 3}, class_names=CLASSES)
    server = serve([root / "digits"])
    with tempfile.TemporaryDirectory() as profile:
        try:
            driver = start_browser(profile)
        except BaseException:
            server.stop()
            raise
        try:
            yield driver, server, root
        finally:
            driver.quit()
            server.stop()


def until(driver, condition, timeout: float = 20.0, what: str = ""):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        message = driver.find_element(By.ID, "message").text
        raise AssertionError(f"timed out waiting for {what}; page message: {message!r}") from None


def load(driver, server: ServerThread) -> None:
    driver.get(server.url + "/")
    until(driver, lambda d: d.execute_script("return document.body.dataset.ready"), what="page")


def set_value(driver, element_id: str, value: str) -> None:
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(value)


def choose_mode(driver, mode: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f"input[name=mode][value={mode}]").click()


def jobs(driver, mode: str) -> list:
    return driver.find_elements(By.CSS_SELECTOR, f".job[data-mode={mode}]")


def images_loaded(driver, job) -> bool:
    imgs = job.find_elements(By.TAG_NAME, "img")
    return bool(imgs) and all(driver.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0", i) for i in imgs)


def run_and_wait(driver, mode: str, timeout: float = 30.0):
    before = len(jobs(driver, mode))
    driver.find_element(By.ID, "run").click()
    until(driver, lambda d: len(jobs(d, mode)) > before, timeout, f"a {mode} result")
    job = jobs(driver, mode)[0]
    until(driver, lambda d: images_loaded(d, job), timeout, "the images to load")
    return job


def paint(driver, x0: int, y0: int, x1: int, y1: int) -> None:
    """A mouse stroke on the mask canvas between two points (canvas pixels, origin top
    left; the canvas is 256 CSS px square)."""
    canvas = driver.find_element(By.ID, "mask")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    ActionChains(driver, duration=10).move_to_element_with_offset(canvas, x0 - 128, y0 - 128) \
        .click_and_hold().move_by_offset((x1 - x0) // 2, (y1 - y0) // 2) \
        .move_by_offset((x1 - x0) - (x1 - x0) // 2, (y1 - y0) - (y1 - y0) // 2) \
        .release().perform()


def painted_columns(driver) -> list[int]:
    """Canvas columns holding any painted pixel."""
    return driver.execute_script("""
        const c = document.getElementById('mask');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const cols = new Set();
        for (let i = 3; i < d.length; i += 4) if (d[i] > 127) cols.add(((i - 3) / 4) % c.width);
        return Array.from(cols).sort((a, b) => a - b);""")


def digit_file(folder: Path) -> Path:
    a = np.zeros((40, 40), np.uint8)
    a[10:30, 15:25] = 230
    path = folder / "input.png"
    Image.fromarray(a).save(path)
    return path


def test_generate_shows_a_gallery_with_downloads(page):
    driver, server, _ = page
    load(driver, server)
    set_value(driver, "count", "3")
    set_value(driver, "steps", "5")
    set_value(driver, "seed", "11")
    job = run_and_wait(driver, "generate")
    assert len(job.find_elements(By.TAG_NAME, "img")) == 3
    links = [a.get_attribute("href") for a in job.find_elements(By.CSS_SELECTOR, "a[download]")]
    assert len(links) == 4 and links[0].endswith("settings.json")
    settings = json.loads(server.get(links[0].removeprefix(server.url)))
    assert settings["seeds"] == [11, 12, 13] and settings["steps"] == 5
    png = Image.open(io.BytesIO(server.get(links[1].removeprefix(server.url))))
    assert png.size == (8, 8)
    assert driver.find_element(By.ID, "progress").get_attribute("value") == "1"
    assert not driver.find_element(By.ID, "message").is_displayed()


def test_inpaint_with_a_mask_painted_by_mouse(page):
    driver, server, root = page
    load(driver, server)
    choose_mode(driver, "inpaint")
    driver.find_element(By.ID, "image").send_keys(str(digit_file(root)))
    until(driver, lambda d: d.find_element(By.ID, "canvas-wrap").is_displayed()
          and d.execute_script("return document.getElementById('input-image').naturalWidth"),
          what="the input preview")
    paint(driver, 200, 10, 200, 246)  # a vertical stroke, brush 24 px: columns ~188..212
    cols = painted_columns(driver)
    assert cols and 180 <= min(cols) and max(cols) <= 220
    set_value(driver, "steps", "5")
    job = run_and_wait(driver, "inpaint")
    settings = json.loads(server.get(f"/api/jobs/{job.get_attribute('data-id')}/settings.json"))
    assert 0 < settings["mask_pixels"] < 64 and settings["mode"] == "inpaint"
    out = np.asarray(Image.open(io.BytesIO(server.get(
        job.find_element(By.TAG_NAME, "img").get_attribute("src").removeprefix(server.url)))))
    x = read_image(digit_file(root).read_bytes(), 1, 8, ServeLimits())
    kept = to_uint8(x)[0, :, :5].numpy()
    assert np.array_equal(out[:, :5], kept)  # columns 0..4 (canvas 0..159) were not painted


def test_a_corrupt_upload_and_a_bad_field_get_a_visible_message(page):
    driver, server, root = page
    load(driver, server)
    choose_mode(driver, "sdedit")
    bad = root / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    driver.find_element(By.ID, "image").send_keys(str(bad))
    box = driver.find_element(By.ID, "message")
    until(driver, lambda d: box.is_displayed(), what="the error message")
    assert box.text.startswith("Upload refused: the image upload") and "read" in box.text
    assert not driver.find_element(By.ID, "canvas-wrap").is_displayed()
    driver.find_element(By.ID, "run").click()
    until(driver, lambda d: "Choose an input image" in box.text, what="the refusal")
    assert not jobs(driver, "sdedit")
    choose_mode(driver, "generate")  # a field the server refuses: its 400 shown in the page
    set_value(driver, "steps", "99999")
    driver.find_element(By.ID, "run").click()
    until(driver, lambda d: "steps must be between 1 and 500" in box.text, what="the 400")
    assert not jobs(driver, "generate") and driver.find_element(By.ID, "run").is_enabled()


SHOTS = os.environ.get("DIFFLAB_SCREENSHOTS")
SHOT_RUN = os.environ.get("DIFFLAB_SCREENSHOT_RUN")


@pytest.mark.skipif(not (SHOTS and SHOT_RUN), reason="screenshots only when "
                    "DIFFLAB_SCREENSHOTS=DIR and DIFFLAB_SCREENSHOT_RUN=RUN (a text model) "
                    "are set")
def test_screenshots(tmp_path):
    """docs/images/serve_generate.png and serve_inpaint.png from a trained text model."""
    out = Path(SHOTS)
    out.mkdir(parents=True, exist_ok=True)
    server = serve([Path(SHOT_RUN)])
    driver = start_browser(str(tmp_path / "profile"))
    try:
        load(driver, server)
        set_value(driver, "prompt", "a large red circle at the top left")
        set_value(driver, "guidance", "3")
        set_value(driver, "count", "8")
        set_value(driver, "steps", "30")
        set_value(driver, "negative_prompt", "a blue square")
        set_value(driver, "seed", "1")
        run_and_wait(driver, "generate", 300)
        time.sleep(0.3)
        driver.save_screenshot(str(out / "serve_generate.png"))
        first = driver.find_elements(By.CSS_SELECTOR, ".job img")[3].get_attribute("src")
        src = tmp_path / "first.png"
        src.write_bytes(server.get(first.removeprefix(server.url)))
        choose_mode(driver, "inpaint")
        set_value(driver, "prompt", "a large green square at the top left")
        set_value(driver, "negative_prompt", "")
        set_value(driver, "count", "4")
        driver.find_element(By.ID, "image").send_keys(str(src))
        until(driver, lambda d: d.find_element(By.ID, "canvas-wrap").is_displayed(),
              what="the preview")
        for y in range(20, 130, 20):
            paint(driver, 10, y, 130, y)
        run_and_wait(driver, "inpaint", 300)
        time.sleep(0.3)
        driver.save_screenshot(str(out / "serve_inpaint.png"))
    finally:
        driver.quit()
        server.stop()
