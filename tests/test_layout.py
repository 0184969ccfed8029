"""Unit tests: event key decoding, result keys, manifests and job names, payload splitting."""

from __future__ import annotations

import json
import re
from urllib.parse import quote_plus

import pytest

from dermscore import layout, reasons
from dermscore.messages import ManifestLine as Item
from handlers.enqueue import s3_records
from handlers.pending import manifest_items, manifest_text
from infra.runner import MB, split_payload

SAGEMAKER_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


@pytest.mark.parametrize(("raw", "key"), [
    ("incoming/ISIC_0024306.jpg", "incoming/ISIC_0024306.jpg"),
    ("incoming/a+b.jpg", "incoming/a b.jpg"),                       # space -> '+'
    ("incoming/a%2Bb.jpg", "incoming/a+b.jpg"),                     # literal '+' -> %2B
    ("incoming%2Fsub%2Fx.jpg", "incoming/sub/x.jpg"),               # '/' encoded too
    ("incoming/l%C3%A9sion+%C3%A9t%C3%A9.jpg", "incoming/lésion été.jpg"),  # UTF-8
    ("incoming/%E7%9A%AE%E8%82%A4.png", "incoming/皮肤.png"),
    ("incoming/100%25.jpg", "incoming/100%.jpg"),
])
def test_decode_event_key(raw: str, key: str) -> None:
    assert layout.decode_event_key(raw) == key


@pytest.mark.parametrize("key", ["incoming/a b+c é.jpg", "incoming/x%y&z=1?.jpg", "incoming/über/ü ü+ü.jpeg"])
def test_decode_inverts_s3_encoding(key: str) -> None:
    assert layout.decode_event_key(quote_plus(key, safe="")) == key


def test_result_keys() -> None:
    assert layout.image_result_key("incoming/demo/a b.jpg") == "results/images/demo/a b.jpg.json"
    assert layout.prediction_partition_key("2026-11-23", "job") == "results/predictions/dt=2026-11-23/job.parquet"
    assert layout.manifest_key("job") == "manifests/job.jsonl"
    assert layout.transform_output_prefix("job") == "transform-output/job/"
    assert layout.key_problem("incoming/a b/c+d é.jpg") is None
    assert layout.key_problem("incoming/folder/")[0] == reasons.FOLDER_MARKER


def _items() -> list[Item]:
    return [Item("b", "incoming/z.jpg", "e1", 10), Item("b", "incoming/a b.jpg", "e2", 20),
            Item("b", "incoming/é.jpg", "e3", 30)]


def test_manifest_is_sorted_deduplicated_and_order_independent() -> None:
    items = _items()
    text = manifest_text(items)
    assert text == manifest_text(list(reversed(items)) + items[:2])  # order and duplicates do not matter
    lines = [json.loads(ln) for ln in text.splitlines()]
    assert [ln["key"] for ln in lines] == sorted(i.key for i in items)
    assert set(lines[0]) == {"bucket", "key", "etag", "size"}
    assert text.endswith("\n") and "é" in text  # UTF-8, not \u escapes


def test_new_content_under_the_same_key_is_a_new_manifest_line() -> None:
    items = [Item("b", "incoming/a.jpg", "v1", 1), Item("b", "incoming/a.jpg", "v2", 1)]
    assert len(manifest_items(items)) == 2


def test_job_name_is_deterministic_and_valid() -> None:
    parts = [layout.pending_part_key(layout.content_digest(manifest_text(_items()[:i])), i) for i in (1, 2, 3)]
    name = layout.job_name("dermscore", parts)
    assert name == layout.job_name("dermscore", parts[::-1]) and name.startswith("dermscore-")   # a set of parts
    assert name != layout.job_name("dermscore", parts[:2])
    for prefix in ("dermscore", "my_stack.name", "x" * 200, "-a-", ""):
        n = layout.job_name(prefix, parts)
        assert SAGEMAKER_NAME.match(n) and len(n) <= 63, n


def test_pending_part_keys_announce_their_size() -> None:
    key = layout.pending_part_key("0123456789abcdef", 42)
    assert key == "pending/0123456789abcdef-0000042.jsonl" and layout.part_images(key) == 42
    assert layout.part_images(layout.pending_part_key("0123456789abcdef", 12_345_678)) == 12_345_678
    assert layout.part_images("pending/notes.txt") is None and layout.part_images("manifests/x.jsonl") is None


def test_s3_records_ignores_test_event_and_non_created() -> None:
    test_event = json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "b"})
    assert s3_records(test_event) == []
    body = json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": {}},
                                   {"eventName": "ObjectRemoved:Delete", "s3": {}}]})
    assert [r["eventName"] for r in s3_records(body)] == ["ObjectCreated:Put"]


def test_split_payload_multirecord_respects_limit() -> None:
    line = b"x" * (300 * 1024 - 1)          # 300 KiB with its newline
    bodies = split_payload([line] * 10, max_payload_mb=1)
    assert [b.count(b"\n") for b in bodies] == [3, 3, 3, 1]
    assert all(len(b) <= MB for b in bodies)
    assert b"".join(bodies) == (line + b"\n") * 10   # nothing lost, order kept


