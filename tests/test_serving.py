"""The shared server behind every serve.py (scripts/vendored/serving.py), driven through ddpm/serve.py with a
tiny class-conditional DDPM: bad requests, auth, limits, paths in fields, the bounded queue under a burst of
50 requests, memory over 200 requests, never-overwrite, and one real headless-browser run of the page.

    OMP_NUM_THREADS=1 python -m pytest tests/test_serving.py -q -s      # -s shows the burst / memory figures

The browser test needs Debian's chromium + chromium-driver (.ci/run installs them and sets
REQUIRE_BROWSER_TEST=1, which turns a missing browser into a failure instead of a skip).
The folder-specific behaviour (API = CLI images, interpolation end points, uploads) is in tests/test_serve_*.py.
"""
import base64
import hashlib
import io
import os
import shutil
import socket
import threading
import time
import zipfile
from collections import Counter

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from repo_helpers import load_folder, run_script
from serve_helpers import Server, assert_one_line_error

train, serving = load_folder("ddpm", "train", "serving")

S = 16
TINY = ["--image-size", S, "--base-channels", 8, "--time-dim", 16, "--noise-steps", 50, "--device", "cpu"]
AUTH = ("tester", "s3cret")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny DDPMs: class-conditional (3 classes, one epoch) and mask2image (2 steps) -> their ema_ckpt.pt."""
    root = tmp_path_factory.mktemp("serving")
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / "pairs" / sub).mkdir(parents=True)
    for c in range(3):
        (root / "data" / f"class_{c}").mkdir(parents=True)
        for i in range(4):
            a = (rng.random((S, S)) * 60).astype(np.uint8)
            a[2 + c:8 + c, 3:9] = 230
            Image.fromarray(a).save(root / "data" / f"class_{c}" / f"{i}.png")
            Image.fromarray(a).save(root / "pairs" / "images" / f"case{c}{i}.png")
            Image.fromarray(((a > 200) * 255).astype(np.uint8)).save(root / "pairs" / "masks" / f"case{c}{i}.png")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    common = ["--work-dir", root / "work", *TINY, "--sample-every-epochs", 0]
    train.main([str(a) for a in ["--data-root", root / "data", *common, "--batch-size", 4, "--num-epochs", 1]])
    train.main([str(a) for a in ["--task", "mask2image", "--data-root", root / "pairs", *common, "--batch-size", 2,
                                 "--max-train-steps", 2]])
    torch.set_num_threads(before)
    models = root / "work" / "models"
    return {"cls": models / "DDPM_conditional" / "ema_ckpt.pt", "m2i": models / "DDPM_mask2image" / "ema_ckpt.pt",
            "mask": root / "pairs" / "masks" / "case01.png"}


@pytest.fixture(scope="module")
def ckpt(runs):
    return runs["cls"]


@pytest.fixture(scope="module")
def open_server(runs, tmp_path_factory):
    """No auth, the default queue of 8; the class model first (the default), a mask2image model second."""
    out = tmp_path_factory.mktemp("served_open")
    with Server("ddpm", ["--checkpoint", runs["cls"], runs["m2i"], "--output_dir", out]) as s:
        s.out = out
        yield s


@pytest.fixture(scope="module")
def auth_server(ckpt, tmp_path_factory):
    """--auth user:password, a small upload limit."""
    out = tmp_path_factory.mktemp("served_auth")
    with Server("ddpm", ["--checkpoint", ckpt, "--output_dir", out, "--auth", ":".join(AUTH), "--max_upload_mb",
                         "0.05", "--max_images", "4", "--max_steps", "30"], auth=AUTH) as s:
        s.out = out
        yield s


def good(server, **kw):
    """A small valid request; -> the response (asserted 200)."""
    settings = dict({"class": "class_1", "seed": 3, "num_images": 2, "sampler": "ddim", "steps": 3}, **kw)
    r = server.post("generate", settings)
    assert r.status_code == 200, r.text[:300]
    return r


def test_bad_requests_are_one_message_4xx_and_the_server_keeps_answering(auth_server):
    s = auth_server
    url = s.url("/api/generate")  # waits for the boot (with the right credentials)
    post = lambda body, **kw: requests.post(url, json=body, auth=AUTH, timeout=60, **kw)  # noqa: E731
    cases = [  # (what, response, status, words of its message)
        ("no credentials", requests.post(url, json={}, timeout=60), 401, "authentication"),
        ("wrong password", requests.post(url, json={}, auth=("tester", "nope"), timeout=60), 401, "authentication"),
        ("wrong user", requests.post(url, json={}, auth=("root", AUTH[1]), timeout=60), 401, "authentication"),
        ("a bearer token the server was not given", requests.post(
            url, json={}, headers={"Authorization": "Bearer s3cret"}, timeout=60), 401, "authentication"),
        ("the page without credentials", requests.get(s.base + "/", timeout=60), 401, "authentication"),
        ("unknown class", post({"class": "class_9"}), 400, "unknown class 'class_9'; valid: class_0, class_1"),
        ("class by index", post({"class": 1}), 400, "'class' must be a string"),
        ("too many images", post({"num_images": 5}), 400, "between 1 and 4 (the server's --max_images)"),
        ("no images", post({"num_images": 0}), 400, "'num_images' must be between 1 and 4"),
        ("too many steps", post({"steps": 31}), 400, "--max_steps 30"),
        ("seed as text", post({"seed": "7"}), 400, "'seed' must be an integer"),
        ("negative guidance", post({"guidance": -1}), 400, "'guidance' must be between 0"),
        ("NaN guidance", requests.post(url, data=b'{"guidance": NaN}', auth=AUTH, timeout=60,
                                       headers={"Content-Type": "application/json"}), 400, "'guidance' must be a number"),
        ("unknown sampler", post({"sampler": "euler"}), 400, "unknown sampler 'euler'; valid: ddim, dpmsolver, ddpm"),
        ("a checkpoint path", post({"checkpoint": "/etc/passwd"}), 400, "looks like a file path"),
        ("a model path", post({"model": "../models/x.pt"}), 400, "only uses the checkpoints given at start"),
        ("a path as class", post({"class": "../../etc/passwd"}), 400, "'class' looks like a file path"),
        ("a path as sampler", post({"sampler": "..\\ddim"}), 400, "'sampler' looks like a file path"),
        ("a path as format", post({"format": "/tmp/out.zip"}), 400, "'format' looks like a file path"),
        ("an output folder", post({"output_dir": "/tmp"}), 400, "looks like a file path"),
        ("an unknown field", post({"output_name": "x"}), 400, "unknown field 'output_name'"),
        ("png of two images", post({"format": "png", "num_images": 2}), 400, "'format': 'png' returns one image"),
        ("not JSON", requests.post(url, data=b"{class: 1", auth=AUTH, timeout=60,
                                   headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
        ("a JSON list", post([1, 2]), 400, "must be a JSON object"),
        ("plain text", requests.post(url, data=b"class=1", auth=AUTH, timeout=60,
                                     headers={"Content-Type": "text/plain"}), 415, "unsupported Content-Type"),
        ("an upload to a model without conditions", requests.post(
            url, data={"settings": "{}"}, files={"condition": ("m.png", b"\x89PNG....", "image/png")}, auth=AUTH,
            timeout=60), 400, "takes no upload"),
        ("a body over --max_upload_mb", requests.post(
            url, data={"settings": "{}"}, files={"condition": ("m.png", b"0" * 200_000, "image/png")}, auth=AUTH,
            timeout=60), 413, "more than --max_upload_mb 0.05"),
        ("interpolation frames", requests.post(s.base + "/api/interpolate", json={"frames": 1}, auth=AUTH,
                                               timeout=60), 400, "'frames' must be between 2 and 16"),
        ("interpolation mode", requests.post(s.base + "/api/interpolate", json={"mode": "noise"}, auth=AUTH,
                                             timeout=60), 400, "unknown interpolation mode 'noise'"),
        ("unknown page", requests.get(s.base + "/etc/passwd", auth=AUTH, timeout=60), 404, "no such page"),
        ("GET on a POST route", requests.get(url, auth=AUTH, timeout=60), 405, "not allowed"),
    ]
    for what, r, status, words in cases:
        msg = assert_one_line_error(r, status)
        assert words in msg, (what, msg)
    assert cases[0][1].headers["WWW-Authenticate"].startswith("Basic")  # a browser asks for the password
    # the server goes on: a good request right after, and nothing was written but its images
    r = requests.post(url, json={"class": "class_1", "seed": 3, "num_images": 2, "sampler": "ddim", "steps": 3},
                      auth=AUTH, timeout=60)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/zip"
    written = sorted(p.relative_to(s.out).as_posix() for p in s.out.rglob("*") if p.is_file())
    assert [w.rsplit("/", 1)[-1] for w in written] == ["class_1_seed3.png", "class_1_seed4.png"], written
    st = requests.get(s.base + "/api/status", auth=AUTH, timeout=60).json()
    assert st["served"] == 1 and st["failed"] == 0 and st["rejected"] >= 20


def test_auth_token_and_basic_rules():
    """--auth TOKEN: Bearer TOKEN, or Basic with any user and the token as password; user:password: both."""
    basic = lambda u, p: "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()  # noqa: E731
    token = serving.read_auth("tok3n")
    assert serving._auth_ok("Bearer tok3n", token) and serving._auth_ok(basic("anyone", "tok3n"), token)
    assert not serving._auth_ok("Bearer tok3", token) and not serving._auth_ok(basic("tok3n", "x"), token)
    pw = serving.read_auth("ann:pa:ss")  # the password may hold colons
    assert serving._auth_ok(basic("ann", "pa:ss"), pw)
    for bad in (basic("ann", "pa"), basic("bob", "pa:ss"), "Bearer pa:ss", "Basic ###", "", None):
        assert not serving._auth_ok(bad, pw), bad


def test_saved_once_and_never_overwritten(open_server):
    first = zipfile.ZipFile(io.BytesIO(good(open_server, seed=11).content))
    files = sorted(p for p in open_server.out.rglob("class_1_seed1[12].png"))
    assert len(files) == 2
    stamp = [p.stat().st_mtime_ns for p in files]
    second = zipfile.ZipFile(io.BytesIO(good(open_server, seed=11).content))
    assert [p.stat().st_mtime_ns for p in files] == stamp  # written once, not again
    for name in ("class_1_seed11.png", "class_1_seed12.png"):
        assert first.read(name) == second.read(name)  # deterministic: the same image for the same seed


def test_burst_of_50_against_a_queue_of_8(open_server, capsys):
    """Every request answered in bounded time: its images or an immediate busy; never more than 8 in flight."""
    s = open_server
    good(s)  # warm up (first-call costs out of the timing)
    t = time.time()
    good(s, steps=40, num_images=1)
    one = time.time() - t  # one request's time: at most 8 of them queue
    answers, lock, barrier = [], threading.Lock(), threading.Barrier(50)

    def client(i):
        barrier.wait()
        t0 = time.time()
        try:
            r = requests.post(s.url("/api/generate"), json={"class": "class_2", "seed": 100 + i, "num_images": 1,
                                                             "sampler": "ddim", "steps": 40}, timeout=300)
            res = (r.status_code, time.time() - t0, r)
        except requests.RequestException as e:  # a dropped connection would be a failure of the server
            res = (repr(e), time.time() - t0, None)
        with lock:
            answers.append(res)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    codes = Counter(a[0] for a in answers)
    busy_s = [a[1] for a in answers if a[0] == 503]
    ok_s = [a[1] for a in answers if a[0] == 200]
    st = s.status()
    with capsys.disabled():  # the figures go to the terminal (and CI's log) even without -s
        print(f"\nburst: 50 requests against --queue_size 8: {codes.get(200, 0)} served, {codes.get(503, 0)} busy; "
              f"max in flight {st['max_in_flight']}; one request alone {one:.2f} s; slowest served {max(ok_s):.2f} s, "
              f"slowest busy answer {max(busy_s) if busy_s else 0:.3f} s")
    assert set(codes) <= {200, 503}, codes  # no error, no dropped connection
    assert codes[200] >= 8 and codes[503] >= 1, codes
    assert st["max_in_flight"] <= 8 and st["in_flight"] == 0
    assert max(ok_s) < 20 * one + 30  # bounded: at most 8 requests ahead of any accepted one
    for code, _, r in answers:
        if code == 503:
            assert "busy" in r.json()["error"] and r.headers["Retry-After"]
        else:  # every accepted request completed with its image
            z = zipfile.ZipFile(io.BytesIO(r.content))
            assert len([n for n in z.namelist() if n.endswith(".png")]) == 1
    good(s)  # and the server answers normally afterwards


def test_memory_stays_flat_over_200_requests(open_server, capsys):
    s = open_server
    for i in range(20):  # warm-up: allocator pools, first-call caches
        good(s, seed=1000 + i, num_images=1, steps=2)
    warm = s.rss_mb()
    for i in range(180):
        good(s, seed=2000 + i, num_images=1, steps=2)
    end = s.rss_mb()
    with capsys.disabled():
        print(f"\nmemory: server RSS {warm:.1f} MB after 20 requests, {end:.1f} MB after 200 ({end - warm:+.1f} MB)")
    assert end - warm < 40, (warm, end)


def test_port_in_use_is_one_line_and_other_hosts_warn(ckpt, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = run_script("ddpm", ["serve.py", "--checkpoint", str(ckpt), "--port", str(port)], check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use): pass another --port / --host"]
    with Server("ddpm", ["--checkpoint", ckpt, "--host", "0.0.0.0", "--no_save"]) as s:
        s.url("/")
        assert "warning: --host 0.0.0.0 listens beyond this machine" in s.output() and "--auth" in s.output()
        assert good(s).status_code == 200 and not (tmp_path / "served").exists()
    assert run_script("ddpm", ["serve.py", "--checkpoint", str(ckpt), "--queue_size", "0"],
                      check=False).stderr.strip() == "error: --queue_size 0 is out of range"


def _browser_or_skip():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("REQUIRE_BROWSER_TEST"):
            pytest.fail("the browser test needs Debian's chromium and chromium-driver: apt-get install chromium "
                        "chromium-driver (.ci/run does)")
        pytest.skip("no chromium / chromedriver (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
    except ImportError:
        pytest.fail("pip install selenium (in requirements.txt)")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_the_page_in_a_real_headless_browser(open_server, runs):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    s = open_server
    url = s.url("/")
    browser = _browser_or_skip()
    try:
        browser.get(url)
        WebDriverWait(browser, 30).until(lambda b: b.execute_script("return document.body.dataset.ready") == "1")
        assert [o.text for o in Select(browser.find_element(By.ID, "class")).options] == ["class_0", "class_1",
                                                                                          "class_2"]
        Select(browser.find_element(By.ID, "class")).select_by_visible_text("class_2")
        Select(browser.find_element(By.ID, "sampler")).select_by_visible_text("ddim")
        for field, value in (("seed", "21"), ("num_images", "3"), ("steps", "4")):
            el = browser.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 60).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results img.result")) == 3)
        captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#results figcaption")]
        assert [c.splitlines()[0] for c in captions] == [f"class_2_seed{k}.png" for k in (21, 22, 23)]
        assert all("ddim 4 steps" in c for c in captions), captions
        widths = browser.execute_script(
            "return Array.from(document.querySelectorAll('#results img.result')).map(i => i.naturalWidth)")
        assert widths == [S, S, S]  # real decoded PNGs
        # the page's image is the API's image for the same settings
        src = browser.find_element(By.CSS_SELECTOR, "#results img.result").get_attribute("src")
        api = zipfile.ZipFile(io.BytesIO(good(s, **{"class": "class_2", "seed": 21, "num_images": 1,
                                                    "steps": 4}).content))
        assert base64.b64decode(src.split(",", 1)[1]) == api.read("class_2_seed21.png")
        assert browser.find_element(By.ID, "download_zip").get_attribute("download").endswith(".zip")
        browser.find_element(By.ID, "interpolate").click()
        WebDriverWait(browser, 60).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results img.strip")) == 1)
        assert "frames" in browser.find_element(By.ID, "status").text
        # a refused request shows its message on the page
        el = browser.find_element(By.ID, "steps")
        el.clear()
        el.send_keys("5000")
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 30).until(lambda b: "error:" in b.find_element(By.ID, "status").text)
        assert "--max_steps" in browser.find_element(By.ID, "status").text
        # a mask-conditioned model: the page shows the upload, sends the file, shows the images
        Select(browser.find_element(By.ID, "model")).select_by_visible_text("DDPM_mask2image-ema_ckpt")
        assert browser.find_element(By.ID, "upload_row").is_displayed()
        assert not browser.find_element(By.ID, "class_row").is_displayed()  # trained without classes
        browser.find_element(By.ID, "condition").send_keys(str(runs["mask"]))
        for field, value in (("seed", "5"), ("num_images", "2"), ("steps", "3")):
            el = browser.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 60).until(lambda b: "image(s)" in b.find_element(By.ID, "status").text
                                         or "error" in b.find_element(By.ID, "status").text)
        assert "error" not in browser.find_element(By.ID, "status").text, browser.find_element(By.ID, "status").text
        sha = hashlib.sha256(runs["mask"].read_bytes()).hexdigest()[:12]
        names = [c.text.splitlines()[0] for c in browser.find_elements(By.CSS_SELECTOR, "#results figcaption")]
        assert len(names) == 2 and all(sha in n for n in names), (sha, names)
        assert "case01" not in " ".join(names)  # the client's file name is never used
    finally:
        browser.quit()
