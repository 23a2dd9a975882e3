"""Fetching files over HTTP(S) with resume and checksums, verification stamps, and safe tar extraction.

Only the standard library (urllib, hashlib, tarfile) and tqdm are used: no `requests`.

    download(url, dest, sha256=None, md5=None, check=None)   ->  dest (Path)

How a download proceeds:
  1. Bytes go to `dest.part`, never to `dest`. If `dest.part` already holds n bytes (an earlier run was cut off),
     the request carries `Range: bytes=n-`. A server that supports ranges answers 206 Partial Content and only the
     remaining bytes are fetched and appended. A server that ignores ranges answers 200 with the whole file: the
     part file is truncated and the download restarts cleanly (appending a full body to a half file would corrupt
     it silently).
  2. A transfer cut off mid-way (connection reset, timeout, fewer bytes than Content-Length) is retried `retries`
     times, each retry resuming from what is already on disk. After the last retry the part file is kept and the
     error says to run the same command again to resume.
  3. When complete, the part file is checked (sha256 / md5 of its bytes, and an optional `check(path)` callable,
     e.g. a checksum of the decompressed content). On a mismatch the part file is deleted (resuming a corrupt file
     would keep it corrupt) and a ChecksumError names the file, the expected and the actual hash.
  4. Only then is it renamed to `dest` (os.replace is atomic on one file system), so `dest` existing means
     "complete and verified": an interrupted or corrupt download never leaves a file under the final name.

Verification stamps: hashing a 180 MB dataset on every load would be wasted time, so a verified file gets a small
`<file>.verified` JSON next to it recording the file's size, its mtime (ns) and the digests that were checked. A
later check trusts the stamp only while size and mtime are unchanged and the expected digests are the same; any
edit, re-download or table change invalidates it. Only `minisd download` / datasets.verify_dataset write stamps
(best-effort: a read-only folder just gets verified again next time); dataset loaders only read them.

Safe extraction: `safe_extract_tar` validates every member before writing anything: no absolute paths, no `..`
components, nothing that resolves outside the target folder, and only regular files and folders (no symlinks,
hard links or device files: the dataset archives contain none, so any link is refused). Files are written by
us from `extractfile()` streams, so the archive's owners, permissions and timestamps are not applied.

References:
  HTTP range requests, 206 / 416:  https://www.rfc-editor.org/rfc/rfc9110#name-range-requests
  tarfile extraction hazards:      https://docs.python.org/3.11/library/tarfile.html#tarfile-extraction-filter
"""
import gzip
import hashlib
import http.client
import json
import os
import re
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from .errors import UserError

USER_AGENT = "minisd-download/0.1 (+urllib)"
_CHUNK = 1 << 20  # 1 MiB reads: large enough that Python overhead is negligible, small enough for a live bar


class DownloadError(UserError):
    """An HTTP error or a network failure; the message names the URL and what to do next."""


class ChecksumError(UserError):
    """A file's content does not match its published checksum; the message names file, expected and actual."""


# ----------------------------------------------------------------------------------------------------------------
# hashing