def test_split_payload_exact_fit_and_blank_lines() -> None:
    line = b"y" * (MB // 2 - 1)
    assert len(split_payload([line, line], 1)) == 1        # exactly 1 MiB fits
    assert len(split_payload([line, line, b"z"], 1)) == 2
    assert split_payload([b"a\n", b"", b"  ", b"b\r\n"], 6) == [b"a\nb\n"]
    assert split_payload([], 6) == []


def test_split_payload_single_record_and_unlimited() -> None:
    assert split_payload([b"a", b"b", b"c"], 6, "SingleRecord") == [b"a\n", b"b\n", b"c\n"]
    assert split_payload([b"a" * (2 * MB)] * 3, 0) == [(b"a" * (2 * MB) + b"\n") * 3]


def test_split_payload_rejects_a_record_over_the_limit() -> None:
    with pytest.raises(ValueError, match="MaxPayloadInMB"):
        split_payload([b"a" * MB], 1)


@pytest.mark.parametrize(("key", "reason"), [
    ("incoming/../../x.jpg", reasons.UNSAFE_KEY), ("incoming/a/./b.jpg", reasons.UNSAFE_KEY),
    ("incoming//b.jpg", reasons.UNSAFE_KEY), ("incoming/..", reasons.UNSAFE_KEY),
    ("incoming/a\\..\\b.jpg", reasons.UNSAFE_KEY), ("incoming/a\nb.jpg", reasons.UNSAFE_KEY),
    ("incoming/a\x00.jpg", reasons.UNSAFE_KEY), ("incoming/" + "é" * 500 + ".jpg", reasons.KEY_TOO_LONG),
    ("incoming/sub/", reasons.FOLDER_MARKER),
])
def test_keys_that_could_escape_or_overflow_the_result_layout(key: str, reason: str) -> None:
    problem = layout.key_problem(key)
    assert problem is not None and problem[0] == reason and problem[1]


def test_longest_acceptable_key_fits_every_derived_key() -> None:
    room = (layout.MAX_KEY_BYTES - len(layout.IMAGES) - 1 - layout.ETAG_IN_KEY - len(".m") - layout.MODEL_IN_KEY
            - max(len(layout.HEATMAP_SUFFIX), len(layout.THUMBNAIL_SUFFIX)))
    key = layout.INCOMING + "a" * room
    assert layout.key_problem(key) is None and layout.key_problem(key + "a")[0] == reasons.KEY_TOO_LONG
    multipart = "9" * 32 + "-10000"   # the longest ETag S3 gives (a multipart upload of 10,000 parts)
    sha = "f" * 64
    assert len(layout.image_artifact_key(key, multipart, layout.HEATMAP_SUFFIX, sha).encode()) <= layout.MAX_KEY_BYTES
    assert len(layout.archived_claim_key(key, multipart, sha).encode()) <= layout.MAX_KEY_BYTES


def test_two_uploads_of_one_key_never_share_a_picture() -> None:
    first, second = ("incoming/a/b.jpg", "a" * 32), ("incoming/a/b.jpg", "b" * 31 + "-2")
    for suffix in (layout.HEATMAP_SUFFIX, layout.THUMBNAIL_SUFFIX):
        keys = {layout.image_artifact_key(k, e, suffix) for k, e in (first, second)}
        assert len(keys) == 2 and all(k.startswith("results/images/a/b.jpg.") and k.endswith(suffix) for k in keys)
    assert layout.image_artifact_key("incoming/x.jpg", '"abc"', ".p") == "results/images/x.jpg.abc.p"


def test_two_models_never_share_a_picture_or_a_claim_of_one_upload() -> None:
    a, b = "a" * 64, "b" * 64
    assert layout.image_artifact_key("incoming/x.jpg", "e", ".p", a) == f"results/images/x.jpg.e.m{a[:12]}.p"
    assert len({layout.image_artifact_key("incoming/x.jpg", "e", ".p", m) for m in (a, b, "")}) == 3
    assert len({layout.archived_claim_key("incoming/x.jpg", "e", m) for m in (a, b, "")}) == 3


def test_local_paths_never_leave_their_root(tmp_path) -> None:
    assert layout.local_path(tmp_path, "images/a/b.json") == tmp_path.resolve() / "images/a/b.json"
    for bad in ("images/../../x.json", "../x", "/etc/passwd", "images/../.."):
        with pytest.raises(ValueError):
            layout.local_path(tmp_path, bad)
    (tmp_path / "link").symlink_to("/tmp")
    with pytest.raises(ValueError):
        layout.local_path(tmp_path, "link/x.json")


def test_job_names_of_a_stack_and_of_its_siblings() -> None:
    """Stack and job names share one alphabet, so ``<stack>-`` also starts the jobs of a stack named
    ``<stack>-x``; only the fixed length of the digest tells them apart."""
    name = layout.job_name("derm", ["pending/a", "pending/b"])
    assert len(name) == len("derm-") + layout.JOB_DIGEST_LENGTH
    assert layout.is_job_of("derm", name)
    assert not layout.is_job_of("derm", layout.job_name("derm-x", ["pending/a"]))
    assert not layout.is_job_of("derm-x", name) and not layout.is_job_of("derm", "derm-123")
    long = "s" * 80   # a stack name longer than a job name allows is shortened the same way in both
    assert layout.is_job_of(long, layout.job_name(long, ["p"])) and len(layout.job_name(long, ["p"])) <= 63
