"""The local web page: its logic without a browser, and the page itself in headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import time
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dedn.app import editor_support, segment
from dedn.errors import DataError
from dedn.predict import Predictor
from usage_helpers import make_checkpoint, save_rgb, scene

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def balanced_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "toy.pt", balanced=True)


@pytest.fixture(scope="module")
def predictor(balanced_ckpt):
    return Predictor.from_checkpoint(balanced_ckpt, device="cpu")


@pytest.fixture
def pictures(tmp_path):
    """Support + mask + two queries + one corrupt query, as files."""
    support, mask = scene(96, 128, (20, 30, 70, 90))
    files = {
        "support": save_rgb(tmp_path / "support.png", support),
        "mask": save_rgb(tmp_path / "support_mask.png", mask * 255),
        "query1": save_rgb(tmp_path / "query1.png", scene(80, 100, (10, 10, 50, 60), seed=1)[0]),
        "query2": save_rgb(tmp_path / "query2.jpg", scene(70, 70, (10, 10, 50, 60), seed=2)[0], quality=95),
        "broken": tmp_path / "broken.jpg",
    }
    files["broken"].write_bytes(b"\xff\xd8\xff not really a jpeg")
    return files


def test_editor_value_gives_image_and_painted_mask():
    image, _ = scene(20, 30)
    layer = np.zeros((20, 30, 4), np.uint8)
    layer[5:10, 5:12] = (255, 0, 0, 255)
    layer[12, 20] = (0, 0, 0, 40)  # a faint brush edge is still paint
    got_image, painted = editor_support({"background": image, "layers": [layer], "composite": image})
    assert got_image is image
    expected = np.zeros((20, 30), np.uint8)
    expected[5:10, 5:12] = 1
    expected[12, 20] = 1
    np.testing.assert_array_equal(painted, expected)
    # nothing painted -> no mask; no upload -> nothing
    assert editor_support({"background": image, "layers": [np.zeros((20, 30, 4), np.uint8)]})[1] is None
    assert editor_support({"background": None, "layers": []}) == (None, None)
    with pytest.raises(DataError, match="painted layer"):
        editor_support({"background": image, "layers": [np.zeros((10, 10, 4), np.uint8)]})


def test_segment_with_a_painted_mask_equals_the_api(predictor, pictures, tmp_path):
    support = np.asarray(Image.open(pictures["support"]))
    mask = np.asarray(Image.open(pictures["mask"])) > 0
    layer = np.zeros(support.shape[:2] + (4,), np.uint8)
    layer[mask] = (255, 0, 0, 255)
    editor = {
        "background": np.dstack([support, np.full(support.shape[:2], 255, np.uint8)]),
        "layers": [layer],
        "composite": support,
    }
    queries = [str(pictures["query1"]), str(pictures["broken"]), str(pictures["query2"])]
    result = segment(predictor, editor, None, queries, tmp_path / "out")
    assert [p.name for p in result.mask_files] == ["query1_mask.png", "query2_mask.png"]
    assert [name for name, _ in result.skipped] == ["broken.jpg"]
    assert "Segmented 2 images" in result.message and "broken.jpg" in result.message
    expected = predictor.predict(pictures["query1"], pictures["support"], pictures["mask"]).mask
    assert 0.05 < expected.mean() < 0.95  # a mask that depends on the picture, not all one value
    np.testing.assert_array_equal(np.asarray(Image.open(result.mask_files[0])), expected * 255)
    overlay, caption = result.overlays[0]
    assert overlay.shape == (80, 100, 3) and caption.startswith("query1.png")
    # an uploaded mask file takes precedence over the painting
    again = segment(predictor, editor, str(pictures["mask"]), queries[:1], tmp_path / "out2")
    np.testing.assert_array_equal(np.asarray(Image.open(again.mask_files[0])), expected * 255)


def test_segment_explains_what_is_missing(predictor, pictures, tmp_path):
    support = np.asarray(Image.open(pictures["support"]))
    with pytest.raises(DataError, match="upload a support image"):
        segment(predictor, {"background": None, "layers": []}, None, [str(pictures["query1"])], tmp_path)
    with pytest.raises(DataError, match="paint the object"):
        segment(predictor, {"background": support, "layers": []}, None, [str(pictures["query1"])], tmp_path)
    with pytest.raises(DataError, match="at least one query"):
        segment(predictor, support, str(pictures["mask"]), [], tmp_path)
    with pytest.raises(DataError, match="no object pixel"):
        empty = np.zeros(support.shape[:2], np.uint8)
        segment(predictor, support, empty, [str(pictures["query1"])], tmp_path)


# ---------------------------------------------------------------------------------------- in a browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chrome(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,1500",
        # the page must work offline: any name other than the local server fails to resolve
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.mark.slow
def test_web_page_in_a_headless_browser(balanced_ckpt, predictor, pictures, tmp_path, monkeypatch):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian packages chromium, chromium-driver)")
    pytest.importorskip("gradio", reason="needs gradio (pip install 'dedn[app]')")
    pytest.importorskip("selenium", reason="needs selenium (pip install selenium)")
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from dedn.app import launch_app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    start = time.monotonic()
    port = _free_port()
    demo = launch_app(balanced_ckpt, host="127.0.0.1", port=port, device="cpu", block=False)
    driver = None
    try:
        driver = _chrome(tmp_path / "chrome-profile")
        # the page re-renders its lists while results arrive: an element read at that moment is stale
        wait = WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,))
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#support input[type=file]"))
        assert "DEDN" in driver.title

        def text(selector: str) -> str:
            # file lists show a name as two lines (stem, extension): join the lines back
            return driver.find_element(By.CSS_SELECTOR, selector).text.replace("\n", "")

        def upload(selector: str, *names: str) -> None:
            field = driver.find_element(By.CSS_SELECTOR, f"{selector} input[type=file]")
            field.send_keys("\n".join(str(pictures[n]) for n in names))

        def two_new_links(previous: dict | None = None) -> dict[str, str] | None:
            """The two mask download links, once both are new (else None: keep waiting)."""
            links = {
                a.get_attribute("download"): a.get_attribute("href")
                for a in driver.find_elements(By.CSS_SELECTOR, "#masks a[download]")
            }
            old = set((previous or {}).values())
            return links if len(links) == 2 and not old & set(links.values()) else None

        upload("#support", "support")
        upload("#queries", "query1", "query2", "broken")
        # uploads are asynchronous: wait until the page shows them
        wait.until(lambda d: "Upload an image" not in text("#support"))
        wait.until(lambda d: all(n in text("#queries") for n in ("query1.png", "query2.jpg", "broken.jpg")))

        # 1. paint the object with the brush: a stroke across the support picture
        driver.find_element(By.CSS_SELECTOR, "#support button[aria-label='Brush']").click()
        canvas = driver.find_element(By.CSS_SELECTOR, "#support canvas")
        stroke = ActionChains(driver).move_to_element(canvas).click_and_hold()
        for _ in range(8):
            stroke = stroke.move_by_offset(6, 1)
        stroke.release().perform()
        driver.find_element(By.CSS_SELECTOR, "#run").click()
        painted_links = wait.until(lambda d: two_new_links())
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#overlays img")) == 2)

        # 2. upload the mask file (it takes precedence over the painting) and segment again
        upload("#support-mask", "mask")
        wait.until(lambda d: "support_mask.png" in text("#support-mask"))
        driver.find_element(By.CSS_SELECTOR, "#run").click()
        links = wait.until(lambda d: two_new_links(painted_links))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#overlays img")) == 2)
        status = wait.until(lambda d: text("#status") if "Segmented" in text("#status") else None)
        assert "Segmented 2 images" in status and "Skipped broken.jpg" in status
        assert set(links) == {"query1_mask.png", "query2_mask.png"}
        assert all(href.startswith(f"http://127.0.0.1:{port}/") for href in links.values())
        # the downloaded mask is the one the Python API computes for the same files
        with urllib.request.urlopen(links["query1_mask.png"], timeout=10) as response:
            downloaded = np.asarray(Image.open(BytesIO(response.read())))
        expected = predictor.predict(pictures["query1"], pictures["support"], pictures["mask"]).mask
        np.testing.assert_array_equal(downloaded, expected * 255)
        shot = tmp_path / "app.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("DEDN_SCREENSHOT_DIR"):  # to look at the page after the test
            target = Path(os.environ["DEDN_SCREENSHOT_DIR"])
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, target / "app.png")
        assert Image.open(shot).size[0] >= 1000
    finally:
        if driver is not None:
            driver.quit()
        demo.close()
    assert time.monotonic() - start < 60


def test_app_without_gradio_says_how_to_install(balanced_ckpt, monkeypatch, capsys):
    import sys

    from dedn.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` fail
    assert main(["app", "--checkpoint", str(balanced_ckpt)]) == 2
    assert "pip install 'dedn[app]'" in capsys.readouterr().err
