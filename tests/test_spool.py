"""What ``dermscore serve`` acknowledged survives a crash of the local stack (infra.spool).

The crash test runs the real command twice on one ``--out``: uploads through the moto server over
HTTP, SIGKILL before they are all scored, a restart, then every upload is exactly one row.
"""

from __future__ import annotations

import io
import signal
import time
from collections import Counter
from pathlib import Path

import boto3
import pyarrow.parquet as pq
from boto3.s3.transfer import TransferConfig
from conftest import Served, sample_images

from dermscore.template import LOCAL_REGION
from infra.motoserver import start_server
from infra.spool import SPOOL, Entry, Spool, created_object


def test_the_requests_that_create_an_object_are_recognised() -> None:
    def env(method: str, uri: str, host: str = "127.0.0.1:9000") -> dict:
        return {"REQUEST_METHOD": method, "RAW_URI": uri, "HTTP_HOST": host}

    assert created_object(env("PUT", "/b/incoming/a%20b%2Bc%C3%A9.jpg")) == ("b", "incoming/a b+cé.jpg")
    assert created_object(env("PUT", "/incoming/x.jpg", host="b.localhost:9000")) == ("b", "incoming/x.jpg")
    assert created_object(env("POST", "/b/incoming/big.jpg?uploadId=u1")) == ("b", "incoming/big.jpg")
    for not_one in (env("PUT", "/b/incoming/big.jpg?partNumber=1&uploadId=u1"),   # a part: not an object yet
                    env("POST", "/b/incoming/big.jpg?uploads"), env("GET", "/b/incoming/a.jpg"),
                    env("DELETE", "/b/incoming/a.jpg"), env("PUT", "/b")):
        assert created_object(not_one) is None, not_one


def test_what_the_server_acknowledged_under_incoming_is_on_disk(tmp_path: Path, aws_env: str) -> None:
    """PutObject, a multipart upload and CopyObject under incoming/ are spooled with their ETags
    before the client has its answer; other prefixes and other buckets are not."""
    spool = Spool(tmp_path / SPOOL, "spooled")
    server, endpoint = start_server(spool=spool)
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name=LOCAL_REGION)
        for bucket in ("spooled", "other"):
            s3.create_bucket(Bucket=bucket)
        small, big = b"small image", bytes(range(256)) * 24_000   # 6 MB: two parts at a 5 MB threshold
        etag = s3.put_object(Bucket="spooled", Key="incoming/a b+é.jpg", Body=small)["ETag"].strip('"')
        s3.upload_fileobj(io.BytesIO(big), "spooled", "incoming/big.jpg",
                          Config=TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20))
        s3.copy_object(Bucket="spooled", Key="incoming/copy.jpg", CopySource={"Bucket": "spooled",
                                                                             "Key": "incoming/a b+é.jpg"})
        s3.put_object(Bucket="spooled", Key="results/images/a.json", Body=b"{}")
        s3.put_object(Bucket="other", Key="incoming/a.jpg", Body=small)
        entries = {e.key: e for e in spool.entries()}
        assert sorted(entries) == ["incoming/a b+é.jpg", "incoming/big.jpg", "incoming/copy.jpg"]
        assert entries["incoming/a b+é.jpg"] == Entry("spooled", "incoming/a b+é.jpg", etag)
        big_etag = s3.head_object(Bucket="spooled", Key="incoming/big.jpg")["ETag"].strip('"')
        assert entries["incoming/big.jpg"].etag == big_etag and big_etag.endswith("-2")
        assert (spool.folder / f"{entries['incoming/big.jpg'].name}.bin").read_bytes() == big
        assert not list(spool.folder.glob("*.tmp"))
    finally:
        server.stop()


def exported_rows(out: Path) -> Counter:
    """(image key, ETag) -> rows of it in the export (predictions and failures)."""
    rows: Counter = Counter()
    for table in ("predictions", "failures"):
        for path in (out / table).rglob("*.parquet"):
            rows.update((r["image_key"], r["etag"]) for r in pq.read_table(path, columns=["image_key", "etag"])
                        .to_pylist())
    return rows


def wait_for_rows(out: Path, uploads: set, timeout_s: float = 240) -> Counter:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = exported_rows(out)
        if uploads <= set(rows):
            return rows
        time.sleep(0.5)
    raise AssertionError(f"{len(uploads - set(exported_rows(out)))} of {len(uploads)} uploads have no row")


def test_serve_killed_between_upload_and_scoring_loses_nothing(varied_model: Path, tmp_path: Path) -> None:
    """42 uploads acknowledged over HTTP (40 images under their own keys, an empty file, a text
    file): 10 are scored and exported, then 32 more are uploaded and serve is killed with SIGKILL
    before it can score them. Started again on the same --out, it queues what had no row and
    ends with every upload as exactly one row (the 10 are not scored again)."""
    files = sample_images(8)
    out = tmp_path / "out"
    args = ("--web-port", "-1", "--batching-window", "0.5", "--export-interval", "0.5")
    bodies = [(f"incoming/crash/{i:02d}-{f.name}", f.read_bytes()) for i in range(5) for f in files]
    bodies += [("incoming/crash/empty.jpg", b""), ("incoming/crash/notes.jpg", b"not an image")]
    serve = Served(varied_model, out, *args)
    try:
        s3 = serve.s3()

        def upload(items: list) -> set:
            return {(k, s3.put_object(Bucket=serve.bucket, Key=k, Body=b)["ETag"].strip('"')) for k, b in items}

        first = upload(bodies[:10])
        wait_for_rows(out, first)
        rest = upload(bodies[10:])
        serve.proc.send_signal(signal.SIGKILL)
        serve.proc.wait(timeout=30)
    finally:
        if serve.proc.poll() is None:
            serve.proc.kill()
    assert not first | rest <= set(exported_rows(out)), "every upload was scored before the kill: no crash tested"
    again = Served(varied_model, out, *args)
    try:
        rows = wait_for_rows(out, first | rest)
    finally:
        again.stop()
    assert len(first | rest) == 42 and set(rows) == first | rest
    assert all(n == 1 for n in rows.values()), [u for u, n in rows.items() if n > 1]
    restarted = next(ln for ln in again.lines if ln.startswith("Restarted: "))
    assert 0 < int(restarted.split()[1]) <= len(rest)
