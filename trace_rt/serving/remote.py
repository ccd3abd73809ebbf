"""A model repository from a URL: ``trace-rt serve --repo https://...`` or ``s3://...``.

``python -m triton_repo build`` writes ``repository.json`` at the repository's root: every
file's path, size and sha256 (:func:`write_index`). Copied as it is to a web server or a
bucket, the repository can then be served from its URL: :func:`fetch_repository` reads the
index, downloads every file into a staging directory beside the cache entry, checks each
one's size and sha256 as it streams in, and only then renames the staging directory into
place, so a cache entry is complete or absent, never half-written (a killed download leaves
a staging directory, removed by the next fetch). Entries are keyed by the index's own
sha256: a rebuilt repository is a new entry, an unchanged one is not downloaded again.

Sources: ``http://`` and ``https://`` (urllib), ``s3://BUCKET/PREFIX`` (boto3, the ``s3``
extra; credentials and endpoint from boto3's usual chain: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, a profile, an instance role; ``AWS_ENDPOINT_URL`` for an
S3-compatible store such as MinIO or Google Cloud Storage's XML API with HMAC keys), and a
local path or ``file://`` URL (used in place). No torch, no Triton import.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from trace_rt.errors import TraceError

INDEX_FILE = "repository.json"
INDEX_FORMAT = "trace-rt-repository/1"
CACHE_ENV = "TRACE_RT_CACHE"
CHUNK = 1 << 20
ATTEMPTS = 3  # per file, for transient failures (a dropped connection, a 5xx)


class FetchError(TraceError):
    """A repository could not be fetched from its URL (the message says why)."""


class _Transient(Exception):
    """A failure worth another attempt."""


def default_cache_dir() -> Path:
    """``$TRACE_RT_CACHE/repositories``, else ``~/.cache/trace-rt/repositories``."""
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "trace-rt"
    return Path(base) / "repositories"


# ---- the index ----------------------------------------------------------------------------
def write_index(root: str | Path, known: dict[str, str] | None = None) -> Path:
    """Write ``root/repository.json``: every regular file under *root* (but the index),
    with its size and sha256. *known* maps relative paths to sha256s already checked (the
    artifact files the build verified), which are not hashed again."""
    root = Path(root)
    known = known or {}
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        if rel == INDEX_FILE:
            continue
        digest = known.get(rel) or _sha256(path)
        files[rel] = {"bytes": path.stat().st_size, "sha256": digest}
    out = root / INDEX_FILE
    out.write_text(json.dumps({"format": INDEX_FORMAT, "files": files}, indent=1) + "\n")
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def parse_index(data: bytes, where: str) -> dict[str, dict[str, Any]]:
    """The ``files`` of an index, every path and record checked (an index names paths to
    write on this machine: none may leave the repository)."""
    try:
        index = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FetchError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise FetchError(f"{where}: format {got!r}, this runtime reads {INDEX_FORMAT!r}")
    files = index.get("files")
    if not isinstance(files, dict) or not files:
        raise FetchError(f"{where}: no files listed")
    for rel, rec in files.items():
        if (
            not isinstance(rel, str)
            or rel.startswith("/")
            or "\\" in rel
            or any(p in ("", ".", "..") for p in rel.split("/"))
            or rel == INDEX_FILE
        ):
            raise FetchError(f"{where}: unsafe path {rel!r} (must stay inside the repository)")
        ok = (
            isinstance(rec, dict)
            and isinstance(rec.get("bytes"), int)
            and rec["bytes"] >= 0
            and isinstance(rec.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", rec["sha256"])
        )
        if not ok:
            raise FetchError(f"{where}: bad record for {rel!r} (needs bytes and sha256)")
    return files


# ---- sources --------------------------------------------------------------------------------
class HTTPSource:
    """Files under an ``http(s)://`` base URL."""

    def __init__(self, url: str, timeout: float = 60.0):
        self.base = url.rstrip("/") + "/"
        self.timeout = timeout

    def name(self, rel: str) -> str:
        return self.base + urllib.parse.quote(rel)

    def open(self, rel: str) -> BinaryIO:
        url = self.name(rel)
        try:
            return urllib.request.urlopen(url, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise FetchError(f"{url}: not found (HTTP 404)") from None
            if e.code in (401, 403):
                raise FetchError(
                    f"{url}: access denied (HTTP {e.code}); the server wants credentials "
                    "this client does not send: serve the repository publicly on a "
                    "private network, or put it in a bucket (s3://)"
                ) from None
            if e.code >= 500 or e.code == 429:
                raise _Transient(f"{url}: HTTP {e.code} {e.reason}") from None
            raise FetchError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise _Transient(f"cannot reach {url}: {reason}") from None


class S3Source:
    """Objects under ``s3://BUCKET/PREFIX`` (boto3)."""

    def __init__(self, url: str):
        try:
            import boto3
            import botocore.exceptions
        except ImportError:
            raise FetchError(
                f"{url}: s3:// repositories need boto3: pip install 'trace-rt[s3]'"
            ) from None
        parsed = urllib.parse.urlparse(url)
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        if not self.bucket:
            raise FetchError(f"{url}: no bucket (s3://BUCKET/PREFIX)")
        self._errors = botocore.exceptions
        # A session of its own: boto3's default one keeps the credentials it first found.
        self.client = boto3.session.Session().client("s3")

    def name(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self._key(rel)}"

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def open(self, rel: str) -> BinaryIO:
        err = self._errors
        where = self.name(rel)
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"]
        except err.NoCredentialsError:
            raise FetchError(
                f"{where}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "a profile, or give the pod an IAM role)"
            ) from None
        except err.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FetchError(f"{where}: not found") from None
            if code == "NoSuchBucket":
                raise FetchError(f"{where}: bucket {self.bucket!r} does not exist") from None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise FetchError(
                    f"{where}: access denied ({code}); check the credentials"
                ) from None
            if code.startswith("5") or code in ("SlowDown", "InternalError", "RequestTimeout"):
                raise _Transient(f"{where}: {code}") from None
            raise FetchError(f"{where}: {code or e}") from None
        except (err.EndpointConnectionError, err.ConnectionClosedError) as e:
            raise _Transient(f"{where}: {e}") from None


