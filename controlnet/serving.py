"""The web page and HTTP API behind every folder's serve.py (vendored: scripts/vendored/serving.py).

    cd ldm && python serve.py --checkpoint ./ldm_checkpoints/checkpoint_best.pt      # http://127.0.0.1:7860

A folder's serve.py loads each checkpoint named at start once, wraps it in a `Backend` (info, generate,
interpolate) and calls `run(backends, args)`. This module owns everything the folders share:
- validation: a request names no file (only the start-up checkpoints exist for it); unknown fields, unknown
  classes, out-of-range numbers and bad uploads are one-line 4xx answers, checked before any work is queued;
- safety: 127.0.0.1 unless --host says otherwise (with a warning), optional --auth (user:password for HTTP
  Basic, or a token for `Authorization: Bearer`), a request-size limit checked from Content-Length;
- a bounded queue: at most --queue_size requests are admitted (one generating, the others waiting); past it
  the answer is an immediate 503 "busy, retry"; one worker thread runs the model, so it is never used twice
  at once and its memory stays flat;
- outputs: each image is saved once under --output_dir/<tag>/<name> (runtime.save_png_once never
  overwrites) and returned as a zip, one PNG, or JSON with base64 PNGs (the page).

Why FastAPI and a small page rather than Gradio: the API must be plain JSON in, PNG / zip out, with our own
error messages and an immediate busy answer, which Gradio's event protocol and queue do not give. FastAPI,
uvicorn and python-multipart are optional: only serve.py imports this file.
Edit the source in scripts/vendored/ and run `python scripts/sync_vendored.py`.
"""
import asyncio
import base64
import binascii
import concurrent.futures
import hashlib
import hmac
import io
import ipaddress
import json
import math
import os
import re
import socket
import sys
import threading
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from runtime import UserError, save_png_once

try:  # optional: a missing package is one `error:` line from run() / build_app() saying what to install
    import python_multipart  # noqa: F401  (FastAPI's form parser, for the mask upload)
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    MISSING = None
except ImportError as _e:
    MISSING = _e.name
    Request = object


def need_web_packages():
    """UserError naming what to install when FastAPI / uvicorn / python-multipart is absent."""
    if MISSING:
        raise UserError(f"serve.py needs the optional web packages ({MISSING} is missing): "
                        f"pip install fastapi uvicorn python-multipart")

SEED_MAX = 2**31 - 1
GUIDANCE_MAX = 50.0
UPLOAD_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
COMMON_FIELDS = ("model", "class", "seed", "num_images", "guidance", "sampler", "steps", "format")
INTERP_FIELDS = ("model", "class", "seed", "guidance", "steps", "format", "mode", "seed_b", "class_b", "frames")
FORMATS = {"generate": ("zip", "png", "json"), "interpolate": ("zip", "png", "gif", "json")}
UNSAFE = re.compile(r"[\\\x00-\x1f]")  # backslashes and control characters never appear in an output name


class BadRequest(Exception):
    """A request the server refuses: one message, an HTTP 4xx status (400 unless given)."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


@dataclass
class Output:
    """One generated image: its file name as the folder's CLI writes it, the image, its seed and class."""
    name: str
    image: object
    seed: int
    label: object = None


@dataclass
class Animation:
    """An interpolation: file stem (animation.interpolation_stem), frames t = 0 .. 1, their seeds / classes."""
    stem: str
    frames: list
    seeds: list = field(default_factory=list)
    labels: list = field(default_factory=list)


class Backend:
    """One loaded checkpoint; a folder's serve.py subclasses it. Called from the one worker thread only."""

    def info(self):
        """What the page and /api/info show: classes, samplers, defaults, upload, interpolation modes."""
        raise NotImplementedError

    def generate(self, req):
        """-> (tag, [Output]): the images the folder's CLI writes for these settings, with its names."""
        raise NotImplementedError

    def interpolate(self, req):
        """-> (tag, Animation)."""
        raise BadRequest("this model has no interpolation")


