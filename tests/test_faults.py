"""Fault suite (issue 6): every upload ends in exactly one place, whatever goes wrong.

On the local stack (moto server over HTTP, the real handlers, runner and inference code):
N uploads - real sample images reused under distinct keys (some with spaces, '+' and
unicode) plus 5 % bad files of every kind - with every S3 event delivered twice, the dispatcher
killed once between gathering parts and creating their job, its first runs made twice at once
over the same parts, and one transform job forced to fail. Then:
result rows + failure rows == unique uploads, no duplicates, a reason for every failure,
nothing in flight. The figures are printed (``pytest -s`` shows them).

CI size: 200 uploads with a tiny random model. The issue's full size::

    DERMSCORE_FAULT_UPLOADS=2000 .venv/bin/pytest -s tests/test_faults.py -k suite

Faults are injected from here (monkeypatch, runner attribute), never by test switches in
production code.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import struct
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote_plus

import numpy as np
import pytest
from conftest import SAMPLES, preserved_environ, unique_name
from PIL import Image

from analytics.query import run_query
from dermscore import layout, reasons, results
from handlers import dispatch

UPLOADS = int(os.environ.get("DERMSCORE_FAULT_UPLOADS", "200"))
# The SQS batching window of the suite's stack: short in CI; the full size gathers larger batches
# (fewer, larger transform jobs, as the template's 300 s window does on AWS).
WINDOW_S = float(os.environ.get("DERMSCORE_FAULT_WINDOW_S", "0.5" if UPLOADS <= 500 else "5"))
BAD_SHARE = 0.05
WAVE = 500          # uploads per wave (deliveries: twice that); the CI size is one wave
ODD_NAMES = ("lésion {i} + copie (1).jpg", "naïve scan {i}.JPG", "a+b {i} ü.jpeg")


# --------------------------------------------------------------------------- bad files

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height``: what a decompression bomb looks like
    to a decoder before it inflates anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _encoded(fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (180, 120, 90)).save(buf, format=fmt)
    return buf.getvalue()


def bad_files(sample: bytes) -> dict[str, tuple[str, bytes]]:
    """reason code -> (file name suffix, content) for every kind of bad upload."""
    fmt = "WEBP" if "WEBP" in Image.SAVE else "BMP"
    return {
        reasons.ZERO_BYTE: (".jpg", b""),
        reasons.CORRUPT: (".jpg", sample[:6000]),                                  # truncated JPEG
        reasons.NOT_AN_IMAGE: (".jpg", b"%PDF-1.4\n% not an image at all\n" * 20),
        reasons.UNSUPPORTED_FORMAT: (".png", _encoded(fmt)),                       # WebP/BMP named .png
        reasons.DECOMPRESSION_BOMB: (".png", _png_header_only(20_000, 20_000)),   # 400 MP claimed
        reasons.TOO_LARGE: (".jpg", sample + b"\0" * (reasons.MAX_BYTES + 1 - len(sample))),
        reasons.TOO_SMALL: (".jpg", _encoded("JPEG", (16, 16))),
        reasons.EXTREME_ASPECT: (".jpg", _encoded("JPEG", (900, 100))),
        reasons.WRONG_PREFIX: (".jpg", sample),                                    # outside incoming/
        # keys S3 would store but the result layout cannot hold (their events are injected)
        reasons.UNSAFE_KEY: ("/../../escape.jpg", sample),
        reasons.KEY_TOO_LONG: ("-" + "k" * 980 + ".jpg", sample),           # fits S3, not results/
    }


# Reasons whose uploads are not stored by this suite: the events are sent as a misrouted
# notification (outside/) or a hostile client (unsafe keys) would deliver them.
INJECTED = (reasons.WRONG_PREFIX, reasons.UNSAFE_KEY, reasons.KEY_TOO_LONG)


def odd_good_files(sample: bytes) -> list[tuple[str, bytes]]:
    """(name, content) of uploads that look unusual but are real photographs: each must be scored."""
    with Image.open(io.BytesIO(sample)) as im:
        lesion = im.convert("RGB")
    rotated, big, mpo, grey16 = io.BytesIO(), io.BytesIO(), io.BytesIO(), io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6                                                 # EXIF Orientation: rotate 90 CW
    lesion.rotate(90, expand=True).save(rotated, "JPEG", exif=exif)
    lesion.resize((8000, 6000), Image.BILINEAR).save(big, "JPEG", quality=70)    # a 48 MP camera photo
    lesion.save(mpo, "MPO", save_all=True, append_images=[lesion.transpose(Image.FLIP_LEFT_RIGHT)])
    Image.fromarray(np.asarray(lesion.convert("L"), dtype=np.uint16) * 257).save(grey16, "PNG")   # 16-bit grey
    return [("IMG_{i}.Jpg", sample), ("scan-{i}", sample), ("photo-{i}.tif", sample),
            ("rotated-{i}.jpg", rotated.getvalue()), ("camera-48mp-{i}.jpg", big.getvalue()),
            ("phone-{i}.mpo", mpo.getvalue()), ("grey16-{i}.png", grey16.getvalue())]


# --------------------------------------------------------------------------- helpers

def make_pipeline(endpoint: str, model_dir: Path | None, window_s: float = 0.5, **overrides):
    from infra.local import LocalPipeline

    name = unique_name()
    # The visibility timeout outlasts the batching window (as Lambda requires of an event source
    # mapping), else a message is received again while its batch fills and spends its receives.
    return LocalPipeline(model_dir, bucket=f"{name}-images", stack_name=name, endpoint=endpoint,
                         batching_window_s=window_s, visibility_timeout=max(2, int(3 * window_s)),
                         overrides={"ModelName": f"{name}-model", **overrides})


def take_all(sqs, url: str) -> list[dict]:
    """Receive and delete every message of ``url`` (the queue is quiet: nothing else polls it)."""
    out: list[dict] = []
    while msgs := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages"):
        out += msgs
        sqs.delete_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                                                        for i, m in enumerate(msgs)])
    return out


def send_all(sqs, url: str, bodies: list[str]) -> None:
    for i in range(0, len(bodies), 10):
        sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": str(j), "MessageBody": b}
                                                      for j, b in enumerate(bodies[i:i + 10])])


def outcome(out: Path) -> SimpleNamespace:
    _, scored = run_query("SELECT bucket, image_key, etag FROM predictions", out)
    _, failed = run_query("SELECT bucket, image_key, etag, stage, reason, detail FROM failures", out)
    return SimpleNamespace(scored=[tuple(r) for r in scored], failed=[tuple(r) for r in failed])


def in_flight(p) -> dict[str, int]:
    q, d = p.stack.queue_depth(), p.stack.queue_depth(dlq=True)
    return {"queue": q["visible"] + q["in_flight"], "dlq": d["visible"] + d["in_flight"],
            "jobs_pending": len(p.runner.pending())}


# --------------------------------------------------------------------------- the suite

def test_fault_suite_every_upload_ends_in_exactly_one_place(moto_endpoint, tiny_model, tmp_path, monkeypatch,
                                                             capsys, caplog) -> None:
    from infra.stack import use_endpoint

    caplog.set_level(logging.INFO)

    samples = sorted(SAMPLES.glob("*.jpg"))
    if not samples:
        pytest.skip(f"needs sample images in {SAMPLES}")
    rng = random.Random(6)
    kinds = bad_files(samples[0].read_bytes())
    odd = odd_good_files(samples[1].read_bytes())
    n_bad = max(len(kinds), round(UPLOADS * BAD_SHARE))
    plan: list[tuple[str, bytes, str | None]] = []          # (key, content, expected reason or None)
    for i in range(n_bad):
        reason = list(kinds)[i % len(kinds)]
        suffix, data = kinds[reason]
        folder = "outside/faults/" if reason == reasons.WRONG_PREFIX else "incoming/faults/bad/"
        plan.append((f"{folder}{reason}-{i}{suffix}", data, reason))
    for i in range(UPLOADS - n_bad):
        if i % 10 == 3:     # names with other suffixes or none, big photos, 16-bit, rotated, MPO
            name, data = odd[(i // 10) % len(odd)]
            plan.append((f"incoming/faults/odd/{name.format(i=i)}", data, None))
            continue
        name = ODD_NAMES[i % len(ODD_NAMES)].format(i=i) if i % 5 == 0 else f"img-{i:05d}.jpg"
        plan.append((f"incoming/faults/good/{name}", samples[i % len(samples)].read_bytes(), None))
    rng.shuffle(plan)

    # Fault 1: the dispatcher dies once between gathering parts (its intent and the job's manifest
    # are written) and CreateTransformJob.
    real_submit = dispatch.submit
    crash = {"crashed": 0, "twice": 0, "twin_runs": False}

    def submit_or_crash(rt, name, prefix, shards):
        if not crash["crashed"] and not crash["twin_runs"]:   # else the twin run would finish the job at once
            crash["crashed"] += 1
            raise RuntimeError("injected fault: dispatcher killed before CreateTransformJob")
        return real_submit(rt, name, prefix, shards)

    monkeypatch.setattr(dispatch, "submit", submit_or_crash)

    with preserved_environ():
        use_endpoint(moto_endpoint)
        with make_pipeline(moto_endpoint, tiny_model, window_s=WINDOW_S) as p:
            s3, sqs, bucket = p.s3, p.stack.client("sqs"), p.stack.bucket
            uploads: dict[tuple[str, str, str], str | None] = {}
            sizes: dict[str, int] = {}

            def progress(text: str) -> None:   # shown with pytest -s (the full size takes minutes)
                with capsys.disabled():
                    print(f"  fault suite: {text}", flush=True)

            # moto's SQS looks at every message of a queue on each send and receive, so a queue
            # thousands deep makes each call slow (quadratic in all): uploads go in waves whose
            # notifications are taken off at once, and deliveries in waves drained before the next.
            bodies: list[str] = []
            for start in range(0, len(plan), WAVE):
                for i, (key, data, reason) in enumerate(plan[start:start + WAVE], start):
                    etag = f"injected-{i}" if reason in (reasons.UNSAFE_KEY, reasons.KEY_TOO_LONG) else \
                        s3.put_object(Bucket=bucket, Key=key, Body=data)["ETag"].strip('"')
                    uploads[(bucket, key, etag)] = reason
                    sizes[key] = len(data)
                bodies += [m["Body"] for m in take_all(sqs, p.stack.queue_url)]
                progress(f"uploaded {min(start + WAVE, len(plan))}/{len(plan)}")

            # Fault 2: every S3 event delivered twice, in shuffled order. The notifications S3
            # (moto) sent were taken off the queue and are sent back twice each; the bucket notifies
            # on incoming/ only, so the events of outside/ keys and of unsafe keys are sent as a
            # misrouted notification or a hostile client would deliver them.
            template = next(json.loads(b) for b in bodies if "Records" in json.loads(b))
            for (_b, key, etag), reason in uploads.items():
                if reason in INJECTED:
                    rec = json.loads(json.dumps(template["Records"][0]))
                    rec["s3"]["object"].update(key=quote_plus(key, safe=""), eTag=etag, size=sizes[key])
                    bodies.append(json.dumps({"Records": [rec]}))
            events = sum(len(json.loads(b).get("Records", [])) for b in bodies)
            assert events == len(uploads)
            deliveries = bodies * 2
            rng.shuffle(deliveries)

            # Fault 3: the first transform job fails (an instance lost, as SageMaker reports it).
            real_execute = p.runner.execute
            forced: list[str] = []

            def execute_or_fail(job):
                if not forced:
                    forced.append(job["TransformJobName"])
                    raise RuntimeError("injected fault: instance terminated")
                return real_execute(job)

            p.runner.execute = execute_or_fail

            # Fault 4: the dispatcher's first runs are made twice at once, over the same parts.
            real_run = p.dispatcher.run_once

            def run_twice():
                if crash["twice"] >= 3 or not p.stack.list_keys(layout.PENDING):
                    return real_run()
                crash["twice"], crash["twin_runs"] = crash["twice"] + 1, True
                try:
                    with ThreadPoolExecutor(2) as pool:
                        reports = list(pool.map(lambda _: real_run(), range(2)))
                finally:
                    crash["twin_runs"] = False
                return next((r for r in reports if r), None)

            p.dispatcher.run_once = run_twice
            for start in range(0, len(deliveries), 2 * WAVE):
                send_all(sqs, p.stack.queue_url, deliveries[start:start + 2 * WAVE])
                p.drain(timeout_s=max(900, 2 * UPLOADS))   # a bound against hangs, not a timing assertion
                done = sum(r["records"] for r in p.runner.results)
                progress(f"delivered {min(start + 2 * WAVE, len(deliveries))}/{len(deliveries)} events, "
                         f"{done} manifest lines transformed in {len(p.runner.results)} jobs")
            left = in_flight(p)
            jobs = list(p.runner.results)
            p.export(tmp_path)

    got = outcome(tmp_path)
    scored = Counter((b, k, e) for b, k, e in got.scored)
    failed = Counter((b, k, e) for b, k, e, *_ in got.failed)
    places = scored + failed
    duplicates = sum(n - 1 for n in places.values() if n > 1)
    lost = [u for u in uploads if u not in places]
    unknown = [u for u in places if u not in uploads]
    by_reason = Counter(r[4] for r in got.failed)
    logged = Counter(m for r in caplog.records for m in (
        "finishing the job of an earlier dispatcher run", "images of a failed transform job re-queued",
        "duplicate lines: their uploads' outcomes come from other lines") if r.getMessage().startswith(m))
    with capsys.disabled():
        print(f"\nfault suite: {len(uploads)} uploads ({n_bad} bad), {len(deliveries)} S3 event deliveries, "
              f"{len(jobs)} transform jobs ({sum(j['status'] == 'Failed' for j in jobs)} failed), "
              f"dispatcher crashes {crash['crashed']}, double runs {crash['twice']}\n"
              f"  results: {len(got.scored)}  failures: {len(got.failed)} "
              f"({', '.join(f'{r}: {n}' for r, n in sorted(by_reason.items()))})\n"
              f"  duplicates: {duplicates}  lost: {len(lost)}  in flight: {left}\n"
              f"  recovery: {dict(logged)}")

    assert crash["crashed"] == 1 and crash["twice"] >= 1 and len(forced) == 1   # the faults really happened
    assert [j["status"] for j in jobs].count("Failed") == 1
    assert len(logged) == 3   # the crashed dispatcher's job was finished, the failed job's images
    #                           re-queued, duplicate lines collected once
    assert len(got.scored) + len(got.failed) == len(uploads)
    assert duplicates == 0 and lost == [] and unknown == []
    assert all(r[4] and r[5] for r in got.failed)                       # every failure has a reason
    assert {u: r for u, r in uploads.items() if r} == {(b, k, e): r for b, k, e, _, r, _ in got.failed}
    assert set(scored) == {u for u, r in uploads.items() if r is None}  # the failed job's images too
    _, turned = run_query("SELECT orientation FROM predictions WHERE image_key LIKE '%/rotated-%'", tmp_path)
    assert turned and {r[0] for r in turned} == {6}                     # EXIF rotation applied and reported
    assert left == {"queue": 0, "dlq": 0, "jobs_pending": 0}
    # the per-image JSON documents: one per result, nothing but the result's own fields (and keys
    # of pictures derived from it): no EXIF or other metadata of the upload
    docs = [json.loads(path.read_text()) for path in (tmp_path / "images").rglob("*.json")]
    assert Counter(d["status"] for d in docs) == {results.SCORED: len(got.scored),   # one per image that reached
                                                  results.FAILED: sum(r[3] != "enqueue" for r in got.failed)}
    claim = {"status", "owner", "sequencer", "history"}                           # the transform
    for doc in (d for d in docs[:50] if d["status"] == results.SCORED):
        extra = set(doc) - set(results.PREDICTION_SCHEMA.names) - claim
        assert all(k.endswith("_key") for k in extra), extra


def test_reupload_scores_the_new_content_and_keeps_both_uploads_apart(moto_endpoint, tiny_model, tmp_path) -> None:
    """Same key, new content: a new ETag is a new upload with its own row; the key's JSON is the
    latest. An upload replaced before it was scored ends as a `superseded` failure row."""
    from infra.stack import use_endpoint

    a, b, c = (f.read_bytes() for f in sorted(SAMPLES.glob("*.jpg"))[:3])
    key = "incoming/reupload/lesion.jpg"
    with preserved_environ():
        use_endpoint(moto_endpoint)
        with make_pipeline(moto_endpoint, tiny_model) as p:
            s3, bucket = p.s3, p.stack.bucket
            e1 = s3.put_object(Bucket=bucket, Key=key, Body=a)["ETag"].strip('"')
            p.drain(timeout_s=120)
            e2 = s3.put_object(Bucket=bucket, Key=key, Body=b)["ETag"].strip('"')
            e3 = s3.put_object(Bucket=bucket, Key=key, Body=c)["ETag"].strip('"')   # before e2 was scored
            p.drain(timeout_s=120)
            p.export(tmp_path)
    got = outcome(tmp_path)
    assert sorted(e for _, _, e in got.scored) == sorted([e1, e3])
    assert [(r[2], r[4]) for r in got.failed] == [(e2, reasons.SUPERSEDED)]
    doc = json.loads((tmp_path / layout.image_result_key(key)[len("results/"):]).read_text())
    assert doc["etag"] == e3


def test_redrive_moves_dlq_messages_back_and_they_are_scored(moto_endpoint, tiny_model, capsys) -> None:
    from dermscore.cli import main
    from infra.stack import use_endpoint

    sample = sorted(SAMPLES.glob("*.jpg"))[0].read_bytes()
    with preserved_environ():
        use_endpoint(moto_endpoint)
        with make_pipeline(moto_endpoint, tiny_model) as p:
            s3, sqs, bucket = p.s3, p.stack.client("sqs"), p.stack.bucket
            for i in range(3):
                s3.put_object(Bucket=bucket, Key=f"incoming/redrive/{i}.jpg", Body=sample)
            # as if every receive had failed: the notifications sit in the DLQ
            send_all(sqs, p.stack.dlq_url, [m["Body"] for m in take_all(sqs, p.stack.queue_url)])
            assert p.stack.queue_depth(dlq=True)["visible"] == 4               # 3 images + s3:TestEvent
            assert main(["redrive", "--dlq-url", p.stack.dlq_url, "--queue-url", p.stack.queue_url,
                         "--endpoint-url", p.stack.endpoint]) == 0
            assert "moved 4 of about 4 message(s)" in capsys.readouterr().out
            assert p.stack.queue_depth(dlq=True) == {"visible": 0, "in_flight": 0}
            p.drain(timeout_s=120)
            assert p.runner.results and all(r["status"] == "Completed" for r in p.runner.results)
            assert len(p.stack.list_keys(layout.IMAGES)) == 3
            assert p.stack.queue_depth() == p.stack.queue_depth(dlq=True) == {"visible": 0, "in_flight": 0}


IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG")


def test_nothing_but_results_leaves_the_pipeline(moto_endpoint, tiny_model) -> None:
    """Image bytes stay where the user put them: every object the pipeline writes is in the
    user's bucket; pending parts, manifests and transform output hold no image data; a picture derived
    from an image (a result's thumbnail or heatmap, if any) lies beside its JSON, is small and
    carries no EXIF or other metadata of the upload."""
    from infra.stack import use_endpoint

    files = sorted(SAMPLES.glob("*.jpg"))[:2]
    with preserved_environ():
        use_endpoint(moto_endpoint)
        with make_pipeline(moto_endpoint, tiny_model) as p:
            s3, bucket = p.s3, p.stack.bucket
            before = {b["Name"] for b in s3.list_buckets()["Buckets"]}
            p.upload(files, "incoming/privacy/")
            p.drain(timeout_s=120)
            assert {b["Name"] for b in s3.list_buckets()["Buckets"]} == before
            written = [k for k in p.stack.list_keys("") if not k.startswith((layout.INCOMING, layout.MODELS))]
            assert written and {k.split("/")[0] + "/" for k in written} <= {
                layout.MANIFESTS, layout.TRANSFORM_OUTPUT, layout.COLLECTED, "results/"}   # pending/: gone
            for k in written:
                body = s3.get_object(Bucket=bucket, Key=k)["Body"].read()
                if body.startswith(IMAGE_MAGIC):
                    assert k.startswith(layout.IMAGES), k
                    with Image.open(io.BytesIO(body)) as im:
                        assert max(im.size) <= 512 and not im.getexif() and "exif" not in im.info, k
                        assert not {"xmp", "comment"} & set(im.info), (k, im.info.keys())
                else:
                    assert not any(m in body for m in IMAGE_MAGIC) and b"Exif" not in body, k


def test_lost_state_change_events_are_recovered_by_the_reconciler(moto_endpoint, tiny_model, tmp_path,
                                                                   capsys) -> None:
    """EventBridge loses the state-change event of the first failed job and of the first completed
    one: collect never hears of them and no alarm fires. The reconciler (its bound shortened to a
    second) finds both finished but uncollected, re-drives collect, the failed job's images go round
    again: results + failures == unique uploads, no duplicates, nothing lost, nothing in flight."""
    from infra.local import LocalPipeline
    from infra.stack import use_endpoint

    samples = sorted(SAMPLES.glob("*.jpg"))
    if not samples:
        pytest.skip(f"needs sample images in {SAMPLES}")
    kinds = bad_files(samples[0].read_bytes())
    plan = [(f"incoming/lost/{ODD_NAMES[i % 3].format(i=i) if i % 4 == 0 else f'img-{i:03d}.jpg'}",
             samples[i % len(samples)].read_bytes(), None) for i in range(12)]
    plan += [(f"incoming/lost/bad/{reason}{kinds[reason][0]}", kinds[reason][1], reason)
             for reason in (reasons.ZERO_BYTE, reasons.CORRUPT)]
    name = unique_name()
    with preserved_environ():
        use_endpoint(moto_endpoint)
        with LocalPipeline(tiny_model, bucket=f"{name}-images", stack_name=name, endpoint=moto_endpoint,
                           batching_window_s=0.5, visibility_timeout=2, overrides={"ModelName": f"{name}-model"},
                           reconcile_after_s=1) as p:
            s3, bucket = p.s3, p.stack.bucket
            uploads = {(bucket, key, s3.put_object(Bucket=bucket, Key=key, Body=data)["ETag"].strip('"')): reason
                       for key, data, reason in plan}

            # Fault 1: the first transform job fails (as in the suite above).
            real_execute, forced = p.runner.execute, []

            def execute_or_fail(job):
                if not forced:
                    forced.append(job["TransformJobName"])
                    raise RuntimeError("injected fault: instance terminated")
                return real_execute(job)

            # Fault 2: EventBridge loses the first event of each terminal status.
            real_deliver, lost = p.runner.deliver, {}

            def deliver_or_lose(event, *args, **kwargs):
                detail = event["detail"]
                if detail["TransformJobStatus"] not in lost:
                    lost[detail["TransformJobStatus"]] = detail["TransformJobName"]
                    return None
                return real_deliver(event, *args, **kwargs)

            p.runner.execute, p.runner.deliver = execute_or_fail, deliver_or_lose
            p.drain(timeout_s=600)   # a bound against hangs, not a timing assertion
            left = in_flight(p)
            jobs = list(p.runner.results)
            reports = list(p.scheduler.reports)
            markers = {job: json.loads(s3.get_object(Bucket=bucket, Key=layout.collected_key(job))["Body"].read())
                       for job in lost.values()}
            p.export(tmp_path)

    got = outcome(tmp_path)
    places = Counter((b, k, e) for b, k, e in got.scored) + Counter((b, k, e) for b, k, e, *_ in got.failed)
    duplicates = sum(n - 1 for n in places.values() if n > 1)
    lost_uploads = [u for u in uploads if u not in places]
    redriven = sum(r["redriven"] for r in reports)
    with capsys.disabled():
        print(f"\nlost events: {len(uploads)} uploads, {len(jobs)} transform jobs, events lost {lost}, "
              f"re-driven by the reconciler {redriven} ({len(reports)} runs)\n"
              f"  results: {len(got.scored)}  failures: {len(got.failed)}  duplicates: {duplicates}  "
              f"lost: {len(lost_uploads)}  in flight: {left}")

    assert len(forced) == 1 and set(lost) == {"Failed", "Completed"}      # both faults really happened
    assert lost["Failed"] == forced[0]
    assert redriven == 2 and {job: m["status"] for job, m in markers.items()} == {
        lost["Failed"]: "Failed", lost["Completed"]: "Completed"}
    assert len(got.scored) + len(got.failed) == len(uploads)
    assert duplicates == 0 and lost_uploads == [] and set(places) == set(uploads)
    assert {u: r for u, r in uploads.items() if r} == {(b, k, e): r for b, k, e, _, r, _ in got.failed}
    assert set(Counter((b, k, e) for b, k, e in got.scored)) == {u for u, r in uploads.items() if r is None}
    assert left == {"queue": 0, "dlq": 0, "jobs_pending": 0}