def source_for(url: str) -> HTTPSource | S3Source:
    """The source that reads *url* (http, https or s3); a clear error for other schemes."""
    scheme = urllib.parse.urlparse(url).scheme
    if scheme in ("http", "https"):
        return HTTPSource(url)
    if scheme == "s3":
        return S3Source(url)
    raise FetchError(
        f"{url}: cannot fetch {scheme}:// repositories; use http(s)://, s3:// (with "
        "AWS_ENDPOINT_URL for an S3-compatible store: MinIO, Google Cloud Storage's XML API "
        "with HMAC keys) or a local path"
    )


def is_url(repo: str | os.PathLike) -> bool:
    """Whether *repo* names a remote repository (``scheme://``, not ``file://``)."""
    scheme = urllib.parse.urlparse(str(repo)).scheme
    return len(scheme) > 1 and scheme != "file"  # "C:" is a Windows drive, not a scheme


# ---- fetching -------------------------------------------------------------------------------
def resolve_repository(
    repo: str | os.PathLike,
    cache_dir: str | Path | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> Path:
    """A local directory for *repo*: a local path (or ``file://`` URL) as it is, a remote
    one fetched into *cache_dir* (:func:`fetch_repository`)."""
    text = str(repo)
    if text.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(text).path))
    if not is_url(text):
        return Path(text)
    return fetch_repository(text, cache_dir, log=log)


