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

from dedn.app import caption_for, describe_weights, editor_support, page_run, segment, support_preview
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
    """Two supports + masks, two queries and one corrupt query, as files."""
    support, mask = scene(96, 128, (20, 30, 70, 90))
    support2, mask2 = scene(90, 90, (40, 10, 80, 50), seed=3)
    files = {
        "support": save_rgb(tmp_path / "support.png", support),
        "mask": save_rgb(tmp_path / "support_mask.png", mask * 255),
        "support2": save_rgb(tmp_path / "support2.png", support2),
        "mask2": save_rgb(tmp_path / "support2_mask.png", mask2 * 255),
        "query1": save_rgb(tmp_path / "query1.png", scene(80, 100, (10, 10, 50, 60), seed=1)[0]),
        "query2": save_rgb(tmp_path / "query2.jpg", scene(70, 70, (10, 10, 50, 60), seed=2)[0], quality=95),
        "broken": tmp_path / "broken.jpg",
    }
    files["broken"].write_bytes(b"\xff\xd8\xff not really a jpeg")
    return files


def _painted(image_file: Path, mask_file: Path) -> dict:
    """The image editor's value after painting exactly the mask's object over the uploaded picture."""
    support = np.asarray(Image.open(image_file))
    mask = np.asarray(Image.open(mask_file)) > 0
    layer = np.zeros(support.shape[:2] + (4,), np.uint8)
    layer[mask] = (255, 0, 0, 255)
    return {
        "background": np.dstack([support, np.full(support.shape[:2], 255, np.uint8)]),
        "layers": [layer],
        "composite": support,
    }