class Req:
    """A validated request (attributes as listed in the folders' serve.py docs)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def public(self):
        """The settings that made the images (for settings.json and the page): no upload bytes."""
        return {k: v for k, v in self.__dict__.items() if k not in ("upload", "upload_bytes") and v is not None}


# ---------------------------------------------------------------------------------------------- flags


def add_serve_flags(p):
    """The server's own flags on a runtime.FlagParser (both spellings)."""
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", default=None, help="user:password (HTTP Basic) or a token (Bearer); @FILE reads it "
                                                "from a file, so it stays out of the process list")
    p.add_argument("--queue_size", type=int, default=8, help="requests admitted at once (running + waiting); "
                                                             "more get an immediate 503 busy")
    p.add_argument("--max_images", type=int, default=16, help="images per request")
    p.add_argument("--max_steps", type=int, default=250, help="denoising steps per request")
    p.add_argument("--max_frames", type=int, default=16, help="frames per interpolation")
    p.add_argument("--max_upload_mb", type=float, default=8.0, help="size of an uploaded mask / image")
    p.add_argument("--max_upload_pixels", type=int, default=4096 * 4096, help="pixels of an uploaded mask / image")
    p.add_argument("--output_dir", default="./served", help="every served image is also saved here, once")
    p.add_argument("--no_save", action="store_true", help="do not keep the served images on the server")
    p.add_argument("--request_timeout_s", type=float, default=600.0,
                   help="a request still waiting after this long is answered 503")
    return p


def check_serve_args(a):
    """Range checks naming the flag (before any model is loaded)."""
    for flag, ok in (("--port", 0 <= a.port <= 65535), ("--queue_size", a.queue_size >= 1),
                     ("--max_images", a.max_images >= 1), ("--max_steps", a.max_steps >= 1),
                     ("--max_frames", a.max_frames >= 2), ("--max_upload_mb", a.max_upload_mb > 0),
                     ("--max_upload_pixels", a.max_upload_pixels >= 1),
                     ("--request_timeout_s", a.request_timeout_s > 0)):
        if not ok:
            raise UserError(f"{flag} {getattr(a, flag[2:])} is out of range")
    a.auth_secret = read_auth(a.auth)


def read_auth(value):
    """--auth value -> ("basic", user, password) / ("token", token) / None."""
    if value is None:
        return None
    if value.startswith("@"):
        try:
            value = Path(value[1:]).expanduser().read_text().strip()
        except OSError as e:
            raise UserError(f"--auth {value}: cannot read {value[1:]} ({e.strerror or e})") from None
    if not value:
        raise UserError("--auth is empty: give user:password or a token")
    if ":" in value:
        user, pw = value.split(":", 1)
        if not user or not pw:
            raise UserError("--auth user:password needs both a user and a password")
        return ("basic", user, pw)
    return ("token", value)


def model_keys(paths):
    """Short unique keys for the checkpoints named at start: the file stem, with its folder when two clash."""
    stems = [Path(p).stem for p in paths]
    keys = []
    for p, s in zip(paths, stems):
        k = s if stems.count(s) == 1 else f"{Path(p).parent.name}-{s}"
        while k in keys:
            k += "_"
        keys.append(re.sub(r"[^A-Za-z0-9_.+-]", "-", k))
    return keys


def is_loopback(host):
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------- validation


def _looks_like_path(s):
    return "/" in s or "\\" in s or s.startswith("~") or ".." in s or "\x00" in s


def _number(body, key, kind, default, lo, hi, why=""):
    """A typed, bounded number from the request body (JSON numbers only; bools are not numbers)."""
    v = body.get(key, default)
    if kind is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
        if isinstance(v, float) and v.is_integer():
            v, ok = int(v), True
    else:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        v = float(v) if ok else v
    if not ok:
        raise BadRequest(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {json.dumps(v)[:40]}")
    if not lo <= v <= hi:
        raise BadRequest(f"'{key}' must be between {lo:g} and {hi:g}{why}, got {v:g}")
    return v


def _choice(value, key, allowed, what):
    if not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string, got {json.dumps(value)[:40]}")
    if value not in allowed:
        shown = ", ".join(map(str, allowed)) if allowed else "none"
        raise BadRequest(f"unknown {what} {value!r}; valid: {shown}")
    return value


def read_upload(data, args):
    """Uploaded bytes -> an opened PIL image, refused with one message when it is not a small readable image."""
    from PIL import Image
    limit = int(args.max_upload_mb * 2**20)
    if len(data) > limit:
        raise BadRequest(f"the upload is {len(data) / 2**20:.1f} MB, more than --max_upload_mb {args.max_upload_mb:g}",
                         413)
    if not data:
        raise BadRequest("the upload is empty: send a PNG, JPEG, TIFF or BMP file")
    try:
        im = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
        w, h = im.size
        if w * h > args.max_upload_pixels:
            raise BadRequest(f"the upload is {w}x{h} pixels, more than --max_upload_pixels {args.max_upload_pixels}",
                             413)
        im.load()
    except BadRequest:
        raise
    except Exception as e:  # Pillow raises many types for broken files: all mean "not a readable image"
        why = re.sub(r"\s*<[^>]*>", "", str(e)).strip()[:80]  # Pillow names the in-memory buffer: leave it out
        raise BadRequest(f"the upload is not a readable PNG, JPEG, TIFF or BMP image ({why})") from None
    return im


def validate(kind, body, upload_bytes, backends, args):
    """Request body (dict) + optional upload -> Req, or BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object of settings")
    keys = list(backends)
    model = body.get("model", keys[0])
    if isinstance(model, str) and _looks_like_path(model):
        raise BadRequest(f"'model' looks like a file path ({model[:60]!r}): requests never name files; the "
                         f"server only uses the checkpoints given at start, by key: {', '.join(keys)}")
    model = _choice(model, "model", keys, "model")
    info = backends[model].cached_info
    extra_spec = info.get("extra") or {}
    allowed = (INTERP_FIELDS if kind == "interpolate" else COMMON_FIELDS) + tuple(extra_spec)
    for k, v in body.items():
        if isinstance(v, str) and _looks_like_path(v):
            raise BadRequest(f"'{k}' looks like a file path ({v[:60]!r}): requests never name files; an "
                             f"upload goes in the multipart field 'condition'")
        if k not in allowed:
            raise BadRequest(f"unknown field '{k}'; the fields are: {', '.join(allowed)}"
                             + (" (the checkpoint is chosen at start: --checkpoint)" if k in ("checkpoint", "ckpt", "path") else ""))
    classes = list(info.get("classes") or [])

    def cls(key, default):
        v = body.get(key, default)
        if not classes:
            if key in body:
                raise BadRequest(f"'{key}': this model is unconditional (it has no classes)")
            return None, None
        name = _choice(v, key, classes, "class")
        return name, classes.index(name)

    class_name, class_index = cls("class", classes[0] if classes else None)
    samplers = list(info["samplers"])
    steps_cap = min(args.max_steps, int(info["max_steps"]))
    req = Req(model=model, class_name=class_name, class_index=class_index,
              seed=_number(body, "seed", int, 0, 0, SEED_MAX),
              guidance=_number(body, "guidance", float, float(info.get("default_guidance", 1.0)), 0.0, GUIDANCE_MAX),
              steps=_number(body, "steps", int, min(int(info["default_steps"]), steps_cap), 1, steps_cap,
                            f" (the server's --max_steps {args.max_steps} / the model's {info['max_steps']})"),
              format=_choice(body.get("format", "zip"), "format", FORMATS[kind], "format"),
              extra={k: _number(body, k, int if s.get("type") == "int" else float, s["default"],
                                s.get("min", -1e9), s.get("max", 1e9)) for k, s in extra_spec.items()},
              upload=None, upload_bytes=None, upload_sha=None)
    if kind == "generate":
        req.num_images = _number(body, "num_images", int, 1, 1, args.max_images, " (the server's --max_images)")
        req.sampler = _choice(body.get("sampler", info["default_sampler"]), "sampler", samplers, "sampler")
        if "steps" not in body:  # a sampler's own default (DPM-Solver++ needs fewer steps than DDIM)
            req.steps = min(int(info.get("sampler_steps", {}).get(req.sampler, info["default_steps"])), steps_cap)
        if req.format == "png" and req.num_images != 1:
            raise BadRequest("'format': 'png' returns one image: ask for num_images 1, or use 'zip' / 'json'")
    else:
        modes = list(info.get("interpolation") or [])
        req.mode = _choice(body.get("mode", "seeds"), "mode", modes, "interpolation mode")
        req.frames = _number(body, "frames", int, 8, 2, args.max_frames, " (the server's --max_frames)")
        req.sampler = info.get("interpolation_sampler", "ddim")  # deterministic: DDIM, or a flow ODE
        req.seed_b = _number(body, "seed_b", int, req.seed + 1, 0, SEED_MAX) if req.mode == "seeds" else None
        if req.mode == "classes":
            other = classes[1] if len(classes) > 1 else classes[0]
            req.class_b, req.class_b_index = cls("class_b", other)
        else:
            if "class_b" in body:
                raise BadRequest("'class_b' belongs to mode 'classes'; mode 'seeds' takes 'seed_b'")
            req.class_b = req.class_b_index = None
    if "guidance" in body and not info.get("guidance", True):
        raise BadRequest("'guidance': this model has no guidance to set")
    up = info.get("upload")
    if upload_bytes is not None:
        if not up:
            raise BadRequest("this model takes no upload ('condition'): send JSON settings only")
        req.upload = read_upload(upload_bytes, args)
        req.upload_bytes = upload_bytes
        req.upload_sha = hashlib.sha256(upload_bytes).hexdigest()[:12]
    elif up and up.get("required"):
        raise BadRequest(f"this model needs an upload: send multipart/form-data with a 'settings' field (JSON) "
                         f"and a file field 'condition' ({up.get('label', 'mask')})")
    return req


# ---------------------------------------------------------------------------------------------- queue


class WorkQueue:
    """Admission control + the one worker thread: at most `size` requests admitted (running or waiting)."""

    def __init__(self, size):
        self.size = size
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.served = self.busy = self.failed = self.rejected = 0
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    def try_admit(self):
        with self.lock:
            if self.in_flight >= self.size:
                self.busy += 1
                return False
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return True

    def release(self, _future=None):
        with self.lock:
            self.in_flight -= 1

    def status(self):
        with self.lock:
            return {"queue_size": self.size, "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                    "served": self.served, "busy": self.busy, "failed": self.failed, "rejected": self.rejected}


def rss_mb():
    """Resident memory of this process in MB (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------------------------------- responses


def _png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def _safe(name, what, parts=1):
    """A backend-made tag (one path component) or file name (at most `parts`: the CLI's class sub-folder),
    refused when it could leave its folder. Class names are the user's folder names: spaces and any
    letters are kept, as the CLI keeps them."""
    comps = name.split("/")
    if (not name or len(comps) > parts or UNSAFE.search(name)
            or any(not c or c.startswith(".") or len(c) > 200 for c in comps)):
        raise RuntimeError(f"unsafe {what} {name!r} from the backend")
    return name


def _attachment(name):
    """Content-Disposition for a download; RFC 6266 filename* keeps non-ASCII class names intact."""
    from urllib.parse import quote
    base = name.rsplit("/", 1)[-1]
    ascii_name = base.encode("ascii", "replace").decode().replace("?", "_").replace('"', "_")
    return {"Content-Disposition": f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(base)}"}


def _header(value):
    """A header value that is always latin-1 encodable (tags may hold any class-name letters)."""
    from urllib.parse import quote
    return quote(value, safe="/,_.+-=:;@ ")


def _zip(entries):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # PNG and GIF are compressed already
        for name, data in entries:
            z.writestr(name, data)
    return buf.getvalue()


def do_generate(backend, req, args):
    """Worker thread: generate, save once, encode -> (media type, body bytes, headers)."""
    tag, outputs = backend.generate(req)
    _safe(tag, "tag")
    settings = dict(req.public(), tag=tag, images=[{"name": o.name, "seed": o.seed, "class": o.label}
                                                   for o in outputs])
    pngs = [(_safe(o.name, "file name", parts=2), _png(o.image)) for o in outputs]
    if not args.no_save:
        folder = Path(args.output_dir) / tag
        for o in outputs:
            (folder / o.name).parent.mkdir(parents=True, exist_ok=True)
            save_png_once(o.image, folder / o.name)  # deterministic: an existing file is this image already
    headers = {"X-Seeds": ",".join(str(o.seed) for o in outputs), "X-Tag": _header(tag)}
    if req.format == "png":
        return "image/png", pngs[0][1], dict(headers, **_attachment(pngs[0][0]))
    zipped = _zip(pngs + [("settings.json", json.dumps(settings, indent=1).encode())])
    if req.format == "zip":
        return "application/zip", zipped, dict(headers, **_attachment(f"{tag}.zip"))
    body = {"tag": tag, "settings": settings, "zip": _b64(zipped),
            "images": [{"name": n, "seed": o.seed, "class": o.label, "png": _b64(d)} for (n, d), o in zip(pngs, outputs)]}
    return "application/json", json.dumps(body).encode(), headers


def do_interpolate(backend, req, args):
    """Worker thread: interpolate, save strip + GIF once, encode."""
    import animation
    tag, anim = backend.interpolate(req)
    _safe(tag, "tag")
    stem = _safe(anim.stem, "file stem")
    strip_png, gif = animation.png_bytes(animation.strip(anim.frames)), animation.gif_bytes(anim.frames)
    if not args.no_save:
        animation.write_interpolation(anim.frames, Path(args.output_dir) / tag, stem)
    headers = {"X-Tag": _header(tag), "X-Stem": _header(stem)}
    settings = dict(req.public(), tag=tag, stem=stem, seeds=list(anim.seeds), classes=list(anim.labels))
    if req.format == "png":
        return "image/png", strip_png, dict(headers, **_attachment(f"{stem}.png"))
    if req.format == "gif":
        return "image/gif", gif, dict(headers, **_attachment(f"{stem}.gif"))
    if req.format == "zip":
        z = _zip([(f"{stem}.png", strip_png), (f"{stem}.gif", gif),
                  ("settings.json", json.dumps(settings, indent=1).encode())])
        return "application/zip", z, dict(headers, **_attachment(f"{stem}.zip"))
    weights = animation.interp_weights(len(anim.frames))
    body = {"tag": tag, "stem": stem, "settings": settings, "strip": _b64(strip_png), "gif": _b64(gif),
            "frames": [{"t": t, "png": _b64(_png(f))} for t, f in zip(weights, anim.frames)]}
    return "application/json", json.dumps(body).encode(), headers


def error(status, message, **headers):
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


# ---------------------------------------------------------------------------------------------- app


def _auth_ok(header, secret):
    """Compare the Authorization header with --auth in constant time."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if secret[0] == "token" and scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), secret[1].encode())
    if scheme.lower() != "basic":
        return False
    try:
        user, _, pw = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return False
    if secret[0] == "token":  # browsers only do Basic: any user name, the token as the password
        return hmac.compare_digest(pw.encode(), secret[1].encode())
    return hmac.compare_digest(user.encode(), secret[1].encode()) & hmac.compare_digest(pw.encode(), secret[2].encode())


def build_app(backends, args, log=print):
    """The FastAPI app: /, /api/info, /api/status, POST /api/generate and /api/interpolate."""
    need_web_packages()
    for b in backends.values():
        b.cached_info = b.info()  # fixed for the server's life; validation reads it on every request
    queue = WorkQueue(args.queue_size)
    secret = getattr(args, "auth_secret", None) or read_auth(args.auth)
    body_limit = int(args.max_upload_mb * 2**20) + 2**16  # the upload plus its multipart envelope and settings
    started = time.time()
    app = FastAPI(title="diffusion serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.queue = queue

    @app.middleware("http")
    async def guard(request, call_next):
        if secret and not _auth_ok(request.headers.get("authorization"), secret):
            return error(401, "authentication required: this server was started with --auth",
                         **{"WWW-Authenticate": 'Basic realm="diffusion serve", charset="UTF-8"'})
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return error(411, "send the request with a Content-Length header")
            if int(length) > body_limit:
                return error(413, f"the request is {int(length) / 2**20:.1f} MB, more than --max_upload_mb "
                                  f"{args.max_upload_mb:g}")
        return await call_next(request)

    @app.exception_handler(404)
    async def not_found(request, exc):
        return error(404, f"no such page: {request.url.path}; the API is /api/info, /api/status, "
                          f"POST /api/generate, POST /api/interpolate")

    @app.exception_handler(405)
    async def not_allowed(request, exc):
        return error(405, f"{request.method} is not allowed on {request.url.path}")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})

    @app.get("/api/info")
    async def api_info():
        return {"models": {k: b.cached_info for k, b in backends.items()}, "default_model": next(iter(backends)),
                "limits": {"max_images": args.max_images, "max_steps": args.max_steps, "max_frames": args.max_frames,
                           "max_upload_mb": args.max_upload_mb, "max_upload_pixels": args.max_upload_pixels,
                           "queue_size": args.queue_size}}

    @app.get("/api/status")
    async def api_status():
        return dict(queue.status(), rss_mb=rss_mb(), uptime_s=round(time.time() - started, 1))

    async def read_request(request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        raw = await request.body()
        if ctype == "application/json" or (ctype == "" and raw[:1] in (b"{", b"[")):
            try:
                return json.loads(raw or b"{}"), None
            except (ValueError, UnicodeDecodeError) as e:
                raise BadRequest(f"the body is not valid JSON ({e})") from None
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=4)
            except Exception as e:  # python-multipart / starlette parse errors
                raise BadRequest(f"the multipart body cannot be read ({str(e)[:80]})") from None
            extra = [k for k in form.keys() if k not in ("settings", "condition")]
            if extra:
                raise BadRequest(f"unknown multipart field '{extra[0]}': send 'settings' (JSON) and 'condition' (file)")
            text = form.get("settings", "{}")
            if not isinstance(text, str):
                raise BadRequest("'settings' must be a text field holding JSON, not a file")
            try:
                body = json.loads(text)
            except ValueError as e:
                raise BadRequest(f"'settings' is not valid JSON ({e})") from None
            up = form.get("condition")
            if up is None:
                return body, None
            if isinstance(up, str):
                raise BadRequest("'condition' must be a file upload (curl -F condition=@mask.png)")
            return body, await up.read()  # its client-side file name is never used
        raise BadRequest(f"unsupported Content-Type {ctype or '(none)'!r}: send application/json, or "
                         f"multipart/form-data with 'settings' and 'condition'", 415)

    async def handle(kind, request):
        t0 = time.time()
        try:
            body, upload = await read_request(request)
            req = validate(kind, body, upload, backends, args)
        except BadRequest as e:
            queue.rejected += 1
            log(f"{kind}: {e.status} {e}")
            return error(e.status, str(e))
        if not queue.try_admit():
            log(f"{kind}: 503 busy ({queue.size} requests in the queue)")
            return error(503, f"busy: {queue.size} requests are already queued; retry in a few seconds",
                         **{"Retry-After": "5"})
        work = do_generate if kind == "generate" else do_interpolate
        cancelled = threading.Event()

        def job():
            if cancelled.is_set():  # answered 503 while it waited: never started
                return None
            return work(backends[req.model], req, args)

        fut = queue.pool.submit(job)
        fut.add_done_callback(queue.release)
        try:
            media, data, headers = await asyncio.wait_for(asyncio.wrap_future(fut), args.request_timeout_s)
        except asyncio.TimeoutError:
            cancelled.set()
            queue.failed += 1
            return error(503, f"timed out after {args.request_timeout_s:g} s in the queue; retry later",
                         **{"Retry-After": "30"})
        except (BadRequest, UserError) as e:
            queue.rejected += 1
            log(f"{kind}: 400 {e}")
            return error(getattr(e, "status", 400), str(e))
        except Exception as e:  # a bug or an out-of-memory: answered, logged, the server goes on
            queue.failed += 1
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0][:200]
            return error(500, f"generation failed ({type(e).__name__}: {first})")
        queue.served += 1
        what = (f"{len(headers['X-Seeds'].split(','))} image(s)" if kind == "generate" else f"{req.frames} frames")
        log(f"{kind}: 200 {req.model} {what} in {time.time() - t0:.2f} s")
        return Response(data, media_type=media, headers=headers)

    @app.post("/api/generate")
    async def api_generate(request: Request):
        return await handle("generate", request)

    @app.post("/api/interpolate")
    async def api_interpolate(request: Request):
        return await handle("interpolate", request)

    return app


def check_port(host, port):
    """One `error:` line when the port is taken (uvicorn would log a traceback-like message and exit 1)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}): pass another --port / --host") from None


