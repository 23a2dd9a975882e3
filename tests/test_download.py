"""minisd.download and `minisd download` against a local HTTP server on 127.0.0.1.

The server (a http.server subclass below) serves bytes the test creates, answers Range requests with 206 (or
ignores them, like a server without range support), can cut a transfer off after k bytes, and logs every
request with the bytes it sent, so the tests can see that a resume fetched only the remaining bytes.
"""
import gzip
import hashlib
import http.server
import io
import re
import socket
import struct
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest

from minisd import cli
from minisd import datasets as D
from minisd.download import (ChecksumError, DownloadError, download, is_verified, mark_verified,
                             safe_extract_tar)
from minisd.errors import UserError


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10  # seconds; a stuck client cannot hold the test

    def do_GET(self):
        srv = self.server
        path = self.path.split("?")[0]
        entry = {"path": path, "range": self.headers.get("Range"), "status": None, "sent": 0}
        srv.requests.append(entry)
        data = srv.files.get(path)
        if data is None:
            entry["status"] = 404
            self.send_error(404, "Not Found")
            return
        start, status = 0, 200
        m = re.fullmatch(r"bytes=(\d+)-", entry["range"] or "")
        if m and srv.range_support:
            start, status = int(m.group(1)), 206
            if start >= len(data):
                entry["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = srv.cut_after.pop(0) if srv.cut_after else None
        if cut is not None:
            body = body[:cut]  # the headers promised more: the client sees a transfer cut off
        entry.update(status=status, sent=len(body))  # before writing: the client may finish before we return
        self.wfile.write(body)
        self.wfile.flush()

    def log_message(self, *args):  # keep pytest output clean
        pass


class LocalServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.requests, self.cut_after, self.range_support = {}, [], [], True

    def url(self, path):
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # talk to 127.0.0.1 directly, never through a proxy
    srv = LocalServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _blob(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# ----------------------------------------------------------------------------------------------------------------
# download()

def test_complete_download(server, tmp_path):
    data = _blob(300_000)
    server.files["/a.bin"] = data
    sha = hashlib.sha256(data).hexdigest()
    out = download(server.url("/a.bin"), tmp_path / "sub" / "a.bin", sha256=sha,
                   md5=hashlib.md5(data).hexdigest(), progress=False)
    assert out == tmp_path / "sub" / "a.bin" and out.read_bytes() == data
    assert not (tmp_path / "sub" / "a.bin.part").exists()
    assert [(r["range"], r["status"], r["sent"]) for r in server.requests] == [(None, 200, len(data))]


def test_resume_after_interrupted_transfer(server, tmp_path):
    data = _blob(500_000, 1)
    server.files["/b.bin"] = data
    server.cut_after = [123_456]
    dest = tmp_path / "b.bin"
    with pytest.raises(DownloadError) as e:
        download(server.url("/b.bin"), dest, retries=0, progress=False)
    msg = str(e.value)
    assert server.url("/b.bin") in msg and "run the same command again to resume" in msg
    assert not dest.exists() and (tmp_path / "b.bin.part").stat().st_size == 123_456
    download(server.url("/b.bin"), dest, sha256=hashlib.sha256(data).hexdigest(), progress=False)
    assert dest.read_bytes() == data and not (tmp_path / "b.bin.part").exists()
    second = server.requests[1]
    assert second["range"] == "bytes=123456-" and second["status"] == 206
    assert second["sent"] == len(data) - 123_456  # only the remaining bytes


def test_automatic_resume_within_one_call(server, tmp_path):
    data = _blob(200_000, 2)
    server.files["/c.bin"] = data
    server.cut_after = [50_000, 70_000]  # cut twice, then complete
    dest = download(server.url("/c.bin"), tmp_path / "c.bin", sha256=hashlib.sha256(data).hexdigest(),
                    retries=2, retry_wait=0.0, progress=False)
    assert dest.read_bytes() == data
    assert [r["range"] for r in server.requests] == [None, "bytes=50000-", "bytes=120000-"]
    assert sum(r["sent"] for r in server.requests) == len(data)


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    data = _blob(100_000, 3)
    server.files["/d.bin"] = data
    server.range_support = False
    garbage = b"garbage from an earlier, different download"
    (tmp_path / "d.bin.part").write_bytes(garbage)
    dest = download(server.url("/d.bin"), tmp_path / "d.bin", progress=False)
    assert dest.read_bytes() == data  # the old partial bytes were discarded, not prepended
    assert server.requests[0]["range"] == f"bytes={len(garbage)}-" and server.requests[0]["status"] == 200


def test_complete_part_file_and_416(server, tmp_path):
    """An earlier run died after the last byte but before the rename: the server answers 416 to the resume."""
    data = _blob(10_000, 4)
    server.files["/e.bin"] = data
    (tmp_path / "e.bin.part").write_bytes(data)
    dest = download(server.url("/e.bin"), tmp_path / "e.bin", sha256=hashlib.sha256(data).hexdigest(),
                    progress=False)
    assert dest.read_bytes() == data
    assert [(r["range"], r["status"]) for r in server.requests] == [("bytes=10000-", 416)]  # nothing refetched
    # A part file longer than the file on the server is discarded and the download restarts.
    (tmp_path / "e.bin").unlink()
    (tmp_path / "e.bin.part").write_bytes(data + b"extra")
    dest = download(server.url("/e.bin"), tmp_path / "e.bin", retries=0, progress=False)  # a restart is no retry
    assert dest.read_bytes() == data and [r["status"] for r in server.requests[1:]] == [416, 200]


def test_checksum_mismatch_leaves_no_file(server, tmp_path):
    data = _blob(50_000, 5)
    server.files["/f.bin"] = data
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as e:
        download(server.url("/f.bin"), tmp_path / "f.bin", sha256=wrong, progress=False)
    msg = str(e.value)
    assert "f.bin" in msg and wrong in msg and hashlib.sha256(data).hexdigest() in msg
    assert list(tmp_path.iterdir()) == []  # neither the final file nor the part file
    with pytest.raises(ChecksumError, match="expected md5 " + "1" * 32):
        download(server.url("/f.bin"), tmp_path / "f.bin", md5="1" * 32, progress=False)

    def reject(path):
        raise ChecksumError(f"{path.name}: content check failed")

    with pytest.raises(ChecksumError, match="f.bin.part: content check failed"):
        download(server.url("/f.bin"), tmp_path / "f.bin", check=reject, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_http_404_and_unreachable(server, tmp_path):
    url = server.url("/missing.gz")
    with pytest.raises(DownloadError) as e:
        download(url, tmp_path / "missing.gz", progress=False)
    assert url in str(e.value) and "HTTP 404" in str(e.value) and "--mirror" in str(e.value)
    assert list(tmp_path.iterdir()) == []
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.gz"
    with pytest.raises(DownloadError, match=re.escape(url) + r".*could not connect.*no internet access"):
        download(url, tmp_path / "x.gz", retries=0, progress=False)


def test_file_url(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello")
    assert download(src.as_uri(), tmp_path / "out.bin", progress=False).read_bytes() == b"hello"


def test_stamps(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"abc")
    digests = {"sha256": hashlib.sha256(b"abc").hexdigest()}
    assert not is_verified(p, digests)
    mark_verified(p, digests)
    assert is_verified(p, digests)
    assert not is_verified(p, {"sha256": "0" * 64})  # a different expected value needs a new check
    p.write_bytes(b"abcd")
    assert not is_verified(p, digests)


# ----------------------------------------------------------------------------------------------------------------
# safe tar extraction

def _tar(members):
    """A .tar.gz in memory; members: (TarInfo kwargs, bytes or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for kw, data in members:
            info = tarfile.TarInfo(kw.pop("name"))
            for k, v in kw.items():
                setattr(info, k, v)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def test_safe_extract(tmp_path):
    good = tmp_path / "good.tar.gz"
    good.write_bytes(_tar([({"name": "top", "type": tarfile.DIRTYPE}, None), ({"name": "top/a.bin"}, b"A"),
                           ({"name": "top/sub/b.bin"}, b"BB")]))
    out = safe_extract_tar(good, tmp_path / "t")
    assert sorted(p.relative_to(tmp_path / "t").as_posix() for p in out) == ["top/a.bin", "top/sub/b.bin"]
    assert (tmp_path / "t/top/sub/b.bin").read_bytes() == b"BB"
    bad = {
        "absolute path": [({"name": str(tmp_path / "abs_evil")}, b"x")],
        "'..' in the path": [({"name": "ok.bin"}, b"x"), ({"name": "top/../../dotdot_evil"}, b"x")],
        "symlink": [({"name": "link", "type": tarfile.SYMTYPE, "linkname": str(tmp_path / "outside")}, None)],
        "hard link": [({"name": "hl", "type": tarfile.LNKTYPE, "linkname": "/etc/passwd"}, None)],
        "special file": [({"name": "fifo", "type": tarfile.FIFOTYPE}, None)],
    }
    for why, members in bad.items():
        arc = tmp_path / "bad.tar.gz"
        arc.write_bytes(_tar(members))
        target = tmp_path / f"target_{why[:4].strip()}"
        with pytest.raises(UserError, match=re.escape(why) + ".*Nothing was extracted"):
            safe_extract_tar(arc, target)
        assert list(target.iterdir()) == []  # not even the good member before the bad one
    assert not (tmp_path / "abs_evil").exists() and not (tmp_path / "dotdot_evil").exists()
    # a symlink already inside the target that points outside cannot be used as a way out
    target = tmp_path / "t2"
    target.mkdir()
    (tmp_path / "outside").mkdir()
    (target / "escape").symlink_to(tmp_path / "outside")
    arc.write_bytes(_tar([({"name": "escape/evil"}, b"x")]))
    with pytest.raises(UserError, match="resolves outside the target"):
        safe_extract_tar(arc, target)
    assert list((tmp_path / "outside").iterdir()) == []
    arc.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated or corrupt"):
        safe_extract_tar(arc, tmp_path / "t3")


# ----------------------------------------------------------------------------------------------------------------
# `minisd download` end to end with --mirror

def _idx(arr):
    arr = np.ascontiguousarray(arr, np.uint8)
    return struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _serve_synthetic_mnist(server, rng, prefix="/mnist"):
    ref = {}
    for split, stem, n in (("train", "train", 6), ("test", "t10k", 4)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        server.files[f"{prefix}/{stem}-images-idx3-ubyte.gz"] = gzip.compress(_idx(x))
        server.files[f"{prefix}/{stem}-labels-idx1-ubyte.gz"] = gzip.compress(_idx(y))
        ref[split] = (x, y)
    return ref


def test_cli_mnist_synthetic_no_verify(server, tmp_path, rng, capsys):
    ref = _serve_synthetic_mnist(server, rng)
    args = ["download", "mnist", "--data-dir", str(tmp_path), "--mirror", server.url("/mnist/"), "--no-verify"]
    assert cli.main(args + ["--quiet"]) == 0
    for split in ("train", "test"):
        x, y = D.load_mnist(split, data_dir=tmp_path, verify=False)
        np.testing.assert_array_equal(x[:, 0], ref[split][0])
        np.testing.assert_array_equal(y, ref[split][1])
    assert len(server.requests) == 4
    assert cli.main(args) == 0  # second run: everything is there, nothing is fetched
    assert len(server.requests) == 4 and "already in" in capsys.readouterr().out


def test_cli_mnist_verified_against_real_files(server, shared_dir, tmp_path, capsys):
    """Serve the real MNIST files: with verification on (the default) they pass and get stamped."""
    for p in (shared_dir / "data" / "mnist").glob("*.gz"):
        server.files[f"/m/{p.name}"] = p.read_bytes()
    assert cli.main(["download", "mnist", "--data-dir", str(tmp_path), "--mirror", server.url("/m")]) == 0
    out = capsys.readouterr().out
    assert "train-images-idx3-ubyte.gz downloaded and verified" in out and "ready in" in out
    for name in D._MNIST.files:
        assert is_verified(tmp_path / "mnist" / (name + ".gz"), {"sha256": D._MNIST.files[name].sha256})
    x, y = D.load_mnist("test", data_dir=tmp_path)
    ref = np.load(shared_dir / "data" / "subsets" / "mnist_test_first1000.npz")
    np.testing.assert_array_equal(x[:1000, 0], ref["images"])
    n = len(server.requests)
    assert cli.main(["download", "mnist", "--data-dir", str(tmp_path), "--mirror", server.url("/m")]) == 0
    assert len(server.requests) == n and "(checksums verified)" in capsys.readouterr().out


def test_cli_mnist_checksum_mismatch(server, tmp_path, rng, capsys):
    _serve_synthetic_mnist(server, rng)
    code = cli.main(["download", "mnist", "--data-dir", str(tmp_path), "--mirror", server.url("/mnist"),
                     "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "checksum mismatch for train-images-idx3-ubyte.gz" in err
    assert "expected sha256 ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db" in err
    assert not any((tmp_path / "mnist").iterdir())  # no final file, no part file


def test_cli_404(server, tmp_path, capsys):
    code = cli.main(["download", "fashion_mnist", "--data-dir", str(tmp_path), "--mirror", server.url("/none"),
                     "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and server.url("/none/train-images-idx3-ubyte.gz") in err and "HTTP 404" in err


def _cifar_archive(rng, n=3, extra=()):
    members, ref = [({"name": "cifar-10-batches-bin", "type": tarfile.DIRTYPE}, None)], {}
    for name in ["data_batch_%d.bin" % i for i in range(1, 6)] + ["test_batch.bin"]:
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        data = b"".join(bytes([int(lab)]) + img.tobytes() for img, lab in zip(x, y))  # label, R, G, B planes
        members.append(({"name": f"cifar-10-batches-bin/{name}"}, data))
        ref[name] = (x, y)
    members.append(({"name": "cifar-10-batches-bin/batches.meta.txt"}, "\n".join(D.CIFAR10_CLASSES).encode()))
    return _tar(members + list(extra)), ref


def test_cli_cifar10(server, tmp_path, rng, capsys):
    archive, ref = _cifar_archive(rng)
    server.files["/c/cifar-10-binary.tar.gz"] = archive
    args = ["download", "cifar10", "--data-dir", str(tmp_path), "--mirror", server.url("/c/"), "--quiet"]
    assert cli.main(args + ["--no-verify"]) == 0
    x, y = D.load_cifar10("test", data_dir=tmp_path, verify=False)
    np.testing.assert_array_equal(x, ref["test_batch.bin"][0])
    np.testing.assert_array_equal(y, ref["test_batch.bin"][1])
    x, _ = D.load_cifar10("train", data_dir=tmp_path, verify=False)
    np.testing.assert_array_equal(x, np.concatenate([ref[f"data_batch_{i}.bin"][0] for i in range(1, 6)]))
    assert not (tmp_path / "cifar10" / "cifar-10-binary.tar.gz").exists()  # removed after extraction

    # With verification (the default), synthetic data is rejected, named, and nothing is left behind.
    other = tmp_path / "verified"
    code = cli.main(["download", "cifar10", "--data-dir", str(other), "--mirror", server.url("/c/"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "data_batch_1.bin" in err and "expected sha256 cee916563c9f80d84e3c" in err
    assert not list((other / "cifar10" / "cifar-10-batches-bin").glob("*.bin"))
    assert not (other / "cifar10" / "cifar-10-binary.tar.gz").exists()

    # --keep-archive keeps it; an archive with an unsafe member is refused as a whole.
    keep = tmp_path / "keep"
    assert cli.main(["download", "cifar10", "--data-dir", str(keep), "--mirror", server.url("/c/"), "--quiet",
                     "--no-verify", "--keep-archive"]) == 0
    assert (keep / "cifar10" / "cifar-10-binary.tar.gz").exists()
    evil, _ = _cifar_archive(rng, extra=[({"name": "../../evil.txt"}, b"x")])
    server.files["/evil/cifar-10-binary.tar.gz"] = evil
    code = cli.main(["download", "cifar10", "--data-dir", str(tmp_path / "e"), "--mirror", server.url("/evil"),
                     "--quiet", "--no-verify"])
    assert code == 2 and "'..' in the path" in capsys.readouterr().err
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "e" / "cifar10" / "cifar-10-batches-bin").exists()


def test_cli_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "minisd.cli", "download", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--mirror" in out.stdout and "fashion_mnist" in out.stdout


def test_cli_unwritable_data_dir(server, tmp_path, rng, capsys):
    """A data dir that cannot be written (here a regular file in the way; a read-only folder does not stop root,
    which CI runs as) gives a one-line error, not a traceback."""
    _serve_synthetic_mnist(server, rng)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    code = cli.main(["download", "mnist", "--data-dir", str(blocker), "--mirror", server.url("/mnist"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write the files" in err and str(blocker) in err