def _written(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


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
    editor = _painted(pictures["support"], pictures["mask"])
    queries = [str(pictures["query1"]), str(pictures["broken"]), str(pictures["query2"])]
    result = segment(predictor, [(editor, None)], queries, tmp_path / "out")
    assert [p.name for p in result.mask_files] == ["query1_mask.png", "query2_mask.png"]
    assert [name for name, _ in result.skipped] == ["broken.jpg"]
    assert result.shots == 1
    assert "Segmented 2 images with 1 support." in result.message and "broken.jpg" in result.message
    expected = predictor.predict(pictures["query1"], pictures["support"], pictures["mask"]).mask
    assert 0.05 < expected.mean() < 0.95  # a mask that depends on the picture, not all one value
    np.testing.assert_array_equal(_written(result.mask_files[0]), expected * 255)
    overlay, caption = result.overlays[0]
    assert overlay.shape == (80, 100, 3) and caption.startswith("query1.png")
    # an uploaded mask file takes precedence over the painting: a painting of a different region is ignored
    other = _painted(pictures["support"], pictures["mask"])
    other["layers"][0] = np.roll(other["layers"][0], 40, axis=1)
    again = segment(predictor, [(other, str(pictures["mask"]))], queries[:1], tmp_path / "out2")
    np.testing.assert_array_equal(_written(again.mask_files[0]), expected * 255)


def test_two_supports_equal_the_k_shot_api_and_empty_slots_are_skipped(predictor, pictures, tmp_path):
    query = str(pictures["query1"])
    supports = [
        (str(pictures["support"]), str(pictures["mask"])),  # a file and its mask
        ({"background": None, "layers": [], "composite": None}, None),  # an empty slot in the middle
        (_painted(pictures["support2"], pictures["mask2"]), None),  # painted in the editor
        (None, None),  # an empty slot at the end
    ]
    result = segment(predictor, supports, [query], tmp_path / "out")
    assert result.shots == 2 and "Segmented 1 image with 2 supports." in result.message
    two_shot = predictor.predict(
        query, [pictures["support"], pictures["support2"]], [pictures["mask"], pictures["mask2"]]
    ).mask
    np.testing.assert_array_equal(_written(result.mask_files[0]), two_shot * 255)
    # the second support counts: the 2-shot mask is not the 1-shot mask of either support
    for image, mask in [("support", "mask"), ("support2", "mask2")]:
        assert (predictor.predict(query, pictures[image], pictures[mask]).mask != two_shot).any()
    # the same two supports in any slots, as arrays, give the same mask
    arrays = [
        (np.asarray(Image.open(pictures[i])), np.asarray(Image.open(pictures[m])))
        for i, m in [("support", "mask"), ("support2", "mask2")]
    ]
    again = segment(predictor, [(None, None), arrays[0], (None, None), arrays[1]], [query], tmp_path / "o2")
    np.testing.assert_array_equal(_written(again.mask_files[0]), two_shot * 255)


def test_segment_explains_what_is_missing(predictor, pictures, tmp_path):
    support = np.asarray(Image.open(pictures["support"]))
    first = (str(pictures["support"]), str(pictures["mask"]))
    query = [str(pictures["query1"])]
    out = tmp_path / "out"
    empty_editor = {"background": None, "layers": []}
    for supports in ([], [(empty_editor, None)], [(None, None), (empty_editor, None)]):
        with pytest.raises(DataError, match="upload a support image"):
            segment(predictor, supports, query, out)
    with pytest.raises(DataError, match="^support 1: paint the object or upload its mask$"):
        segment(predictor, [({"background": support, "layers": []}, None)], query, out)
    # the error names the slot on the page, counting the empty slots before it
    with pytest.raises(DataError, match="^support 3: paint the object or upload its mask$"):
        segment(predictor, [first, (None, None), (str(pictures["support2"]), None)], query, out)
    with pytest.raises(DataError, match="^support 2: upload the image that this mask belongs to$"):
        segment(predictor, [first, (None, str(pictures["mask2"]))], query, out)
    with pytest.raises(DataError, match="^support 2: the mask marks no object pixel"):
        segment(predictor, [first, (support, np.zeros(support.shape[:2], np.uint8))], query, out)
    with pytest.raises(
        DataError, match="^support 2: mask .*/support2_mask.png is 90x90 .* its image .*/support.png"
    ):
        segment(predictor, [first, (str(pictures["support"]), str(pictures["mask2"]))], query, out)
    with pytest.raises(DataError, match="^support 2: the painted layer"):
        bad = {"background": support, "layers": [np.zeros((10, 10, 4), np.uint8)]}
        segment(predictor, [first, (bad, None)], query, out)
    with pytest.raises(DataError, match="at least one query"):
        segment(predictor, [first], [], out)
    assert not out.exists()  # nothing was written by a refused request


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
    from dedn.weak import Box, box_from_mask

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
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#support-1 input[type=file]"))
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

        def shown(selector: str) -> bool:
            return any(e.is_displayed() for e in driver.find_elements(By.CSS_SELECTOR, selector))

        def download(url: str) -> np.ndarray:
            with urllib.request.urlopen(url, timeout=10) as response:
                return np.asarray(Image.open(BytesIO(response.read())))

        def segment_and_wait(previous: dict | None) -> tuple[dict[str, str], str]:
            """Press Segment; the new download links and the status line (both outputs of the same run)."""
            driver.find_element(By.CSS_SELECTOR, "#run").click()
            links = wait.until(lambda d: two_new_links(previous))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#overlays img")) == 2)
            status = wait.until(lambda d: text("#status") if "Segmented" in text("#status") else None)
            return links, status

        # one support slot at first: the others are hidden and there is nothing to remove
        assert shown("#support-1") and not shown("#support-2") and not shown("#support-mask-2")
        assert not driver.find_element(By.CSS_SELECTOR, "#remove-support").is_enabled()
        upload("#support-1", "support")
        upload("#queries", "query1", "query2", "broken")
        # uploads are asynchronous: wait until the page shows them
        wait.until(lambda d: "Upload an image" not in text("#support-1"))
        wait.until(lambda d: all(n in text("#queries") for n in ("query1.png", "query2.jpg", "broken.jpg")))

        # 1. paint the object with the brush: a stroke across the support picture
        driver.find_element(By.CSS_SELECTOR, "#support-1 button[aria-label='Brush']").click()
        canvas = driver.find_element(By.CSS_SELECTOR, "#support-1 canvas")
        stroke = ActionChains(driver).move_to_element(canvas).click_and_hold()
        for _ in range(8):
            stroke = stroke.move_by_offset(6, 1)
        stroke.release().perform()
        wait.until(lambda d: "covers" in text("#support-note-1"))  # the painting, drawn as read
        painted_links, status = segment_and_wait(None)
        assert "with 1 support." in status

        # 2. upload the mask file (it takes precedence over the painting) and segment again
        upload("#support-mask-1", "mask")
        wait.until(lambda d: "support_mask.png" in text("#support-mask-1"))
        # the support as the model reads it: the uploaded mask drawn over its picture, with its share
        # (the painting was shown before: wait for the uploaded mask's share)
        share = 100 * (np.asarray(Image.open(pictures["mask"])) > 0).mean()
        wait.until(lambda d: f"the object covers {share:.1f}% of the picture" in text("#support-note-1"))
        assert driver.find_elements(By.CSS_SELECTOR, "#support-preview-1 img")
        links, status = segment_and_wait(painted_links)
        assert "Segmented 2 images with 1 support." in status and "Skipped broken.jpg" in status
        assert set(links) == {"query1_mask.png", "query2_mask.png"}
        assert all(href.startswith(f"http://127.0.0.1:{port}/") for href in links.values())
        # the downloaded mask is the one the Python API computes for the same files
        one_shot = predictor.predict(pictures["query1"], pictures["support"], pictures["mask"]).mask
        np.testing.assert_array_equal(download(links["query1_mask.png"]), one_shot * 255)

        # 3. a second support (image + mask file): each query is segmented with both (2-shot)
        driver.find_element(By.CSS_SELECTOR, "#add-support").click()
        wait.until(lambda d: shown("#support-2") and shown("#support-mask-2"))
        assert (
            not shown("#support-3") and driver.find_element(By.CSS_SELECTOR, "#remove-support").is_enabled()
        )
        upload("#support-2", "support2")
        upload("#support-mask-2", "mask2")
        wait.until(lambda d: "Upload an image" not in text("#support-2"))
        wait.until(lambda d: "support2_mask.png" in text("#support-mask-2"))
        two_links, status = segment_and_wait(links)
        assert "Segmented 2 images with 2 supports." in status
        two_shot = predictor.predict(
            pictures["query1"],
            [pictures["support"], pictures["support2"]],
            [pictures["mask"], pictures["mask2"]],
        ).mask
        assert (two_shot != one_shot).any()
        np.testing.assert_array_equal(download(two_links["query1_mask.png"]), two_shot * 255)
        shot = tmp_path / "app.png"
        driver.save_screenshot(str(shot))  # the page with two supports and their results

        # 3b. a class name on the second slot: two classes, one label map per query (value k = class k)
        field = driver.find_element(By.CSS_SELECTOR, "#support-class-2 textarea, #support-class-2 input")
        field.send_keys("dog")
        class_links, status = segment_and_wait(two_links)
        assert "2 classes: 1 object (red, 1 support), 2 dog (blue, 1 support)" in status
        assert set(class_links) == {"query1_labels.png", "query2_labels.png"}
        sets = {
            "object": predictor.encode_supports(pictures["support"], pictures["mask"]),
            "dog": predictor.encode_supports(pictures["support2"], pictures["mask2"]),
        }
        labels = predictor.predict_classes(pictures["query1"], sets).labels
        np.testing.assert_array_equal(download(class_links["query1_labels.png"]), labels)
        two_links = class_links
        driver.save_screenshot(str(tmp_path / "app-classes.png"))

        # 4. a third slot shown and removed again, then the second: its pictures stay but are not used
        driver.find_element(By.CSS_SELECTOR, "#add-support").click()
        wait.until(lambda d: shown("#support-3"))
        driver.find_element(By.CSS_SELECTOR, "#remove-support").click()
        wait.until(lambda d: not shown("#support-3") and shown("#support-2"))
        driver.find_element(By.CSS_SELECTOR, "#remove-support").click()
        wait.until(lambda d: not shown("#support-2") and not shown("#support-mask-2"))
        again, status = segment_and_wait(two_links)
        assert "Segmented 2 images with 1 support." in status
        np.testing.assert_array_equal(download(again["query1_mask.png"]), one_shot * 255)

        # 5. the first support's mask as a box, shown as read, then segmented with the training-free proto
        driver.find_element(By.CSS_SELECTOR, "#support-box-1 input[type=checkbox]").click()
        wait.until(lambda d: "a box from" in text("#support-note-1"))
        for label in driver.find_elements(By.CSS_SELECTOR, "#method label"):
            if label.text.startswith("proto"):
                label.click()
        boxed, status = segment_and_wait(again)
        mask = np.asarray(Image.open(pictures["mask"])) > 0
        box = Box(*box_from_mask(mask.astype(np.uint8)))
        proto = Predictor.training_free("proto", predictor)
        by_proto = proto.predict(pictures["query1"], pictures["support"], box).mask
        np.testing.assert_array_equal(download(boxed["query1_mask.png"]), by_proto * 255)
        if os.environ.get("DEDN_SCREENSHOT_DIR"):  # to look at the page after the test
            target = Path(os.environ["DEDN_SCREENSHOT_DIR"])
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, target / "app.png")
            shutil.copy(tmp_path / "app-classes.png", target / "app-classes.png")
        assert Image.open(shot).size[0] >= 1000
    finally:
        if driver is not None:
            driver.quit()
        demo.close()
    assert time.monotonic() - start < 90


