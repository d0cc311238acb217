"""A real headless Chromium against a real ``resnetlab serve`` app: helpers for the page's test, and the
command that takes the docs' screenshot::

    python tests/browser.py --from resnet56 --pretrained cifar10_akamaster --image cat.jpg \\
        --out serve_page.png

Chromium is Debian's ``chromium`` driven through Debian's ``chromium-driver`` (Selenium, with both paths
given, so Selenium never downloads a browser or a driver). ``make install`` installs them with apt-get.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Every host name except this machine's fails to resolve: the page must need nothing from elsewhere.
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


def missing_browser() -> str | None:
    """Why Chromium cannot be driven here (None when it can): a missing program or Python package."""
    wanted = {"chromium": shutil.which("chromium") or shutil.which("chromium-browser"),
              "chromedriver": shutil.which("chromedriver")}  # fmt: skip
    missing = [name for name, path in wanted.items() if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (the test extra)")
    if missing:
        return (f"needs {' and '.join(missing)}: Debian's chromium and chromium-driver packages (`make install` "
                "installs them with apt-get where it can; or `apt-get install chromium chromium-driver`)")  # fmt: skip
    return None


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 860) -> Iterator[Any]:
    """A headless Chromium (a Selenium driver) that can reach 127.0.0.1 only, closed afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-extensions", "--disable-background-networking",
                     "--hide-scrollbars", f"--window-size={width},{height}", OFFLINE):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn in a thread on a free loopback port; yields its URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_for(driver: Any, script: str, timeout: float = 120) -> Any:
    """Polls a JavaScript expression until it is truthy; returns its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: d.execute_script(f"return {script}"))


#: The answer to the latest upload is on the page: the result shown, its overlay decoded, nothing pending.
OVERLAY_SHOWN = ("(() => { const img = document.getElementById('overlay'); "
                 "return !document.getElementById('result').hidden && !document.body.classList.contains('busy') "
                 "&& img.src.startsWith('data:image/png') && img.complete && img.naturalWidth > 0; })()")  # fmt: skip


def upload(driver: Any, path: Path) -> None:
    """Chooses ``path`` in the page's file input, as a user would."""
    driver.find_element("id", "file").send_keys(str(Path(path).resolve()))


def main(argv: list[str] | None = None) -> int:
    """The docs' screenshot: the page after one photo was uploaded."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--from", dest="source", required=True, help="a model source (as for resnetlab serve)")
    parser.add_argument("--pretrained", default=None, help="published weights tag, for a model name")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if (reason := missing_browser()) is not None:
        print(reason, file=sys.stderr)
        return 1
    from resnetlab.inference import Predictor
    from resnetlab.serve import create_app

    app = create_app(Predictor.load(args.source, pretrained=args.pretrained))
    with serving(app) as url, chromium() as driver:
        driver.get(url + "/")
        wait_for(driver, "document.getElementById('model').textContent.includes('classes')")
        upload(driver, args.image)
        wait_for(driver, OVERLAY_SHOWN)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, height + 20)
        driver.save_screenshot(str(args.out))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