def _is_gzip(path):
    """True if the file starts with the gzip magic bytes 1f 8b (the extension is not trusted)."""
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def file_digests(path, algorithms=("sha256",), decompress=False):
    """Hex digests of a file's bytes, streamed in 1 MiB chunks. With decompress=True and a gzip file, the digests
    are of the decompressed content (what the dataset checksums describe; see minisd/datasets.py)."""
    hashers = {a: hashlib.new(a) for a in algorithms}
    gz = decompress and _is_gzip(path)
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                for h in hashers.values():
                    h.update(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ChecksumError(f"{path}: cannot decompress it ({type(e).__name__}: {e}): the gzip file is truncated "
                            f"or corrupt. Delete it and download it again.") from None
    return {a: h.hexdigest() for a, h in hashers.items()}


def check_digests(name, actual, expected, hint=""):
    """Raise ChecksumError unless every expected digest ({algorithm: hex}) equals the actual one.
    `name` is the file as the user knows it; `hint` says what to do (e.g. which command re-downloads it)."""
    for algo, want in expected.items():
        if want is None:
            continue
        got = actual[algo]
        if got.lower() != want.lower():
            raise ChecksumError(
                f"checksum mismatch for {name}: expected {algo} {want.lower()}, got {got}. The file is corrupt, "
                f"incomplete or not the official one." + (f" {hint}" if hint else ""))


# ----------------------------------------------------------------------------------------------------------------
# verification stamps: "<file>.verified" = {"size", "mtime_ns", "digests"}

def stamp_path(path):
    path = Path(path)
    return path.with_name(path.name + ".verified")


def is_verified(path, expected):
    """True if `path` carries a stamp for exactly these expected digests and has not changed since (same size and
    modification time in ns). Never raises: an unreadable or malformed stamp just means "not verified"."""
    try:
        st = os.stat(path)
        stamp = json.loads(stamp_path(path).read_text())
        want = {a: d.lower() for a, d in expected.items() if d is not None}
        return (stamp.get("size") == st.st_size and stamp.get("mtime_ns") == st.st_mtime_ns
                and stamp.get("digests") == want)
    except (OSError, ValueError, AttributeError):
        return False


def mark_verified(path, expected):
    """Write the stamp for `path` (best-effort: a read-only folder is fine, verification then just repeats)."""
    st = os.stat(path)
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "digests": {a: d.lower() for a, d in expected.items() if d is not None}}
    try:
        stamp_path(path).write_text(json.dumps(stamp, sort_keys=True) + "\n")
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------------------------
# HTTP download with resume

def _content_range(resp):
    """(start, total) from 'Content-Range: bytes START-END/TOTAL' (206) or 'bytes */TOTAL' (416); None if absent
    or '*'."""
    m = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", resp.headers.get("Content-Range", ""))
    if not m:
        return None, None
    start, total = m.groups()
    return (None if start is None else int(start)), (None if total == "*" else int(total))


def _http_error_message(url, err, dest):
    what = {404: "the file is not there (check the URL, or the --mirror base URL)",
            403: "access is refused (the server may block this client, or the mirror moved)",
            416: "the requested byte range is not available"}.get(err.code, "the server refused the request")
    return (f"download: {url} answered HTTP {err.code} {err.reason}: {what}. Check the URL or use another mirror "
            f"(--mirror URL), or fetch the file by hand and place it at {dest}.")