def test_app_without_gradio_says_how_to_install(balanced_ckpt, monkeypatch, capsys):
    import sys

    from dedn.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` fail
    assert main(["app", "--checkpoint", str(balanced_ckpt)]) == 2
    assert "pip install 'dedn[app]'" in capsys.readouterr().err


def test_app_without_checkpoint_and_without_shipped_model_says_so(tmp_path, monkeypatch, capsys):
    from dedn.cli import main

    monkeypatch.setattr("dedn.pretrained.MODELS_DIR", tmp_path / "no-models")
    (tmp_path / "no-models").mkdir()

    def never(*args, **kwargs):
        raise AssertionError("no page without a model")

    monkeypatch.setattr("dedn.app.build_app", never)
    assert main(["app", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "dedn: error: no shipped model" in err and "pass --checkpoint" in err


def test_app_without_checkpoint_serves_the_shipped_model(balanced_ckpt, tmp_path, monkeypatch):
    import hashlib
    import json

    from dedn.cli import main

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(balanced_ckpt, folder / "toy.pt")
    digest = hashlib.sha256((folder / "toy.pt").read_bytes()).hexdigest()
    manifest = {"default": "toy", "models": {"toy": {"file": "toy.pt", "sha256": digest}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr("dedn.pretrained.MODELS_DIR", folder)
    served = {}

    class Page:
        def launch(self, **kwargs):
            served["launch"] = kwargs

    def fake_build_app(predictor, description=""):
        served["predictor"], served["description"] = predictor, description
        return Page()

    monkeypatch.setattr("dedn.app.build_app", fake_build_app)
    assert main(["app", "--device", "cpu", "--port", "7999"]) == 0
    assert served["predictor"].pretrained == "toy"
    assert served["description"] == "Model: the shipped model toy (dedn, toy, input 64 px)."
    assert served["launch"]["server_name"] == "127.0.0.1" and served["launch"]["server_port"] == 7999


def test_the_page_reports_a_users_mistake_as_its_status_without_an_exception(predictor, pictures):
    """Segment with no support, or a mask of the wrong size: the status line says what to fix and nothing
    else is shown; no exception leaves the handler (the server console prints no traceback)."""
    gallery, masks, status, details = page_run(predictor, 1, [str(pictures["query1"])], None, None, "", False)
    assert (gallery, masks, details) == (
        [],
        [],
        "",
    ) and status == "**Could not segment:** upload a support image first"
    _, _, status, _ = page_run(
        predictor, 1, [str(pictures["query1"])], str(pictures["support"]), str(pictures["mask2"]), "", False
    )
    assert status.startswith("**Could not segment:** support 1: mask") and "90x90" in status


def test_captions_and_details_are_in_a_users_words(predictor, pictures, tmp_path):
    """A caption says how much of the picture is marked (or that nothing was found, with the highest
    probability); the fusion weights are summed into the trained experts' and the matcher's shares, behind
    the page's Details toggle."""
    editor = _painted(pictures["support"], pictures["mask"])
    gallery, masks, status, details = page_run(
        predictor, 1, [str(pictures["query1"])], editor, None, "", False
    )
    assert len(gallery) == 1 and "% of the picture marked" in gallery[0][1] and "Segmented 1 image" in status
    assert details.startswith("- query1.png: trained experts ") and details.endswith(" %")
    assert describe_weights({"object": 0.25, "scenario": 0.25, "probe": 0.5}) == (
        "trained experts 50 %, matching fitted to your supports 50 %"
    )

    class Empty:
        empty_support = False
        mask = np.zeros((4, 4), np.uint8)
        probability = np.full((4, 4), 0.31, np.float32)

    assert (
        caption_for("q.png", Empty())
        == "q.png: not found (highest probability 0.31); try another or a second support"
    )


def test_support_preview_draws_the_mask_over_its_picture_or_says_what_is_wrong(predictor, pictures):
    """Each slot shows its support as the model reads it: the object drawn over the picture (so that a
    mask that does not line up is seen before segmenting), or the message Segment would give."""
    image = np.asarray(Image.open(pictures["support"]))
    mask = np.asarray(Image.open(pictures["mask"])) > 0
    shown, note = support_preview(predictor, 1, str(pictures["support"]), str(pictures["mask"]))
    assert shown.shape == image.shape
    changed = (shown != image).any(axis=2)
    assert changed[mask].mean() > 0.99 and changed[~mask].mean() < 0.05  # drawn over the object only
    assert note == f"Support 1: the object covers {100 * mask.mean():.1f}% of the picture"
    painted = _painted(pictures["support"], pictures["mask"])
    np.testing.assert_array_equal(support_preview(predictor, 1, painted)[0], shown)
    # the wrong mask for this picture, a picture not yet painted, an empty slot
    shown, note = support_preview(predictor, 2, str(pictures["support"]), str(pictures["mask2"]))
    assert (
        shown is None and note.startswith("**Support 2 cannot be used:** support 2: mask") and "90x90" in note
    )
    unpainted = dict(painted, layers=[])
    assert support_preview(predictor, 1, unpainted) == (
        None,
        "Support 1: paint the object or upload its mask",
    )
    assert support_preview(predictor, 3, None) == (None, "")


def test_several_classes_box_supports_and_the_method_on_the_page(predictor, pictures, tmp_path):
    """Slots with two class names give one label map per query, equal to Predictor.predict_classes; a
    slot ticked as a box gives the box around what it marks (as --support-box); the method choice runs
    the training-free matcher."""
    from dedn.weak import Box, box_from_mask

    query = str(pictures["query1"])
    cat = (str(pictures["support"]), str(pictures["mask"]), "cat")
    dog = (_painted(pictures["support2"], pictures["mask2"]), None, "dog")
    result = segment(predictor, [cat, dog], [query], tmp_path / "two")
    assert [p.name for p in result.mask_files] == ["query1_labels.png"] and result.classes == ["cat", "dog"]
    assert "2 classes: 1 cat (red, 1 support), 2 dog (blue, 1 support)" in result.message
    sets = {
        "cat": predictor.encode_supports(pictures["support"], pictures["mask"]),
        "dog": predictor.encode_supports(pictures["support2"], pictures["mask2"]),
    }
    expected = predictor.predict_classes(query, sets).labels
    assert set(np.unique(expected)) == {0, 1, 2}  # both classes claim pixels: the merge is exercised
    np.testing.assert_array_equal(_written(result.mask_files[0]), expected)
    assert (
        result.overlays[0][1].startswith("query1.png: cat (red) ") and "dog (blue)" in result.overlays[0][1]
    )
    # two slots of one name are two shots of one class; an unnamed slot is "object"
    same = segment(predictor, [cat, (*dog[:2], "cat")], [query], tmp_path / "same")
    assert same.classes == ["cat"] and same.shots == 2 and same.mask_files[0].name == "query1_mask.png"
    # a box: the box around the mask is the support
    mask = _written(pictures["mask"]) // 255
    boxed = segment(
        predictor, [(str(pictures["support"]), str(pictures["mask"]), "", True)], [query], tmp_path / "b"
    )
    by_box = predictor.predict(query, pictures["support"], Box(*box_from_mask(mask))).mask
    np.testing.assert_array_equal(_written(boxed.mask_files[0]), by_box * 255)
    shown, note = support_preview(predictor, 1, str(pictures["support"]), str(pictures["mask"]), box=True)
    x0, y0, x1, y1 = box_from_mask(mask)
    assert note.startswith(f"Support 1: a box from ({x0}, {y0}) to ({x1}, {y1})")
    changed = (shown != _written(pictures["support"])).any(axis=2)
    assert changed[y0:y1, x0:x1].mean() > 0.99 and not changed[:y0].any()
    # the method: proto on the model's backbone
    slots = [str(pictures["support"]), str(pictures["mask"]), "", False]
    _, files, status, details = page_run(predictor, 1, [query], *slots, method="proto")
    proto = Predictor.training_free("proto", predictor)
    by_proto = proto.predict(query, pictures["support"], pictures["mask"]).mask
    np.testing.assert_array_equal(_written(Path(files[0])), by_proto * 255)
    assert details == "(proto: training-free, no fusion)" and "Segmented 1 image" in status
