"""The page of ``resnetlab serve`` in a real headless Chromium: upload a real photo, read the answer.

Needs Debian's chromium and chromium-driver (``make install`` installs them): skipped with that reason on
a machine without them, a failure with ``CI=true``. The browser can reach 127.0.0.1 only.
"""

from __future__ import annotations

import re
import zipfile

import pytest

import resnetlab
from browser import OVERLAY_SHOWN, chromium, missing_browser, serving, upload, wait_for
from conftest import skip_or_fail
from resnetlab.inference import Predictor
from resnetlab.serve import create_app

PHOTOS = ("hymenoptera_data/val/ants/10308379_1b6c72e180.jpg", "hymenoptera_data/val/bees/1032546534_06907fe3b3.jpg")


@pytest.fixture(scope="module")
def photos(shared_file, tmp_path_factory) -> list:
    """Two real photos (an ant, a bee) from the ants/bees archive, extracted to a temporary folder."""
    folder = tmp_path_factory.mktemp("photos")
    with zipfile.ZipFile(shared_file("data/hymenoptera.zip")) as archive:
        return [archive.extract(name, folder) for name in PHOTOS]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    folder = tmp_path_factory.mktemp("model")
    model = resnetlab.create_model("resnet8", num_classes=3, label_names=("ants", "bees", "wasps"))
    resnetlab.save_pretrained(model, folder)
    return Predictor.load(folder)


def percent(p: float) -> str:
    return "<0.1%" if p < 0.001 else f"{100 * p:.1f}%"


def texts(driver, selector: str) -> list[str]:
    return [e.text for e in driver.find_elements("css selector", selector)]


@pytest.mark.slow
def test_page_in_chromium_shows_the_models_answer_and_the_overlay(photos, predictor, tmp_path) -> None:
    if (reason := missing_browser()) is not None:
        skip_or_fail(reason, "Chromium")
    expected = predictor.predict([photos[0]], top_k=3)[0]
    with serving(create_app(predictor)) as url, chromium() as driver:
        driver.get(url + "/")
        wait_for(driver, "document.getElementById('model').textContent.includes('resnet8')")
        assert "3 classes" in driver.find_element("id", "model").text

        upload(driver, photos[0])
        wait_for(driver, OVERLAY_SHOWN)
        assert driver.find_element("id", "top-label").text == expected.labels[0]
        assert driver.find_element("id", "top-probability").text == percent(expected.probabilities[0])
        assert texts(driver, "#topk .label") == expected.labels
        assert texts(driver, "#topk .value") == [percent(p) for p in expected.probabilities]
        assert driver.find_element("id", "explained-label").text.startswith(expected.labels[0])
        assert driver.execute_script("return document.getElementById('overlay').naturalWidth") >= 256
        assert driver.execute_script("return document.getElementById('photo').naturalWidth") > 0  # the photo itself
        for field in ("latency-server", "latency-model", "latency-round-trip"):
            assert re.match(r"\d+ ms|\d+\.\d\d s", driver.find_element("id", field).text), field
        assert not driver.find_element("id", "error").is_displayed()
        # nothing failed to load, nothing was fetched from elsewhere (only 127.0.0.1 resolves)
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []

        first_overlay = driver.find_element("id", "overlay").get_attribute("src")
        driver.find_elements("css selector", "#topk button")[1].click()  # the evidence for the runner-up
        wait_for(driver, f"document.getElementById('explained-label').textContent.startsWith({expected.labels[1]!r})")
        wait_for(driver, OVERLAY_SHOWN)
        assert driver.find_element("id", "overlay").get_attribute("src") != first_overlay
        assert "explained" in driver.find_elements("css selector", "#topk button")[1].get_attribute("class")

        second = predictor.predict([photos[1]], top_k=1)[0]
        upload(driver, photos[1])
        wait_for(driver, OVERLAY_SHOWN)  # the first photo's answer is hidden until the second's arrives
        assert driver.find_element("id", "top-label").text == second.labels[0]
        assert driver.find_element("id", "explained-label").text.startswith(second.labels[0])

        not_image = tmp_path / "notes.txt"
        not_image.write_text("not a photo")
        upload(driver, not_image)
        wait_for(driver, "!document.getElementById('error').hidden")
        assert "not a readable image" in driver.find_element("id", "error").text
        assert "notes.txt" in driver.find_element("id", "error").text