def download(url, dest, sha256=None, *, md5=None, check=None, retries=2, timeout=60.0, progress=True,
             retry_wait=1.0):
    """Fetch `url` to `dest` (resumable, verified, atomic). Returns dest as a Path.

    sha256 / md5: expected hex digest of the downloaded bytes, or None.
    check:        optional callable(part_path) run on the complete file before the rename; it raises (e.g. a
                  ChecksumError on the decompressed content) to reject the file, which is then deleted.
    retries:      how many times a cut-off transfer is resumed automatically before giving up.
    timeout:      seconds of socket inactivity before a transfer counts as cut off.
    progress:     show a tqdm progress bar on stderr.
    Raises DownloadError (HTTP error, network failure; the partial file is kept for a later resume) or
    ChecksumError (the partial file is deleted).
    """
    from tqdm import tqdm  # runtime dependency; imported here so `import minisd.download` stays light

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error = None
    failures, last_error = 0, None  # failures counts cut-off or failed transfers; deliberate restarts are free
    while True:
        if failures > retries:
            kept = (f" The {part.stat().st_size}-byte partial file {part} is kept: run the same command again to "
                    f"resume." if part.exists() else "")
            raise DownloadError(
                f"download: failed to fetch {url} after {failures} attempt(s) ({last_error}).{kept} If this "
                f"machine has no internet access, download the file elsewhere and place it at {dest}, or point "
                f"--mirror at a server that has it.")
        if failures and last_error is not None:
            time.sleep(retry_wait * failures)  # a short, growing pause before resuming a cut-off transfer
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:
                # Nothing left after `offset`: either the part file is already complete (an earlier run died
                # between the last byte and the rename) or it is longer than the file now on the server.
                _, total = _content_range(e)
                e.close()
                if total == offset:
                    break
                part.unlink()  # restart from byte 0 (no Range header next time, so this happens at most once)
                continue
            e.close()
            raise DownloadError(_http_error_message(url, e, dest)) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            failures, last_error = failures + 1, f"could not connect: {getattr(e, 'reason', e)}"
            continue

        with resp:
            status = resp.status if resp.status is not None else 200  # file:// URLs have no status
            if status == 206:
                start, total = _content_range(resp)
                if start != offset:
                    part.unlink()  # a range we did not ask for: do not guess, start over from byte 0
                    continue
                mode = "ab"
            elif status == 200:
                # The server ignored Range (or there was nothing to resume): the body is the whole file.
                mode, offset = "wb", 0
                length = resp.headers.get("Content-Length")
                total = int(length) if length is not None and length.isdigit() else None
            else:
                raise DownloadError(f"download: {url} answered HTTP {status}, expected 200 or 206. Check the URL "
                                    f"or use another mirror (--mirror URL).")
            bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=dest.name, disable=not progress, leave=False)
            try:
                with open(part, mode) as f:
                    while True:
                        chunk = resp.read(_CHUNK)
                        if not chunk:
                            break
                        f.write(chunk)
                        bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                # IncompleteRead, ConnectionResetError, TimeoutError: keep what arrived and resume
                failures, last_error = failures + 1, f"transfer cut off: {type(e).__name__}: {e}"
                continue
            finally:
                bar.close()
        size = part.stat().st_size
        if total is not None and size != total:
            failures, last_error = failures + 1, f"transfer cut off after {size} of {total} bytes"
            continue
        break

    expected = {"sha256": sha256, "md5": md5}
    expected = {a: d for a, d in expected.items() if d is not None}
    try:
        if expected:
            check_digests(f"{dest.name} (downloaded from {url})", file_digests(part, tuple(expected)), expected,
                          hint="The bad download was deleted; try again or use another mirror.")
        if check is not None:
            check(part)
    except Exception:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


# ----------------------------------------------------------------------------------------------------------------
# safe tar extraction

def _member_target(target, name):
    """Where member `name` would land under `target`, or a reason it is refused."""
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return None, "absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return None, "'..' in the path"
    out = (target / name).resolve()
    if out != target and target not in out.parents:
        return None, "resolves outside the target folder"
    return out, None


def safe_extract_tar(archive, target):
    """Extract a (gzipped) tar archive into `target`, refusing anything that could write outside it.

    Every member is checked before anything is written; one bad member refuses the whole archive. Allowed:
    regular files and folders with relative paths. Refused: absolute paths, `..`, paths that resolve outside
    `target` (e.g. through an existing symlink), symlinks, hard links, devices, FIFOs.
    Returns the list of extracted file paths.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    target = target.resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            plan = []
            for m in members:
                out, why = _member_target(target, m.name)
                if why is None and not (m.isreg() or m.isdir()):
                    kind = "symlink" if m.issym() else "hard link" if m.islnk() else "special file"
                    why = f"{kind} (only regular files and folders are extracted)"
                if why is not None:
                    raise UserError(f"refusing to extract {archive}: member {m.name!r} is unsafe ({why}). "
                                    f"Nothing was extracted. The archive is not the official one; delete it.")
                plan.append((m, out))
            written = []
            for m, out in plan:
                if m.isdir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(out.name + ".extracting")
                src = tar.extractfile(m)
                with src, open(tmp, "wb") as f:
                    while True:
                        chunk = src.read(_CHUNK)
                        if not chunk:
                            break
                        f.write(chunk)
                os.replace(tmp, out)
                written.append(out)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise UserError(f"cannot extract {archive}: {type(e).__name__}: {e}. The archive is truncated or "
                        f"corrupt; delete it and download it again.") from None
    return written
