"""What ``dermscore serve`` acknowledged survives a crash of the local stack, as an S3 upload does.

moto keeps every bucket and queue in memory. Without more, a local stack killed between an upload
and its row would forget an upload it had answered ``200 OK`` to, while S3 keeps what it
acknowledged and a crashed Lambda only delays it. The spool is the local stand-in for S3's
durability, under ``--out``::

    <out>/spool/<digest>.bin    the object's bytes     written and fsynced before moto's answer to
    <out>/spool/<digest>.json   bucket, key, ETag      the request that created it reaches the client

for every object created under ``incoming/`` (PutObject, CopyObject, CompleteMultipartUpload),
by the WSGI layer :class:`Spooling` in front of moto. On start, :meth:`Spool.restore` puts back
what the exported results (``<out>/predictions``, ``failures``, ``images``) say and re-uploads the
rest::

    1. the uploads that have a row in the export: their spool entries are dropped
    2. the exported image documents go back to results/images/: they are the uploads' claims
       (handlers.claims), so a late duplicate or the same content uploaded again adds no row
    3. every other spooled upload is uploaded again: an S3 event, and the pipeline, as the first time

A row written in the bucket but not yet exported when the stack died is not in the export, so its
upload is scored again: it ends as one row in the export all the same (the new run's file
replaces nothing of the old run's, and the old run's row never reached the export).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import pyarrow.parquet as pq

from dermscore import layout
from dermscore.template import LOCAL_ACCOUNT_ID

log = logging.getLogger("dermscore.spool")

SPOOL = "spool"   # the spool's folder under --out


@dataclass(frozen=True)
class Entry:
    bucket: str
    key: str
    etag: str

    @property
    def name(self) -> str:
        return hashlib.sha256(f"{self.bucket}/{self.key}/{self.etag}".encode()).hexdigest()[:32]


def _write_durably(path: Path, data: bytes) -> None:
    """Write, fsync, then rename: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Spool:
    """The uploads a local stack acknowledged, on disk (see the module's docstring)."""

    def __init__(self, folder: Path, bucket: str) -> None:
        self.folder, self.bucket = Path(folder), bucket
        self.folder.mkdir(parents=True, exist_ok=True)

    def keep(self, entry: Entry, body: bytes) -> None:
        """Spool one created object (bytes first: an entry's description never names missing bytes)."""
        _write_durably(self.folder / f"{entry.name}.bin", body)
        _write_durably(self.folder / f"{entry.name}.json", json.dumps(asdict(entry)).encode())
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)   # the renames too
        finally:
            os.close(fd)

    def entries(self) -> Iterator[Entry]:
        for path in sorted(self.folder.glob("*.json")):
            try:
                yield Entry(**json.loads(path.read_text()))
            except (ValueError, TypeError):
                log.warning("spool entry %s unreadable: skipped", path.name)

    def drop(self, entry: Entry) -> None:
        for suffix in (".json", ".bin"):
            (self.folder / f"{entry.name}{suffix}").unlink(missing_ok=True)

    def restore(self, s3: Any, out: Path) -> dict[str, int]:
        """Put back, after a restart, what the export ``out`` and the spool hold (the module's
        steps 1-3); returns the counts (``settled``, ``documents``, ``uploaded``)."""
        done = exported_outcomes(out)
        counts = {"settled": 0, "documents": 0, "uploaded": 0}
        for doc in sorted((out / "images").rglob("*.json")) if (out / "images").is_dir() else []:
            rel = doc.relative_to(out / "images").as_posix()
            s3.put_object(Bucket=self.bucket, Key=f"{layout.IMAGES}{rel}", Body=doc.read_bytes(),
                          ContentType="application/json")
            counts["documents"] += 1
        for entry in self.entries():
            if entry.bucket != self.bucket or (entry.key, entry.etag) in done:
                self.drop(entry)
                counts["settled"] += 1
                continue
            body = (self.folder / f"{entry.name}.bin").read_bytes()
            etag = s3.put_object(Bucket=self.bucket, Key=entry.key, Body=body)["ETag"].strip('"')
            if etag != entry.etag:   # a multipart upload's ETag: the new single PUT was spooled under its own
                self.drop(entry)
            counts["uploaded"] += 1
        if any(counts.values()):
            log.info("restored after a restart: %d upload(s) uploaded again, %d already had their row, "
                     "%d image document(s) put back", counts["uploaded"], counts["settled"], counts["documents"])
        return counts


def exported_outcomes(out: Path) -> set[tuple[str, str]]:
    """(image key, ETag) of every row exported under ``out`` (predictions and failures)."""
    found: set[tuple[str, str]] = set()
    for table in ("predictions", "failures"):
        for path in sorted((out / table).rglob("*.parquet")) if (out / table).is_dir() else []:
            rows = pq.read_table(path, columns=["image_key", "etag"]).to_pylist()
            found |= {(r["image_key"], r["etag"]) for r in rows}
    return found


# --------------------------------------------------------------------------- the WSGI layer

def created_object(environ: dict[str, Any]) -> tuple[str, str] | None:
    """(bucket, key) of the object a request would create (PutObject, CopyObject,
    CompleteMultipartUpload; path-style or virtual-hosted), or None (UploadPart, anything else)."""
    method = environ.get("REQUEST_METHOD")
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO", "")
    path, _, query = raw.partition("?")
    params = parse_qs(query, keep_blank_values=True)
    if not ((method == "PUT" and "partNumber" not in params) or (method == "POST" and "uploadId" in params)):
        return None
    host = environ.get("HTTP_HOST", "").split(":")[0]
    parts = unquote(path).lstrip("/")
    if host.endswith(".localhost"):   # virtual-hosted style: <bucket>.localhost
        bucket, key = host[:-len(".localhost")], parts
    else:
        bucket, _, key = parts.partition("/")
    return (bucket, key) if bucket and key else None


class Spooling:
    """WSGI middleware before moto's app: an object created under ``incoming/`` of ``spool``'s bucket
    is spooled before the client gets moto's answer (moto answers WSGI with a finished body)."""

    def __init__(self, app: Any, spool: Spool,
                 read: Callable[[str, str], tuple[bytes, str] | None] | None = None) -> None:
        self.app, self.spool = app, spool
        self.read = read or read_from_moto

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        target = created_object(environ)
        if target is None or target[0] != self.spool.bucket or not target[1].startswith(layout.INCOMING):
            return self.app(environ, start_response)
        answer: dict[str, Any] = {}

        def hold(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            answer.update(status=status, headers=headers, exc_info=exc_info)
            return self._no_write

        result = self.app(environ, hold)
        try:
            body = list(result)
        finally:
            if hasattr(result, "close"):
                result.close()
        if answer["status"].startswith("200"):
            found = self.read(*target)
            if found is None:
                log.error("created object %s not found in the local bucket: not spooled", target[1])
            else:
                self.spool.keep(Entry(target[0], target[1], found[1]), found[0])
        start_response(answer["status"], answer["headers"], answer["exc_info"])
        return body


    @staticmethod
    def _no_write(data: bytes) -> None:
        raise NotImplementedError("moto answers with a body, never through write()")


def read_from_moto(bucket: str, key: str) -> tuple[bytes, str] | None:
    """(bytes, ETag) of an object in this process's moto backend (the server runs in this process)."""
    from moto.s3.models import s3_backends

    obj = s3_backends[LOCAL_ACCOUNT_ID]["aws"].get_object(bucket, key)
    return None if obj is None else (obj.value, obj.etag.strip('"'))
