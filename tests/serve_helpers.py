"""Shared test helpers for the folders' serve.py: start one as a user would, talk to its HTTP API.

    with Server("ldm", ["--checkpoint", ckpt, "--output_dir", out]) as s:
        r = s.post("generate", {"class": "a", "seed": 3, "num_images": 2})

The server is a subprocess (cwd = the folder, on a free local port, OMP_NUM_THREADS=1 as script_env gives);
`url()` waits until GET /api/info answers, so a test can run the CLI while the server boots.
"""
import io
import json
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from repo_helpers import REPO, free_port, script_env


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Import into a test module: its in-process CLI computes with one thread, as the server subprocess
    (OMP_NUM_THREADS=1) does, so the two give the same bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Server:
    """`python serve.py ARGS --port P` in REPO/folder; stop() (or the with-block) terminates it."""

    def __init__(self, folder, args, auth=None, boot_timeout=180, env=None):
        self.port, self.auth = free_port(), auth
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "serve.py", *map(str, args), "--port", str(self.port)],
                                     cwd=REPO / folder, env=env or script_env(), stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.boot_timeout, self.ready, self.info = boot_timeout, False, None

    def output(self):
        """Everything the server printed so far."""
        self.log.seek(0)
        return self.log.read()

    def url(self, path):
        """base + path, after waiting (once) for the server to answer GET /api/info."""
        deadline = time.time() + self.boot_timeout
        while not self.ready:
            if self.proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"serve.py did not start (exit {self.proc.poll()}):\n{self.output()[-4000:]}")
            try:
                r = requests.get(self.base + "/api/info", auth=self.auth, timeout=5)
                self.info, self.ready = r.json(), True
            except requests.ConnectionError:
                time.sleep(0.3)
        return self.base + path

    def get(self, path, **kw):
        kw.setdefault("auth", self.auth)
        return requests.get(self.url(path), timeout=60, **kw)

    def post(self, kind, settings, upload=None, timeout=180, **kw):
        """POST /api/<kind>: JSON settings, or multipart (settings + file 'condition') with an upload."""
        kw.setdefault("auth", self.auth)
        if upload is None:
            return requests.post(self.url(f"/api/{kind}"), json=settings, timeout=timeout, **kw)
        # a hostile client-side file name: the server must never use it
        files = {"condition": ("../client-name.png", upload, "application/octet-stream")}
        return requests.post(self.url(f"/api/{kind}"), data={"settings": json.dumps(settings)}, files=files,
                             timeout=timeout, **kw)

    def status(self):
        return self.get("/api/status").json()

    def rss_mb(self):
        """The server process's resident memory (Linux /proc), read from outside."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def pixels(data):
    """PNG bytes, a path or a file object -> numpy array."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        return np.asarray(im)


def strip_frames(src, n, size, pad=2):
    """Cut animation.strip's n frames (size wide, pad apart) back out of a strip PNG."""
    a = pixels(src)
    assert a.shape[1] == n * size + (n - 1) * pad, a.shape
    return [a[:, k * (size + pad): k * (size + pad) + size] for k in range(n)]


def assert_one_line_error(r, status):
    """A refused request: the status, a JSON body {"error": one non-empty line}."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    msg = r.json()["error"]
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg
