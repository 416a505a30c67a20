"""Build small, real WebDataset tar shards (good and deliberately broken) for tests."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.scores.layout import state_folder, state_path


def image_bytes(seed: int = 0, size=(40, 40), mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A small random-ish image (smooth gradient + noise) encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    base = np.linspace(0, 255, w, dtype=np.float64)[None, :, None] * rng.uniform(0.2, 1.0, 3)
    arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def sample(i: int, caption: str = None, **extra) -> tuple:
    """(key, members) of a clean img2dataset-style sample."""
    key = f"{i:09d}"
    members = {"jpg": image_bytes(i), "txt": (caption or f"a photo number {i} of a gradient").encode(),
               "json": json.dumps({"url": f"http://example.com/{i}.jpg", "uid": f"{i:032x}"}).encode()}
    members.update(extra)
    return key, members


def write_shard(path, samples, truncate_to: int = None) -> str:
    """Write ``samples`` [(key, {ext: bytes})] as a tar; optionally cut the file to ``truncate_to`` bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}" if ext else key)
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    if truncate_to is not None:
        data = data[:truncate_to]
    with open(path, "wb") as fh:
        fh.write(data)
    return str(path)


def clean_shards(folder, shards: int, per_shard: int, start: int = 0) -> list:
    """Several clean shards named 00000.tar, 00001.tar, ... with globally unique keys, in ``folder`` (made if
    missing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(shards):
        samples = [sample(start + s * per_shard + j) for j in range(per_shard)]
        urls.append(write_shard(folder / f"{s:05d}.tar", samples))
    return urls


def tiny_run(urls, chunk_size: int = 16, **kw):
    """A RunConfig for the tiny random-init test model (wclip-tiny, seed 0), without progress bars."""
    from pipeline.config import RunConfig
    from pipeline.models import ModelSpec

    kw.setdefault("progress", False)
    kw.setdefault("model", ModelSpec("wclip-tiny", random_init=True, seed=0))
    return RunConfig(shards=tuple(urls), chunk_size=chunk_size, **kw)

#: PYTHONPATH for scenario scripts a test runs in a subprocess: the checkout (jobs/) and tests/ (shardkit).
SCRIPT_PATH = os.pathsep.join(str(p) for p in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parent))


def png_bomb(width=100_000, height=100_000) -> bytes:
    """A tiny PNG whose header claims huge dimensions."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def state(folder) -> Path:
    """Where wclip keeps the bookkeeping of a local folder (``DIR.wclip``, beside it)."""
    return Path(state_folder(folder))


def marker(scores_dir, name: str) -> dict:
    """The completion marker of shard ``name`` in a local scores folder."""
    return json.loads(Path(state_path(scores_dir, "shards", f"{name}.json")).read_text())


def marker_files(scores_dir) -> list:
    """The completion markers present in a local scores folder."""
    return sorted(Path(state_path(scores_dir, "shards")).glob("*.json"))


@contextlib.contextmanager
def http_server(respond):
    """A loopback HTTP server whose GET handler is ``respond(handler)``; yields its base URL."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            respond(self)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def cut_transfer(payload: bytes):
    """A GET handler that announces all of ``payload``, sends half of it, then drops the connection."""
    def respond(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload[: len(payload) // 2])
        handler.wfile.flush()
        handler.connection.close()
    return respond
