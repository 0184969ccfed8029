"""The message types: each crosses a boundary as JSON and comes back equal."""

from __future__ import annotations

import json

import pytest

from dermscore import scoring
from dermscore.messages import ManifestLine, OutputLine, Retry

MODEL = {"name": "m", "version": "1", "weights_sha256": "abc"}


def test_manifest_line_round_trip_and_identity() -> None:
    line = ManifestLine("b", "incoming/é x.jpg", '"e1"', 123)
    assert line.etag == "e1"                               # S3's quotes never reach a document or a row
    assert ManifestLine.from_json(line.to_json()) == line
    assert set(json.loads(line.to_json())) == {"bucket", "key", "etag", "size"}   # attempt 0, no sequencer: off
    again = line.next_attempt()
    assert again.attempt == 1 and again.upload == line.upload
    assert ManifestLine.from_json(again.to_json()) == again
    ordered = ManifestLine("b", "incoming/x.jpg", "e", 1, sequencer="0055B3A8C6D8E3F1C0")
    assert ManifestLine.from_json(ordered.to_json()) == ordered


@pytest.mark.parametrize("text", ['"just a string"', "[1, 2]", '{"bucket": "b"}', '{"bucket": 1, "key": "k"}',
                                  '{"bucket": "b", "key": ""}', "not json"])
def test_manifest_line_refuses_what_is_not_one(text: str) -> None:
    with pytest.raises(ValueError):
        ManifestLine.from_json(text)


def test_output_line_round_trip_keeps_every_field() -> None:
    out = scoring.score_line(ManifestLine("b", "incoming/x.jpg", "e"), [0.1, 0.1, 0.1, 0.1, 0.4, 0.1, 0.1], MODEL,
                             0.3, 600, 450, image_sha256="ab" * 32, processing_ms=1.5, ood_score=-3.0,
                             ood_threshold=-4.0)
    assert OutputLine.from_json(out.to_json()) == out
    err = OutputLine.error(ManifestLine("b", "incoming/y.jpg", "e2"), "corrupt_image", "truncated")
    assert OutputLine.from_json(err.to_json()) == err and not err.ok
    assert set(json.loads(err.to_json())) == {"bucket", "key", "etag", "status", "reason", "detail"}


def test_retry_is_its_own_message_not_an_s3_event() -> None:
    retry = Retry(ManifestLine("b", "incoming/x.jpg", "e", 10).next_attempt(), "job-1", "x" * 900)
    body = retry.to_json()
    assert "Records" not in json.loads(body)
    back = Retry.from_json(body)
    assert back is not None and back.line == retry.line and back.failed_job == "job-1" and len(back.reason) == 500
    assert Retry.from_json(json.dumps({"Records": []})) is None
