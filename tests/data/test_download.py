"""captioner.download against a tiny COCO-shaped server on 127.0.0.1 (Range support, cut-offs, 404s)."""
import hashlib
import io
import json
import re
import threading
import zipfile
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from captioner import download as dl
from captioner.cli import compose_config
from captioner.utils import CaptionerError

RNG = __import__("random").Random(0)
IMAGES = {split: {f"{split}/{i:012d}.jpg": RNG.randbytes(60_000) for i in range(1, 4)}
          for split in ("train2017", "val2017")}
ANNOTATIONS = {f"annotations/captions_{split}.json": json.dumps(
    {"images": [{"id": 1, "file_name": "000000000001.jpg"}],
     "annotations": [{"id": 1, "image_id": 1, "caption": "a cat"}]}).encode() for split in ("train2017", "val2017")}


def make_zip(members, compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


# Karpathy's caption_datasets.zip holds its three split files at the top level, without a folder
SPLIT_FILES = {f"dataset_{name}.json": json.dumps({"images": [{"filename": f"{name}.jpg", "imgid": 0, "split": "test",
                                                               "sentences": [{"raw": "a cat"}]}]}).encode() * 3000
               for name in ("coco", "flickr8k", "flickr30k")}
ZIPS = {"/annotations/annotations_trainval2017.zip": make_zip(ANNOTATIONS, zipfile.ZIP_DEFLATED),
        "/karpathy/caption_datasets.zip": make_zip(SPLIT_FILES),
        "/zips/train2017.zip": make_zip(IMAGES["train2017"]),
        "/zips/val2017.zip": make_zip(IMAGES["val2017"])}


class Server:
    """Serves `files`; records (path, Range header) per request; can cut a file off or ignore Range."""

    def __init__(self):
        self.files, self.requests, self.cut_once, self.ignore_range = dict(ZIPS), [], set(), False
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                state.requests.append((self.path, self.headers.get("Range")))
                body = state.files.get(self.path)
                if body is None:
                    return self.send_error(404)
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                start = int(m.group(1)) if m and not state.ignore_range else 0
                if start >= len(body) > 0:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                if start:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if self.path in state.cut_once:  # promise the whole file, send half, hang up
                    state.cut_once.discard(self.path)
                    payload = payload[:len(payload) // 2]
                self.wfile.write(payload)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # never send loopback requests through a configured proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    s = Server()
    yield s
    s.close()


def run(root, server, parts=("annotations", "train2017", "val2017"), retries=0):
    return dl.download(root, parts, server.url, timeout=5, retries=retries, progress=False,
                       karpathy_url=f"{server.url}/karpathy/caption_datasets.zip")


def cli_error(*argv) -> str:
    with pytest.raises(SystemExit) as e:
        dl.main(list(argv))
    return str(e.value.code)


def assert_layout(root, parts):
    for part in parts:
        members = ANNOTATIONS if part == "annotations" else \
            {f"{part}/{k}": v for k, v in SPLIT_FILES.items()} if part == "caption_datasets" else IMAGES[part]
        for name, data in members.items():
            assert (root / name).read_bytes() == data
        assert (root / part / dl.MARKER).is_file()
    assert not [p.name for p in root.iterdir() if p.name.startswith(".") or p.suffix in (".zip", ".part")]


def test_full_download_through_the_cli_then_rerun_skips(tmp_path, server):
    root = tmp_path / "coco"
    dl.main([f"root={root}", f"base_url={server.url}", f"karpathy_url={server.url}/karpathy/caption_datasets.zip",
             "progress=false", "retries=0", "timeout=5"])
    assert_layout(root, ["caption_datasets", "annotations", "train2017", "val2017"])
    assert (root / "annotations" / "captions_train2017.json").is_file()
    # where data=karpathy_coco looks for it
    cfg = compose_config("config", [f"data.root={root}", "data=karpathy_coco", "paths.run_dir=."])
    split_file = cfg.data.split_file
    assert Path(split_file) == root / "caption_datasets" / "dataset_coco.json" and Path(split_file).is_file()
    assert len(server.requests) == 4 and all(r is None for _, r in server.requests)
    server.requests.clear()
    run(root, server)
    assert server.requests == []


def test_resume_after_a_cut_off_transfer(tmp_path, server):
    server.cut_once.add("/zips/val2017.zip")
    with pytest.raises(CaptionerError, match=r"stopped at \d+ of \d+ bytes; run the same command again"):
        run(tmp_path, server, ["val2017"])
    part = tmp_path / "val2017.zip.part"
    half = part.stat().st_size
    assert 0 < half < len(ZIPS["/zips/val2017.zip"]) and not (tmp_path / "val2017").exists()
    run(tmp_path, server, ["val2017"])
    assert server.requests[-1] == ("/zips/val2017.zip", f"bytes={half}-")
    assert_layout(tmp_path, ["val2017"])


def test_resume_within_one_run(tmp_path, server, monkeypatch):
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    server.cut_once.add("/zips/train2017.zip")
    run(tmp_path, server, ["train2017"], retries=1)
    assert [r for _, r in server.requests] == [None, f"bytes={len(ZIPS['/zips/train2017.zip']) // 2}-"]
    assert_layout(tmp_path, ["train2017"])


def test_server_ignoring_range_restarts_from_zero(tmp_path, server):
    server.cut_once.add("/zips/val2017.zip")
    server.ignore_range = True
    with pytest.raises(CaptionerError):
        run(tmp_path, server, ["val2017"])
    run(tmp_path, server, ["val2017"])
    assert server.requests[-1][1] is not None  # it asked for a range, got 200 and the whole file
    assert_layout(tmp_path, ["val2017"])


def test_karpathy_split_files_resume_and_are_checksum_verified(tmp_path, server, monkeypatch):
    url, data = f"{server.url}/karpathy/caption_datasets.zip", ZIPS["/karpathy/caption_datasets.zip"]
    monkeypatch.setitem(dl.KNOWN, url, (None, "0" * 32))  # like the official one: MD5 published, size not
    with pytest.raises(CaptionerError, match=r"arrived with MD5 [0-9a-f]{32} but the official file has 0{32}"):
        run(tmp_path, server, ["caption_datasets"])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setitem(dl.KNOWN, url, (None, hashlib.md5(data).hexdigest()))
    server.cut_once.add("/karpathy/caption_datasets.zip")
    with pytest.raises(CaptionerError, match="run the same command again"):
        run(tmp_path, server, ["caption_datasets"])
    half = (tmp_path / "caption_datasets.zip.part").stat().st_size
    run(tmp_path, server, ["caption_datasets"])
    assert server.requests[-1] == ("/karpathy/caption_datasets.zip", f"bytes={half}-")
    assert_layout(tmp_path, ["caption_datasets"])
    assert dl.KNOWN[dl.KARPATHY][1] == "4fa8c08369d22fe16e41dc124bd1adc2"


def test_stale_extraction_folder_is_replaced(tmp_path, server):
    (tmp_path / ".val2017.extracting" / "val2017").mkdir(parents=True)
    (tmp_path / ".val2017.extracting" / "val2017" / "junk.jpg").write_bytes(b"x")
    (tmp_path / ".val2017.extracting" / dl.OWNED).touch()  # an interrupted extraction of ours
    run(tmp_path, server, ["val2017"])
    assert_layout(tmp_path, ["val2017"])
    assert not (tmp_path / "val2017" / "junk.jpg").exists()


@pytest.mark.parametrize("damage", ["crc", "garbage"])
def test_corrupted_zip_is_a_clear_error_and_nothing_looks_complete(tmp_path, server, damage):
    good = ZIPS["/zips/val2017.zip"]
    mid = len(good) // 2  # inside the second image's stored bytes: only the CRC check can notice
    server.files["/zips/val2017.zip"] = good[:mid] + bytes([good[mid] ^ 0xFF]) + good[mid + 1:] \
        if damage == "crc" else b"this is not a zip file" * 100
    message = cli_error(f"data.root={tmp_path}", f"base_url={server.url}", "parts=[annotations,val2017]",
                        "progress=false", "retries=0")
    assert message.startswith("error: ") and "\n" not in message
    assert f"{tmp_path / 'val2017.zip'} (from {server.url}/zips/val2017.zip) is not a valid zip archive" in message
    assert not (tmp_path / "val2017").exists() and not (tmp_path / ".val2017.extracting").exists()
    assert not (tmp_path / "val2017.zip").exists()  # deleted, so the next run fetches it afresh
    assert_layout(tmp_path, ["annotations"])  # the part completed before is kept


def test_404_is_a_clear_error(tmp_path, server):
    del server.files["/zips/val2017.zip"]
    message = cli_error(f"data.root={tmp_path}", f"base_url={server.url}/", "parts=[val2017]",
                        "progress=false")
    assert message == (f"error: could not download {server.url}/zips/val2017.zip: the server answered HTTP 404 "
                       f"Not Found; expected the zip file there (check base_url).")
    assert len(server.requests) == 1  # a 404 is not retried
    assert list(tmp_path.iterdir()) == []


def test_known_checksum_and_size_are_enforced(tmp_path, server, monkeypatch):
    url, data = f"{server.url}/zips/val2017.zip", ZIPS["/zips/val2017.zip"]
    monkeypatch.setitem(dl.KNOWN, url, (len(data), "0" * 32))
    with pytest.raises(CaptionerError, match=r"arrived with MD5 [0-9a-f]{32} but the official file has 0{32}"):
        run(tmp_path, server, ["val2017"])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setitem(dl.KNOWN, url, (len(data) + 1, None))
    with pytest.raises(CaptionerError, match=rf"is {len(data)} bytes but the official file is {len(data) + 1}"):
        run(tmp_path, server, ["val2017"])
    monkeypatch.setitem(dl.KNOWN, url, (len(data), hashlib.md5(data).hexdigest()))
    run(tmp_path, server, ["val2017"])
    assert_layout(tmp_path, ["val2017"])


def test_folder_without_marker_is_never_overwritten(tmp_path, server):
    (tmp_path / "val2017").mkdir()
    (tmp_path / "val2017" / "mine.jpg").write_bytes(b"x")
    with pytest.raises(CaptionerError, match="exists but has no .complete marker"):
        run(tmp_path, server, ["annotations", "val2017"])
    assert server.requests == [] and (tmp_path / "val2017" / "mine.jpg").exists()


def test_config_root_and_parts(monkeypatch, tmp_path):
    monkeypatch.delenv("CAPTIONER_DATA_DIR", raising=False)
    assert compose_config("download", []).root == "data/coco"
    assert compose_config("download", ["data.root=/x"]).root == "/x"
    assert compose_config("download", ["root=/y"]).root == "/y"
    assert list(compose_config("download", ["parts=[val2017]"]).parts) == ["val2017"]
    assert list(compose_config("download", []).parts) == ["caption_datasets", "annotations", "val2017", "train2017"]
    assert compose_config("download", []).karpathy_url == dl.KARPATHY
    with pytest.raises(CaptionerError, match="unknown part 'test2017'"):
        dl.download(tmp_path, ["test2017"])


@pytest.mark.parametrize("override, message", [
    ("retries=-1", "retries=-1 must be an integer >= 0"),  # the retry loop never ran: a traceback, no request
    ("retries=abc", "retries=abc must be an integer >= 0"), ("timeout=0", "timeout=0 must be a positive number"),
    ("parts=[]", "parts=[] must be a non-empty list of part names"), ("parts=[bogus]", "unknown part 'bogus'"),
    ("progress=maybe", "progress=maybe must be true or false"),
])
def test_every_download_key_is_checked_before_any_request(tmp_path, override, message):
    with pytest.raises(SystemExit) as exit:
        dl.main([f"root={tmp_path / 'coco'}", "base_url=http://127.0.0.1:9", override])  # nothing listens there
    assert str(exit.value.code).startswith("error: ") and message in str(exit.value.code)
    assert not (tmp_path / "coco").exists()


def test_what_the_user_put_there_is_never_deleted(tmp_path, server):
    # a zip put there by hand is used and kept (only zips this run downloaded are removed after extraction)
    (tmp_path / "val2017.zip").write_bytes(ZIPS["/zips/val2017.zip"])
    run(tmp_path, server, ["val2017"])
    assert (tmp_path / "val2017.zip").read_bytes() == ZIPS["/zips/val2017.zip"] and not server.requests
    # a bad one put there by hand is left in place, with one sentence
    (tmp_path / "annotations_trainval2017.zip").write_bytes(b"my notes, not a zip")
    message = cli_error(f"data.root={tmp_path}", f"base_url={server.url}", "parts=[annotations]", "progress=false")
    assert "(not downloaded by this run) is not a valid zip archive" in message and "left in place" in message
    assert (tmp_path / "annotations_trainval2017.zip").read_bytes() == b"my notes, not a zip"
    # a folder at the temporary extraction name that captioner did not make is refused, not removed
    (tmp_path / "annotations_trainval2017.zip").unlink()
    (tmp_path / ".annotations.extracting").mkdir()
    (tmp_path / ".annotations.extracting" / "mine.txt").write_text("keep me")
    message = cli_error(f"data.root={tmp_path}", f"base_url={server.url}", "parts=[annotations]", "progress=false")
    assert message == (f"error: {tmp_path / '.annotations.extracting'} exists but was not made by "
                       f"captioner.download; move it away and run again.")
    assert (tmp_path / ".annotations.extracting" / "mine.txt").read_text() == "keep me"
