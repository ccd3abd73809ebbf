"""A model repository fetched from a URL (trace_rt/serving/remote.py): a real HTTP server
(http.server in a thread) and a real S3 endpoint (moto's server, spoken to by boto3 over
HTTP), files checked against repository.json, placed atomically, cached."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from trace_rt.serving.remote import (
    INDEX_FILE,
    FetchError,
    fetch_repository,
    parse_index,
    resolve_repository,
    write_index,
)

ROOT = Path(__file__).resolve().parents[1]


def make_repo(root: Path) -> Path:
    """A repository-shaped tree: a config, a shared (hard-linked) artifact, a 2 MiB file."""
    (root / "m" / "1" / "artifacts").mkdir(parents=True)
    (root / "m" / "config.pbtxt").write_text('name: "m"\nbackend: "python"\n')
    (root / "m" / "1" / "model.py").write_text("print('hi')\n")
    big = root / "m" / "1" / "artifacts" / "decoder.onnx"
    big.write_bytes(os.urandom(2 << 20))
    (root / "g" / "1").mkdir(parents=True)
    os.link(big, root / "g" / "1" / "decoder.onnx")
    write_index(root)
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


class Handler(http.server.SimpleHTTPRequestHandler):
    fail_next: ClassVar[list[int]] = []  # HTTP statuses to answer before serving normally
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        Handler.requests.append(self.path)
        if Handler.fail_next:
            self.send_error(Handler.fail_next.pop(0))
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path) -> Iterator[tuple[str, Path]]:
    """(base URL, served directory) of a repository behind a local HTTP server."""
    src = make_repo(tmp_path / "www" / "repo")
    Handler.fail_next, Handler.requests = [], []
    handler = functools.partial(Handler, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/repo", src
    finally:
        server.shutdown()
        server.server_close()


def test_write_index_lists_every_file_with_size_and_sha256(tmp_path):
    root = make_repo(tmp_path / "repo")
    index = json.loads((root / INDEX_FILE).read_text())
    files = tree(root)
    del files[INDEX_FILE]
    assert sorted(index["files"]) == sorted(files)
    for rel, data in files.items():
        rec = index["files"][rel]
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_fetch_over_http_places_the_same_tree_and_caches_it(served, tmp_path):
    url, src = served
    logs: list[str] = []
    got = fetch_repository(url, tmp_path / "cache", log=logs.append)
    assert tree(got) == tree(src)
    # The two names of one artifact were downloaded once and linked.
    big = [r for r in Handler.requests if r.endswith("decoder.onnx")]
    assert len(big) == 1
    assert (
        os.stat(got / "g/1/decoder.onnx").st_ino
        == os.stat(got / "m/1/artifacts/decoder.onnx").st_ino
    )
    assert any("4 files" in m for m in logs)
    # Again: only the index is read.
    Handler.requests.clear()
    assert fetch_repository(url, tmp_path / "cache") == got
    assert Handler.requests == [f"/repo/{INDEX_FILE}"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [got.name]  # no staging left


def test_a_rebuilt_repository_is_a_new_cache_entry(served, tmp_path):
    url, src = served
    first = fetch_repository(url, tmp_path / "cache")
    (src / "m" / "config.pbtxt").write_text('name: "m"\nbackend: "python"\nmax_batch_size: 0\n')
    write_index(src)
    second = fetch_repository(url, tmp_path / "cache")
    assert second != first and tree(second) == tree(src)


def test_a_corrupt_file_fails_the_fetch_and_places_nothing(served, tmp_path):
    url, src = served
    with open(src / "m" / "1" / "artifacts" / "decoder.onnx", "r+b") as f:  # both links
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))  # same size, other bytes
    with pytest.raises(FetchError, match=r"/repo/g/1/decoder.onnx: sha256 .* does not match"):
        fetch_repository(url, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_resized_file_fails_the_fetch(served, tmp_path):
    url, src = served
    with open(src / "m" / "1" / "model.py", "a") as f:
        f.write("# grew\n")
    with pytest.raises(FetchError, match=r"m/1/model.py: larger, the index says 12 bytes"):
        fetch_repository(url, tmp_path / "cache")


def test_missing_files_and_indexes_are_named(served, tmp_path):
    url, src = served
    (src / "m" / "1" / "model.py").unlink()
    with pytest.raises(FetchError, match=r"/repo/m/1/model.py: not found \(HTTP 404\)"):
        fetch_repository(url, tmp_path / "cache")
    with pytest.raises(FetchError, match=rf"/nothing/{INDEX_FILE}: not found \(HTTP 404\)"):
        fetch_repository(url.replace("/repo", "/nothing"), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_transient_errors_are_retried_then_reported(served, tmp_path, monkeypatch):
    monkeypatch.setattr("trace_rt.serving.remote.time.sleep", lambda s: None)
    url, src = served
    Handler.fail_next = [503, 502]  # the index fails twice, then is served
    got = fetch_repository(url, tmp_path / "cache")
    assert tree(got) == tree(src)
    Handler.fail_next = [503, 503, 503]
    with pytest.raises(FetchError, match=r"HTTP 503 .*\(after 3 attempts\)"):
        fetch_repository(url, tmp_path / "cache2")
    Handler.fail_next = [403]
    with pytest.raises(FetchError, match=r"access denied \(HTTP 403\)"):
        fetch_repository(url, tmp_path / "cache3")
    with pytest.raises(FetchError, match=r"cannot reach http://127\.0\.0\.1:9/"):
        fetch_repository("http://127.0.0.1:9/repo", tmp_path / "cache4")


@pytest.mark.parametrize(
    "rel",
    ["../evil", "/etc/passwd", "a/../../b", "a//b", "a\\b", "./a", INDEX_FILE],
)
def test_index_paths_must_stay_inside(rel):
    data = json.dumps(
        {"format": "trace-rt-repository/1", "files": {rel: {"bytes": 1, "sha256": "0" * 64}}}
    ).encode()
    with pytest.raises(FetchError, match="unsafe path"):
        parse_index(data, "x")


def test_bad_indexes_are_refused():
    with pytest.raises(FetchError, match="not valid JSON"):
        parse_index(b"<html>", "x")
    with pytest.raises(FetchError, match="format 'v0'"):
        parse_index(b'{"format": "v0", "files": {}}', "x")
    bad = {"format": "trace-rt-repository/1", "files": {"a": {"bytes": 1, "sha256": "xyz"}}}
    with pytest.raises(FetchError, match="bad record for 'a'"):
        parse_index(json.dumps(bad).encode(), "x")


def test_stale_staging_directories_are_removed(served, tmp_path):
    url, _ = served
    cache = tmp_path / "cache"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    (cache / f".partial-abc-{dead}-x1").mkdir(parents=True)
    (cache / f".partial-abc-{os.getpid()}-x2").mkdir()  # a live download: kept
    got = fetch_repository(url, cache)
    names = sorted(p.name for p in cache.iterdir())
    assert names == sorted([got.name, f".partial-abc-{os.getpid()}-x2"])


def test_resolve_leaves_local_paths_alone_and_refuses_other_schemes(tmp_path):
    assert resolve_repository(tmp_path) == tmp_path
    assert resolve_repository(f"file://{tmp_path}") == tmp_path
    with pytest.raises(FetchError, match="cannot fetch gs:// repositories"):
        resolve_repository("gs://bucket/repo", tmp_path)


# ---- S3, through moto's server -------------------------------------------------------------
@pytest.fixture
def s3(tmp_path, monkeypatch) -> Iterator[tuple[object, str]]:
    """(boto3 client, endpoint) of a moto S3 server; boto3 reads the endpoint from
    AWS_ENDPOINT_URL, as it would for MinIO."""
    pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    import boto3

    from trace_rt.serving.server import free_ports

    port = free_ports(1)[0]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    try:
        yield boto3.client("s3"), endpoint
    finally:
        server.stop()


def upload(client, root: Path, bucket: str, prefix: str) -> None:
    client.create_bucket(Bucket=bucket)
    for p in root.rglob("*"):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(root).as_posix()}")


def test_fetch_from_s3(s3, tmp_path):
    client, _ = s3
    src = make_repo(tmp_path / "repo")
    upload(client, src, "models", "trace/repo")
    got = fetch_repository("s3://models/trace/repo/", tmp_path / "cache")
    assert tree(got) == tree(src)
    # A corrupt object is caught like a corrupt HTTP file.
    client.put_object(Bucket="models", Key="trace/repo/m/1/model.py", Body=b"print('HI')\n")
    shutil.rmtree(got)
    with pytest.raises(FetchError, match=r"s3://models/trace/repo/m/1/model.py: sha256"):
        fetch_repository("s3://models/trace/repo", tmp_path / "cache")


def test_s3_errors_are_named(s3, tmp_path, monkeypatch):
    client, _ = s3
    upload(client, make_repo(tmp_path / "repo"), "models", "repo")
    with pytest.raises(FetchError, match=rf"s3://models/other/{INDEX_FILE}: not found"):
        fetch_repository("s3://models/other", tmp_path / "cache")
    with pytest.raises(FetchError, match="bucket 'nobucket' does not exist"):
        fetch_repository("s3://nobucket/repo", tmp_path / "cache")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(FetchError, match="no AWS credentials"):
        fetch_repository("s3://models/repo", tmp_path / "cache")


def test_fetch_repo_command_prints_the_directory(served, tmp_path):
    url, src = served
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "trace_rt", "fetch-repo", url, "--cache-dir", str(tmp_path / "c")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert tree(Path(done.stdout.strip())) == tree(src)
    assert "4 files" in done.stderr
    bad = subprocess.run(
        [*cmd[:4], url + "-missing", *cmd[5:]], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().endswith(f"/repo-missing/{INDEX_FILE}: not found (HTTP 404)")


def test_fetch_repo_link_is_replaced_atomically(served, tmp_path):
    url, src = served
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "trace_rt", "fetch-repo", url, "--cache-dir", str(cache)]
    cmd += ["--link", str(cache / "repo"), "--quiet"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and first.stderr == "", first.stderr
    assert os.readlink(cache / "repo") == Path(first.stdout.strip()).name  # relative
    assert tree(cache / "repo") == tree(src)
    (src / "m" / "config.pbtxt").write_text('name: "m"\n')
    write_index(src)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    assert os.readlink(cache / "repo") == Path(second.stdout.strip()).name != first.stdout
    assert (cache / "repo" / "m" / "config.pbtxt").read_text() == 'name: "m"\n'
    (tmp_path / "dir").mkdir()
    cmd[-2] = str(tmp_path / "dir")
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "exists and is not a symbolic link" in refused.stderr


# ---- a real repository, served from a URL -------------------------------------------------
@pytest.fixture(scope="module")
def built(tiny_ckpt, tmp_path_factory) -> Path:
    from export.onnx_export import export_onnx
    from triton_repo.build import build_repository

    root = tmp_path_factory.mktemp("fetch-built")
    art = export_onnx(tiny_ckpt, root / "art", progress=False)
    return build_repository(art, root / "www" / "repo", progress=False)


def test_build_writes_an_index_of_every_file(built):
    index = json.loads((built / INDEX_FILE).read_text())
    files = {p.relative_to(built).as_posix(): p for p in built.rglob("*") if p.is_file()}
    del files[INDEX_FILE]
    assert sorted(index["files"]) == sorted(files)
    assert any(rel.startswith("trace_pipeline/1/artifacts/") for rel in files)
    for rel, path in files.items():  # hashes taken from the manifest are the files' own
        data = path.read_bytes()
        assert index["files"][rel] == {
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }, rel


@pytest.mark.slow
def test_serve_a_repository_from_its_url(built, clip_video, tmp_path):
    from trace_rt.serving.client import TraceClient
    from trace_rt.serving.server import free_ports

    handler = functools.partial(Handler, directory=str(built.parent))
    Handler.fail_next, Handler.requests = [], []
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    grpc, http_port, metrics = free_ports(3)
    url = f"http://127.0.0.1:{web.server_address[1]}/repo"
    cmd = [sys.executable, "-m", "trace_rt", "serve", "--repo", url, "--cache-dir"]
    cmd += [str(tmp_path / "cache"), "--grpc-port", str(grpc), "--http-port", str(http_port)]
    cmd += ["--metrics-port", str(metrics)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("ready: "):
                break
        assert lines and lines[-1].startswith("ready: "), "".join(lines)
        (entry,) = (tmp_path / "cache").iterdir()
        assert any(f"-> {entry}" in line for line in lines)  # served from the fetched copy
        with TraceClient(f"127.0.0.1:{grpc}") as c:
            result = c.infer(clip_video, max_new_tokens=4)
        assert result["stop_reason"] in ("eos", "max_new_tokens")
        proc.terminate()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        web.shutdown()
        web.server_close()


def test_a_cache_that_is_a_file_is_named(served, tmp_path):
    url, _ = served
    (tmp_path / "file").write_text("")
    with pytest.raises(FetchError, match=r"cannot write the repository cache .*file"):
        fetch_repository(url, tmp_path / "file")


def test_concurrent_fetches_of_one_repository_place_it_once(served, tmp_path):
    """Replicas starting together on one cache: each downloads, one rename wins, the
    others find the entry in place and drop their copies."""
    url, src = served
    got: list[Path] = []
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def fetch() -> None:
        start.wait()
        try:
            got.append(fetch_repository(url, tmp_path / "cache"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(got) == 3 and len(set(got)) == 1
    assert tree(got[0]) == tree(src)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [got[0].name]
