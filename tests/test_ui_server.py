"""The web UI as users and programs meet it: a real ``diffswap-igfi ui`` server started on a
free port, called through gradio_client, loaded with concurrent requests, and driven by a real
browser (Debian's chromium through Selenium). One server serves the whole module."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from diffswap_igfi.io.images import load_image
from diffswap_igfi.io.samples import sample_path
from diffswap_igfi.provenance.verify import verify_image

pytestmark = pytest.mark.slow  # one server start (~10-20 s here) shared by every test below

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MAX_UPLOAD_MB = 2  # the shipped photos are under 1 MB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mib(pid: int) -> float:
    """VmHWM: the most resident memory the process ever held."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.fixture(scope="module")
def server():
    """(url, process, temporary folder) of a server started as users start it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "diffswap_igfi", "ui", "--port", str(port),
                             "--max-upload-mb", str(MAX_UPLOAD_MB)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("temporary files:"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    root = None
    try:
        if not ready.wait(120):
            pytest.fail("the UI server did not start:\n" + "".join(lines))
        url = next(ln.split(": ", 1)[1].strip() for ln in lines if ln.startswith("diffswap-igfi ui:"))
        root = Path(next(ln for ln in lines if ln.startswith("temporary files:"))
                    .split(": ", 1)[1].split(" (")[0])
        assert url == f"http://127.0.0.1:{port}/" and root.is_dir()
        yield url, proc, root
    finally:
        proc.terminate()  # SIGTERM to this process id: the server cleans up and exits
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines)
    assert root is None or not root.exists(), f"{root} left behind"


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from gradio_client import Client

    return Client(server[0], verbose=False, download_files=str(tmp_path_factory.mktemp("dl")))


def _swap(client, source: str, target: str, **options):
    from gradio_client import handle_file

    return client.predict(sources=[handle_file(str(sample_path(source)))],
                          target=handle_file(str(sample_path(target))), api_name="/swap_image",
                          **options)


def test_swap_image_api_returns_a_marked_file_closer_to_the_source(client, detector,
                                                                   recognizer, server):
    path, summary = _swap(client, "grace_hopper", "astronaut")
    assert "SYNTHETIC" in summary.splitlines()[0] and "watermark: found" in summary
    report = verify_image(path)
    assert report.synthetic and report.watermark.found and report.metadata.synthetic
    result = load_image(path)
    target, source = load_image(sample_path("astronaut")), load_image(sample_path("grace_hopper"))
    assert result.rgb.shape == target.rgb.shape and not np.array_equal(result.rgb, target.rgb)
    face = detector.detect(result.rgb)[0]
    swapped = recognizer.describe(result.rgb, face)
    to_source = recognizer.distance(swapped, recognizer.describe(
        source.rgb, detector.detect(source.rgb)[0]))
    to_target = recognizer.distance(swapped, recognizer.describe(
        target.rgb, detector.detect(target.rgb)[0]))
    assert to_source < to_target, (to_source, to_target)
    # the result sits in a session folder inside the server's temporary folder
    assert any(server[2].glob(f"sessions/*/{Path(path).name}"))


def test_verify_api_reports_marked_and_unmarked_files(client):
    from gradio_client import handle_file

    path, _ = _swap(client, "astronaut", "grace_hopper", output_format="jpg")
    assert Path(path).suffix == ".jpg"
    summary, details = client.predict(image=handle_file(path), api_name="/verify")
    assert details["synthetic"] is True and details["watermark"]["found"] is True
    assert "SYNTHETIC" in summary
    _, details = client.predict(image=handle_file(str(sample_path("astronaut"))),
                                api_name="/verify")
    assert details["synthetic"] is False


def test_an_error_reaches_the_api_client_as_one_line(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as err:
        _swap(client, "grace_hopper", "astronaut", face_selector="picked", face_indices="4")
    message = str(err.value)
    assert "out of range" in message and "\n" not in message.strip()


def _audio_packets(path) -> list[bytes]:
    import av

    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.audio[0]) if p.size]


def test_swap_video_api_returns_a_marked_video_with_the_same_frames_and_audio(
        client, photos, tmp_path):
    """A 256x192 clip of 12 frames with a sine track (the astronaut's face large, under a
    moving camera), through /swap_video and then /verify."""
    from gradio_client import handle_file

    from diffswap_igfi.io.video import probe_video
    from diffswap_igfi.provenance.verify_video import verify_video
    from diffswap_igfi.video.synthetic import camera_path, render_frames, write_test_video

    photo = photos["astronaut"].rgb
    affines = camera_path(12, photo.shape[:2], (192, 256), center=(230.0, 150.0), cover=1.4)
    clip = write_test_video(tmp_path / "clip.mp4", render_frames(photo, affines, (192, 256)))
    path, summary = client.predict(sources=[handle_file(str(sample_path("grace_hopper")))],
                                   video=handle_file(str(clip)), api_name="/swap_video")
    assert Path(path).suffix == ".mp4" and "SYNTHETIC" in summary.splitlines()[0]
    assert "swapped 1 of 1 people in 12 of 12 frames" in summary
    assert probe_video(path).frames == probe_video(clip).frames == 12
    assert _audio_packets(path) == _audio_packets(clip)  # copied bit for bit
    report = verify_video(path)
    assert report.metadata.synthetic and report.watermark_found, report.lines()
    summary, details = client.predict(image=handle_file(path), api_name="/verify")
    assert details["synthetic"] is True and details["watermark"]["frames_marked"] > 0


def test_uploads_over_the_size_cap_are_refused_by_server_and_client(client, server, tmp_path):
    import httpx
    from gradio_client import handle_file

    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(MAX_UPLOAD_MB * 2**20))
    response = httpx.post(server[0] + "gradio_api/upload",
                          files={"files": (big.name, big.read_bytes(), "image/png")}, timeout=60)
    assert response.status_code == 413, response.text
    with pytest.raises(ValueError, match="maximum file size"):  # the client checks first
        client.predict(sources=[handle_file(str(sample_path("grace_hopper")))],
                       target=handle_file(str(big)), api_name="/swap_image")


def test_eight_concurrent_requests_all_finish_and_a_bad_upload_fails_alone(server, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20)
    pairs = [("grace_hopper", "astronaut"), ("astronaut", "grace_hopper")] * 4
    pairs[5] = ("grace_hopper", None)  # the bad upload, in the middle of the others

    def one(job):
        i, (source, target) = job  # one client per request, as eight users would have
        client = Client(server[0], verbose=False, download_files=str(tmp_path / f"client{i}"))
        return client.predict(sources=[handle_file(str(sample_path(source)))],
                              target=handle_file(str(sample_path(target)) if target
                                                 else str(bad)),
                              api_name="/swap_image")

    results = server[2] / "sessions"
    before = set(results.glob("*/*"))
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, job) for job in enumerate(pairs)]
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result(timeout=300))
            except AppError as err:
                outcomes.append(err)
    seconds = time.perf_counter() - start
    peak = _peak_rss_mib(server[1].pid)
    print(f"\n8 concurrent /swap_image requests: {seconds:.1f} s; server peak RSS {peak:.0f} MiB")
    assert isinstance(outcomes[5], AppError) and "broken.png" in str(outcomes[5])
    good = [o for i, o in enumerate(outcomes) if i != 5]
    assert len(good) == 7 and all(not isinstance(o, Exception) for o in good)
    assert len(set(results.glob("*/*")) - before) == 7  # none lost, none overwritten
    for (source, target), (path, summary) in zip(
            [p for i, p in enumerate(pairs) if i != 5], good):
        assert "SYNTHETIC" in summary
        assert load_image(path).rgb.shape == load_image(sample_path(target)).rgb.shape


@pytest.fixture
def browser(tmp_path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                    f"apt-get install chromium chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                "--window-size=1400,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_a_browser_uploads_two_photos_picks_faces_swaps_and_gets_the_marked_result(
        server, browser, tmp_path, faces):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def element(css, timeout=60):
        WebDriverWait(browser, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))
        return browser.find_element(By.CSS_SELECTOR, css)

    browser.get(server[0])
    element("#swap")
    element("#sources input[type=file]").send_keys(str(sample_path("grace_hopper")))
    element("#target input[type=file]").send_keys(str(sample_path("group")))
    # the target's faces were detected and shown as thumbnails, largest first; click two
    WebDriverWait(browser, 60).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#faces button.thumbnail-item")) >= 4)
    thumbnails = browser.find_elements(By.CSS_SELECTOR, "#faces button.thumbnail-item")
    assert len(thumbnails) == len(faces["group"])
    thumbnails[1].click()
    WebDriverWait(browser, 10).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#picked textarea").get_attribute("value"))
    thumbnails[3].click()
    WebDriverWait(browser, 10).until(lambda d: d.find_element(
        By.CSS_SELECTOR, "#picked textarea").get_attribute("value") == "1, 3")
    element("#swap").click()
    link = element("#result a[href*='t1_swapped']", timeout=120)
    shown = element("#comparison img")
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script("return arguments[0].naturalWidth", shown) > 0)
    report = element("#report textarea").get_attribute("value")
    assert "SYNTHETIC" in report and "watermark: found" in report

    downloaded = tmp_path / "downloaded.png"
    with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as response:
        downloaded.write_bytes(response.read())
    assert verify_image(downloaded).watermark.found
    result, target = load_image(downloaded).rgb, load_image(sample_path("group")).rgb
    assert result.shape == target.shape
    for i, face in enumerate(faces["group"][:4]):
        x0, y0, x1, y1 = (round(float(v)) for v in face.box)
        # PNG is lossless and the engine leaves pixels outside its mask exactly as they were
        same = np.array_equal(result[y0:y1, x0:x1], target[y0:y1, x0:x1])
        assert same == (i not in (1, 3)), f"face {i}"
    if os.environ.get("DIFFSWAP_UI_SCREENSHOT"):  # how docs/ui.png is made
        _save_marked_screenshot(browser, tmp_path, Path(os.environ["DIFFSWAP_UI_SCREENSHOT"]))

    # closing the tab ends the session: its folder goes at once
    served = Path(urllib.parse.unquote(link.get_attribute("href").split("file=", 1)[1]))
    folder = served.parent
    assert folder.parent == server[2] / "sessions" and served.is_file()
    browser.get("about:blank")
    deadline = time.monotonic() + 30
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not folder.exists(), "the session folder outlived its tab"


def test_a_browser_previews_a_video_picks_a_person_and_gets_the_swapped_video(
        server, browser, tmp_path, photos):
    """The Video tab: frame preview, 'Find people', a click on person 1, the swap, the player
    and the verify report."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from diffswap_igfi.io.video import probe_video
    from diffswap_igfi.video.synthetic import camera_path, render_frames, write_test_video

    a, g = photos["astronaut"].rgb, photos["grace_hopper"].rgb
    left = render_frames(a, camera_path(10, a.shape[:2], (192, 128), center=(230.0, 150.0),
                                        cover=1.2), (192, 128))
    right = render_frames(g, camera_path(10, g.shape[:2], (192, 128), center=(270.0, 250.0),
                                         cover=1.6), (192, 128))
    clip = write_test_video(tmp_path / "two.mp4",
                            [np.concatenate([x, y], 1) for x, y in zip(left, right)])

    def element(css, timeout=60):
        WebDriverWait(browser, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))
        return browser.find_element(By.CSS_SELECTOR, css)

    def text(css):
        return element(css).text

    browser.get(server[0])
    element("#swap")  # the page is up
    next(t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]")
         if t.text.strip() == "Video").click()
    element("#video_sources input[type=file]").send_keys(str(sample_path("tom_hanks")))
    element("#video_target input[type=file]").send_keys(str(clip))
    WebDriverWait(browser, 60).until(lambda d: "2 face(s) on this frame" in text(
        "#video_caption"))
    assert "10 frames" in text("#video_about") and "audio: aac" in text("#video_about")
    element("#video_find").click()
    WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(
        By.CSS_SELECTOR, "#video_people button.thumbnail-item")) == 2)
    assert "2 of the video's 2 people" in text("#video_caption")
    browser.find_elements(By.CSS_SELECTOR, "#video_people button.thumbnail-item")[1].click()
    WebDriverWait(browser, 10).until(lambda d: element("#video_index input").get_attribute(
        "value") == "1")
    element("#video_swap").click()
    link = element("#video_result a[href*='two_swapped']", timeout=120)
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR,
                                                               "#video_player video"))
    report = element("#video_report textarea").get_attribute("value")
    assert "SYNTHETIC" in report and "swapped 1 of 2 people in 10 of 10 frames" in report
    downloaded = tmp_path / "downloaded.mp4"
    with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as response:
        downloaded.write_bytes(response.read())
    assert probe_video(downloaded).frames == 10


def _save_marked_screenshot(browser, tmp_path: Path, dest: Path) -> None:
    """The screenshot shows swapped faces, so it is written with provenance like any result."""
    from PIL import Image

    from diffswap_igfi.provenance.metadata import COMPOSITE_SYNTHETIC
    from diffswap_igfi.provenance.write import write_synthetic_image

    raw = tmp_path / "screenshot.png"
    browser.save_screenshot(str(raw))
    rgb = np.asarray(Image.open(raw).convert("RGB"))
    write_synthetic_image(dest, rgb, None, digital_source_type=COMPOSITE_SYNTHETIC,
                          engine="web UI screenshot")
