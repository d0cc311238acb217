"""Files that are small but hostile: 1-KB images declaring absurd shapes, FIFOs named like images, file names
that are not UTF-8. Each is refused or skipped with a reason, quickly, without big allocations, never hanging."""

from __future__ import annotations

import asyncio
import csv
import os
import resource
from pathlib import Path

import pytest
from PIL import Image

import resnetlab
from colour_folders import write_colour_folder
from resnetlab.cli.main import main
from resnetlab.data import build_data, eval_transform, load_image, probe_image
from resnetlab.data.images import ImageBoundsError
from resnetlab.errors import DataError
from resnetlab.serve.loadtest import hostile_images, load_test, peak_rss_mb

TINY = dict(widths=(4, 8, 16), stem_channels=4, num_classes=2, input_size=(3, 16, 16))


def strip_png(path: Path, width: int, height: int) -> Path:
    Image.new("L", (width, height)).save(path, optimize=True)  # a few KB on disk
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def peak_rss_growth_mb(action) -> float:
    """How much this process's peak resident memory grew while ``action()`` ran, in MB (0 when the peak was
    already higher: tolerant, it can only under-report)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    action()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    resnetlab.save_pretrained(resnetlab.create_model("resnet20", **TINY), folder)
    return folder


# ---------------------------------------------------------------------------- absurd shapes (D2)
def test_a_thin_strip_is_refused_from_its_header(tmp_path: Path) -> None:
    strip = strip_png(tmp_path / "strip.png", 1, 1_000_000)
    assert strip.stat().st_size < 5_000
    for read in (probe_image, load_image):
        with pytest.raises(ImageBoundsError, match="1x1000000 pixels: its long side is more than 100 times"):
            read(strip)
    assert probe_image(strip_png(tmp_path / "ok.png", 100, 10_000)) == (100, 10_000)  # the limit itself is fine


def test_eval_transform_refuses_a_resize_beyond_its_pixel_limit() -> None:
    transform = eval_transform(224)  # resizes the short side to 256
    with pytest.raises(ImageBoundsError, match="6000x20 image would have 19,660,800 pixels"):
        transform(Image.new("RGB", (6000, 20)))
    assert transform(Image.new("RGB", (300, 200))).shape == (3, 224, 224)
    large = eval_transform(3584, crop_pct=0.875)  # a 4,096-px resize is allowed for a model that large
    assert large.transforms[1].max_pixels == 4 * 4096 * 4096


def test_predict_reports_each_hostile_image_on_one_line(model_dir: Path, tmp_path: Path, capsys) -> None:
    strip_png(tmp_path / "a.png", 1, 20_000_000)
    strip_png(tmp_path / "b.png", 1_000_000, 1)
    Image.new("RGB", (20, 20)).save(tmp_path / "fine.png")
    growth = peak_rss_growth_mb(
        lambda: main(["predict", "--from", str(model_dir), str(tmp_path), "--csv", str(tmp_path / "p.csv")])
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err and growth < 300, growth  # the unbounded resize took 2.9 GB for 1x1M
    skipped = [line for line in err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 2 and all("times its short side" in line for line in skipped)
    assert [row["file"] for row in read_csv(tmp_path / "p.csv")] == [str(tmp_path / "fine.png")]


def test_serve_answers_400_to_a_hostile_upload_without_allocating(model_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from resnetlab.inference import Predictor
    from resnetlab.serve import create_app

    hostile = hostile_images()
    with TestClient(create_app(Predictor.load(model_dir))) as client:
        answers = {}

        def post_all() -> None:
            for name in ("strip-1x1M", "strip-1x20M", "strip-1Mx1"):
                answers[name] = client.post("/predict", content=hostile[name])

        growth = peak_rss_growth_mb(post_all)
        assert {name: r.status_code for name, r in answers.items()} == dict.fromkeys(answers, 400)
        assert all("times its short side" in r.json()["error"] for r in answers.values())
        assert growth < 300, growth
        assert client.post("/predict", content=hostile["thinnest-accepted-100x10000"]).status_code == 200


def test_training_data_skips_hostile_images_with_a_reason(tmp_path: Path) -> None:
    """A strip in the test split used to pass the pixel cap and kill the run at its first evaluation."""
    root = write_colour_folder(tmp_path / "data", {"train": 2, "test": 2}, noise=40, boost=120, size=80)
    strip_png(root / "test" / "red" / "strip.png", 1, 20_000_000)
    with pytest.warns(UserWarning, match="skipped 1 files"):
        bundle = build_data(root, cache=False)
    assert len(bundle.test) == 4 and "times its short side" in bundle.skipped[0]
    assert [bundle.test[i][0].shape for i in range(len(bundle.test))] == [(3, 224, 224)] * 4


@pytest.mark.slow
def test_serve_peak_memory_under_16_concurrent_hostile_uploads(model_dir: Path, tmp_path: Path) -> None:
    """The goal of issue 15: a real server stays under 1.5 GB peak RSS while 16 hostile uploads arrive at
    once (again and again, 160 in all), and answers every one (400, or 200 for the thinnest accepted)."""
    from test_serve import serve_process  # the server the serve tests start

    log = tmp_path / "server.log"
    with serve_process(model_dir, log) as server:
        idle = peak_rss_mb(server.proc.pid)
        result = asyncio.run(load_test(server.url, list(hostile_images().values()), requests=160, concurrency=16,
                                       timeout=120))  # fmt: skip
        peak = peak_rss_mb(server.proc.pid)
    assert set(result["statuses"]) == {"200", "400"} and result["statuses"]["400"] == 128, result["statuses"]
    assert peak < 1536, peak
    assert "Traceback" not in log.read_text()
    print(f"16 concurrent hostile uploads x 10: server peak RSS {peak:.0f} MB (idle {idle:.0f} MB)")


# ---------------------------------------------------------------------------- FIFOs (D3)
@pytest.mark.timeout(60)  # before the fix this hung forever on opening the FIFO
def test_a_fifo_in_a_dataset_folder_is_skipped_not_waited_on(tmp_path: Path, capsys) -> None:
    root = write_colour_folder(tmp_path / "data", {"train": 2}, noise=40, boost=120)
    os.mkfifo(root / "train" / "red" / "p.png")
    for extra in ([], ["--no-cache"]):
        with pytest.warns(UserWarning, match="skipped 1 files"):
            assert main(["data", str(root), *extra]) == 0
        assert "train/red/p.png (a FIFO (named pipe), not a regular file)" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_a_fifo_given_to_predict_says_what_it_is(model_dir: Path, tmp_path: Path, capsys) -> None:
    os.mkfifo(tmp_path / "p.png")
    with pytest.raises(DataError, match="is a FIFO"):
        load_image(tmp_path / "p.png")
    main(["predict", "--from", str(model_dir), str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert "p.png is a FIFO (named pipe), not a regular file" in err and "not found" not in err


# ---------------------------------------------------------------------------- file names that are not UTF-8
def test_a_file_name_that_is_not_utf8_is_skipped_with_a_reason(model_dir: Path, tmp_path: Path, capsys) -> None:
    root = write_colour_folder(tmp_path / "data", {"train": 2}, noise=40, boost=120)
    bad = os.fsencode(root / "train" / "red") + b"/caf\xe9.png"  # Latin-1, not UTF-8
    Image.new("RGB", (16, 16)).save(bad.decode("utf-8", "surrogateescape"))
    with pytest.warns(UserWarning, match="skipped 1 files"):
        assert main(["data", str(root)]) == 0
    assert "train/red/caf\\xe9.png (its name is not valid UTF-8: rename it)" in capsys.readouterr().out
    csv_path = tmp_path / "p.csv"
    # predict keeps such a name (the cli branch's newer behaviour): shown and written with \x escapes
    assert main(["predict", "--from", str(model_dir), str(root), "--csv", str(csv_path)]) == 0
    rows = read_csv(csv_path)
    assert len(rows) == 5 and "caf\\xe9.png" in capsys.readouterr().out  # the whole CSV, that image too


def test_open_regular_never_opens_a_device_or_a_folder(tmp_path: Path) -> None:
    from resnetlab.io import NotRegularFileError, open_regular, sha256_file

    for path, kind in ((Path("/dev/null"), "a character device"), (tmp_path, "a folder")):
        with pytest.raises(NotRegularFileError, match=f"is {kind}, not a regular file"):
            open_regular(path)
    (tmp_path / "f.bin").write_bytes(b"abc")
    with open_regular(tmp_path / "f.bin") as f:
        assert f.read() == b"abc"
    assert sha256_file(tmp_path / "f.bin").startswith("ba7816bf")