def run(backends, args, log=print):
    """Serve until Ctrl-C. Prints the address; warns when listening beyond this machine."""
    need_web_packages()
    if not backends:
        raise UserError("no checkpoint to serve: pass --checkpoint")
    check_serve_args(args)
    check_port(args.host, args.port)
    if not is_loopback(args.host):
        print(f"warning: --host {args.host} listens beyond this machine: anyone who can reach it can use the "
              f"models{'' if args.auth else '; set --auth user:password or a token'}", file=sys.stderr, flush=True)
    app = build_app(backends, args, log=lambda m: print(m, flush=True))
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {', '.join(backends)} on http://{shown}:{args.port} (page /, API POST /api/generate, "
          f"/api/interpolate; queue {args.queue_size}, <= {args.max_images} images and {args.max_steps} steps "
          f"per request{'; auth on' if args.auth else ''}; images saved to "
          f"{'nowhere (--no_save)' if args.no_save else args.output_dir})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, timeout_keep_alive=5)
    return 0


# ---------------------------------------------------------------------------------------------- page

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>diffusion serve</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:70rem;color:#222}
fieldset{border:1px solid #ccc;border-radius:6px;margin:0 0 1rem 0}
label{display:inline-block;margin:.25rem 1rem .25rem 0}
input[type=number]{width:6rem}
button{padding:.4rem 1rem;margin-right:.5rem}
#status{margin:.5rem 0;min-height:1.2em}
.error{color:#b00020}
#results figure{display:inline-block;margin:.4rem;text-align:center;vertical-align:top}
#results img{image-rendering:pixelated;width:160px;border:1px solid #ddd}
#results img.strip{width:auto;max-width:100%;height:160px}
figcaption{font-size:.8rem;max-width:220px;word-break:break-all}
</style></head>
<body>
<h1>Generate</h1>
<p id="title"></p>
<fieldset><legend>Settings</legend>
<label>Model <select id="model"></select></label>
<label id="class_row">Class <select id="class"></select></label>
<label>Seed <input id="seed" type="number" min="0" value="0"></label>
<label>Images <input id="num_images" type="number" min="1" value="4"></label>
<label id="guidance_row">Guidance <input id="guidance" type="number" min="0" step="0.1"></label>
<label>Sampler <select id="sampler"></select></label>
<label>Steps <input id="steps" type="number" min="1"></label>
<span id="extra"></span>
<div id="upload_row"><label><span id="upload_label">Mask</span> <input id="condition" type="file" accept="image/png,image/jpeg,image/tiff,image/bmp"></label></div>
<p id="seed_rule"></p>
</fieldset>
<fieldset id="interp_box"><legend>Interpolation (deterministic DDIM)</legend>
<label>Between <select id="mode"></select></label>
<label id="seed_b_row">Second seed <input id="seed_b" type="number" min="0" value="1"></label>
<label id="class_b_row">Second class <select id="class_b"></select></label>
<label>Frames <input id="frames" type="number" min="2" value="8"></label>
</fieldset>
<button id="generate" type="button">Generate</button>
<button id="interpolate" type="button">Interpolate</button>
<a id="download_zip" style="display:none">Download all (.zip)</a>
<div id="status" role="status"></div>
<div id="results"></div>
<script>
"use strict";
let INFO = null;
const $ = (id) => document.getElementById(id);
function fill(sel, items, value) {
  sel.innerHTML = "";
  for (const it of items) { const o = document.createElement("option"); o.value = o.textContent = it; sel.appendChild(o); }
  if (value !== undefined && items.includes(value)) sel.value = value;
}
function show(id, on) { $(id).style.display = on ? "" : "none"; }
function model() { return INFO.models[$("model").value]; }
function onModel() {
  const m = model();
  $("title").textContent = m.title;
  fill($("class"), m.classes); fill($("class_b"), m.classes, m.classes[1]);
  show("class_row", m.classes.length > 0);
  fill($("sampler"), m.samplers, m.default_sampler);
  $("sampler").onchange = () => {
    const d = (model().sampler_steps || {})[$("sampler").value];
    if (d) $("steps").value = Math.min(d, model().max_steps, INFO.limits.max_steps);
  };
  $("steps").value = Math.min(m.default_steps, m.max_steps, INFO.limits.max_steps);
  $("steps").max = Math.min(m.max_steps, INFO.limits.max_steps);
  $("num_images").max = INFO.limits.max_images; $("frames").max = INFO.limits.max_frames;
  $("guidance").value = m.default_guidance; show("guidance_row", m.guidance);
  show("upload_row", !!m.upload); if (m.upload) $("upload_label").textContent = m.upload.label;
  $("seed_rule").textContent = m.seed_rule || "";
  fill($("mode"), m.interpolation || []); show("interp_box", (m.interpolation || []).length > 0);
  show("interpolate", (m.interpolation || []).length > 0); onMode();
  const ex = $("extra"); ex.innerHTML = "";
  for (const [k, s] of Object.entries(m.extra || {})) {
    const l = document.createElement("label"); l.textContent = (s.label || k) + " ";
    const i = document.createElement("input"); i.type = "number"; i.id = "extra_" + k; i.value = s.default;
    i.step = s.type === "int" ? "1" : "any"; if (s.min !== undefined) i.min = s.min; if (s.max !== undefined) i.max = s.max;
    l.appendChild(i); ex.appendChild(l);
  }
}
function onMode() { const c = $("mode").value === "classes"; show("seed_b_row", !c); show("class_b_row", c); }
function settings(kind) {
  const m = model(), s = {model: $("model").value, seed: +$("seed").value, steps: +$("steps").value, format: "json"};
  if (m.classes.length) s["class"] = $("class").value;
  if (m.guidance) s.guidance = +$("guidance").value;
  for (const k of Object.keys(m.extra || {})) s[k] = +$("extra_" + k).value;
  if (kind === "generate") { s.num_images = +$("num_images").value; s.sampler = $("sampler").value; }
  else { s.mode = $("mode").value; s.frames = +$("frames").value;
         if (s.mode === "classes") s.class_b = $("class_b").value; else s.seed_b = +$("seed_b").value; }
  return s;
}
function figure(src, name, caption, cls) {
  const f = document.createElement("figure"), img = document.createElement("img"), c = document.createElement("figcaption");
  img.src = src; img.alt = name; img.className = "result" + (cls ? " " + cls : "");
  const a = document.createElement("a"); a.href = src; a.download = name; a.textContent = name;
  c.appendChild(a); c.appendChild(document.createElement("br")); c.appendChild(document.createTextNode(caption));
  f.appendChild(img); f.appendChild(c); return f;
}
async function send(kind) {
  const s = settings(kind), st = $("status"), out = $("results"), file = $("condition").files[0];
  st.className = ""; st.textContent = kind === "generate" ? "generating…" : "interpolating…";
  $("generate").disabled = $("interpolate").disabled = true;
  let init;
  if (model().upload && file) { const fd = new FormData(); fd.append("settings", JSON.stringify(s)); fd.append("condition", file); init = {method: "POST", body: fd}; }
  else init = {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(s)};
  try {
    const t0 = performance.now(), r = await fetch("api/" + kind, init), body = await r.json();
    if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
    out.innerHTML = "";
    const sec = ((performance.now() - t0) / 1000).toFixed(1);
    const how = (x) => `${x.sampler} ${x.steps} steps` + (x.guidance !== undefined && model().guidance ? `, guidance ${x.guidance}` : "");
    if (kind === "generate") {
      for (const im of body.images)
        out.appendChild(figure("data:image/png;base64," + im.png, im.name, `seed ${im.seed}` + (im["class"] ? `, ${im["class"]}` : "") + `, ${how(body.settings)}`));
      const z = $("download_zip"); z.href = "data:application/zip;base64," + body.zip; z.download = body.tag + ".zip"; z.style.display = "";
      st.textContent = `${body.images.length} image(s) in ${sec} s — saved as ${body.tag}/`;
    } else {
      out.appendChild(figure("data:image/png;base64," + body.strip, body.stem + ".png", how(body.settings), "strip"));
      out.appendChild(figure("data:image/gif;base64," + body.gif, body.stem + ".gif", "animation"));
      $("download_zip").style.display = "none";
      st.textContent = `${body.frames.length} frames in ${sec} s — ${body.stem}`;
    }
  } catch (e) { st.className = "error"; st.textContent = "error: " + e.message; }
  finally { $("generate").disabled = $("interpolate").disabled = false; }
}
async function start() {
  try {
    const r = await fetch("api/info"); INFO = await r.json();
    fill($("model"), Object.keys(INFO.models), INFO.default_model); onModel();
    $("model").onchange = onModel; $("mode").onchange = onMode;
    $("generate").onclick = () => send("generate"); $("interpolate").onclick = () => send("interpolate");
    document.body.dataset.ready = "1";
  } catch (e) { $("status").className = "error"; $("status").textContent = "cannot reach the server: " + e.message; }
}
start();
</script></body></html>
"""