def fetch_repository(
    url: str,
    cache_dir: str | Path | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Download the repository at *url* into *cache_dir* (default :func:`default_cache_dir`)
    unless it is there already; returns its local directory.

    Raises:
        FetchError: the index or a file is missing, unreadable, or differs from its
            record in the index (size or sha256); credentials are missing; the store
            cannot be reached after a few attempts.
    """
    say = log or (lambda msg: None)
    source = source_for(url)
    raw = _read_all(source, INDEX_FILE)
    files = parse_index(raw, source.name(INDEX_FILE))
    key = hashlib.sha256(raw).hexdigest()[:24]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / key
    if (final / INDEX_FILE).is_file():
        _check_sizes(final, files)
        say(f"repository {url}: cached in {final}")
        return final
    try:
        cache.mkdir(parents=True, exist_ok=True)
        _remove_stale(cache)
        staging = Path(tempfile.mkdtemp(prefix=f".partial-{key}-{os.getpid()}-", dir=cache))
    except OSError as e:
        raise FetchError(
            f"cannot write the repository cache {cache}: {e.strerror} (--cache-dir or "
            f"${CACHE_ENV} names another)"
        ) from None
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would hide it from a server run as another user
        total = sum(r["bytes"] for r in files.values())
        say(f"repository {url}: {len(files)} files, {total / 2**20:.1f} MiB -> {final}")
        _download_all(source, files, staging, say)
        (staging / INDEX_FILE).write_bytes(raw)  # last: marks the entry complete
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / INDEX_FILE).is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another process placed it first
    except OSError as e:  # the cache's disk: full, read-only, ...
        shutil.rmtree(staging, ignore_errors=True)
        raise FetchError(f"writing {url} into {cache} failed: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _download_all(
    source: HTTPSource | S3Source,
    files: dict[str, dict[str, Any]],
    staging: Path,
    say: Callable[[str], None],
) -> None:
    """Every file of the index into *staging*, each checked; files with the same sha256
    (the build hard-links the artifacts into several models) are downloaded once."""
    have: dict[str, Path] = {}
    done_bytes, total = 0, sum(r["bytes"] for r in files.values())
    t0 = time.monotonic()
    for i, (rel, rec) in enumerate(sorted(files.items()), 1):
        dest = staging / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        first = have.get(rec["sha256"])
        if first is not None:
            try:
                os.link(first, dest)
            except OSError:
                shutil.copy2(first, dest)
        else:
            _download(source, rel, rec, dest)
            have[rec["sha256"]] = dest
        done_bytes += rec["bytes"]
        if rec["bytes"] >= 64 << 20 or i == len(files):
            rate = done_bytes / 2**20 / max(time.monotonic() - t0, 1e-6)
            say(f"  {i}/{len(files)} files, {done_bytes / total:.0%} ({rate:.0f} MiB/s)")


def _download(source: HTTPSource | S3Source, rel: str, rec: dict[str, Any], dest: Path) -> None:
    """One file to *dest* (through ``dest.part``), its size and sha256 checked."""
    where = source.name(rel)
    for attempt in range(1, ATTEMPTS + 1):
        part = dest.with_name(dest.name + ".part")
        try:
            digest, size = _stream(source.open(rel), part, rec["bytes"], where)
        except _Transient as e:
            part.unlink(missing_ok=True)
            if attempt == ATTEMPTS:
                raise FetchError(f"{e} (after {ATTEMPTS} attempts)") from None
            time.sleep(0.5 * 2**attempt)
            continue
        if size != rec["bytes"]:
            part.unlink(missing_ok=True)
            got = f"{size} bytes" if size < rec["bytes"] else "larger"  # read stops past it
            raise FetchError(f"{where}: {got}, the index says {rec['bytes']} bytes")
        if digest != rec["sha256"]:
            part.unlink(missing_ok=True)
            raise FetchError(
                f"{where}: sha256 {digest} does not match the index ({rec['sha256']}); "
                "the copy is corrupt or was changed after the build"
            )
        os.rename(part, dest)
        return


def _stream(body: BinaryIO, dest: Path, limit: int, where: str) -> tuple[str, int]:
    """Copy *body* to *dest*, hashing; stops one byte past *limit* (a file that grew)."""
    h = hashlib.sha256()
    size = 0
    try:
        with open(dest, "wb") as f:
            for block in _blocks(body, where):
                size += len(block)
                if size > limit:
                    return h.hexdigest(), size
                h.update(block)
                f.write(block)
    finally:
        body.close()
    return h.hexdigest(), size


def _blocks(body: BinaryIO, where: str) -> Iterator[bytes]:
    while True:
        try:
            block = body.read(CHUNK)
        except (OSError, ValueError) as e:  # a connection dropped mid-file
            raise _Transient(f"{where}: {e}") from None
        except Exception as e:  # botocore's streaming errors are its own classes
            if type(e).__module__.startswith(("botocore", "urllib3", "http")):
                raise _Transient(f"{where}: {e}") from None
            raise
        if not block:
            return
        yield block


def _read_all(source: HTTPSource | S3Source, rel: str) -> bytes:
    where = source.name(rel)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            body = source.open(rel)
            try:
                return b"".join(_blocks(body, where))
            finally:
                body.close()
        except _Transient as e:
            if attempt == ATTEMPTS:
                raise FetchError(f"{e} (after {ATTEMPTS} attempts)") from None
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def _check_sizes(root: Path, files: dict[str, dict[str, Any]]) -> None:
    """A cached entry still holds every file at its size (hashes were checked on download)."""
    for rel, rec in files.items():
        path = root / rel
        if not path.is_file() or path.stat().st_size != rec["bytes"]:
            raise FetchError(
                f"cached repository {root} is damaged ({rel} missing or resized); delete "
                "that directory to download it again"
            )


def _remove_stale(cache: Path) -> None:
    """Staging directories of downloads whose process has gone."""
    for d in cache.glob(".partial-*"):
        m = re.match(r"\.partial-[0-9a-f]+-(\d+)-", d.name)
        if m and not _alive(int(m[1])):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- the command line -----------------------------------------------------------------------
def add_repository_args(p: Any) -> None:
    """``--repo`` (a directory or a URL) and ``--cache-dir``, for ``trace-rt serve``."""
    p.add_argument(
        "--repo",
        required=True,
        help="the model repository: a directory, or a URL to fetch it from (http(s)://, "
        "s3://BUCKET/PREFIX; every file checked against its repository.json)",
    )
    _cache_arg(p)


def _cache_arg(p: Any) -> None:
    p.add_argument(
        "--cache-dir",
        type=Path,
        help=f"where repositories fetched from URLs are kept (default ${CACHE_ENV}/"
        "repositories, else ~/.cache/trace-rt/repositories)",
    )


def add_fetch_parser(sub: Any) -> None:
    """``trace-rt fetch-repo URL``: the download alone (a pod's init container)."""
    p = sub.add_parser(
        "fetch-repo",
        help="download a model repository from a URL into the cache, checked file by file",
        description="Read URL/repository.json (written by `python -m triton_repo build`), "
        "download every file it lists into the cache, check each one's size and sha256, "
        "and place the repository atomically; prints its local directory. An entry "
        "already in the cache is not downloaded again.",
    )
    p.add_argument("url", help="http(s)://... or s3://BUCKET/PREFIX")
    _cache_arg(p)
    p.add_argument(
        "--link",
        type=Path,
        help="also point this symbolic link at the fetched repository (replaced atomically: "
        "a fixed path for tritonserver --model-repository, e.g. in a pod's init container)",
    )
    p.add_argument("--quiet", action="store_true", help="print only the directory")


def fetch_command(args: Any) -> int:
    import sys

    log = None if args.quiet else (lambda msg: print(f"trace-rt: {msg}", file=sys.stderr))
    if not is_url(args.url) or str(args.url).startswith("file://"):
        raise FetchError(f"{args.url}: not a URL (http(s)://... or s3://BUCKET/PREFIX)")
    if args.link is not None and args.link.exists() and not args.link.is_symlink():
        raise FetchError(f"--link {args.link}: exists and is not a symbolic link")
    path = fetch_repository(args.url, args.cache_dir, log=log)
    if args.link is not None:
        link_to(args.link, path)
    print(path)
    return 0


def link_to(link: Path, target: Path) -> None:
    """Make *link* a symbolic link to *target* (relative when they share a directory),
    replacing what was there in one rename, so a reader sees the old or the new one."""
    if link.exists() and not link.is_symlink():
        raise FetchError(f"--link {link}: exists and is not a symbolic link")
    link.parent.mkdir(parents=True, exist_ok=True)
    rel = target.name if target.parent.resolve() == link.parent.resolve() else target.resolve()
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(rel, tmp)
    os.replace(tmp, link)
