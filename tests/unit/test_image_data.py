"""Dataset schema image-caption: every image decoded and checked, bad ones dropped by file name with
counts (the text rows' dropped{} / firstErrors shape), exact duplicates by pixels, resize/crop to
the training resolution, a split that does not move old rows, captions tokenized."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from tailor_trainer.config import ResolvedDataset  # noqa: E402
from tailor_trainer.data.images import load_split, prepare_images  # noqa: E402
from tailor_trainer.stages.prep import build_status  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY_SD = ROOT / "examples" / "models" / "tailor-tiny-sd"


def _image(path: Path, color: tuple, size=(40, 48), mode="RGB") -> None:
    img = Image.new("RGB", size, color)
    img.putpixel((3, 5), (color[0] ^ 255, 0, 0))
    (img.convert(mode) if mode != "RGB" else img).save(path)


def _dataset(folder: Path, lines: list, **spec) -> ResolvedDataset:
    with open(folder / "metadata.jsonl", "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return ResolvedDataset.model_validate({"source": {"uri": f"file://{folder}"}, "schema": "image-caption",
                                           **spec})


def _good(folder: Path, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        _image(folder / f"ok{i}.png", (10 * i % 256, 40, 200 - i))
        rows.append({"file_name": f"ok{i}.png", "text": f"  a  shape   number {i} "})
    return rows


def test_bad_images_are_dropped_by_file_name_with_counts(tmp_path):
    rows = _good(tmp_path, 30)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    _image(tmp_path / "whole.png", (1, 2, 3))
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    _image(tmp_path / "cmyk.jpg", (5, 6, 7), mode="CMYK")
    _image(tmp_path / "small.png", (9, 9, 9), size=(16, 40))
    _image(tmp_path / "dup.png", (0, 40, 200))  # the same pixels as ok0.png
    (tmp_path.parent / "outside.png").write_bytes((tmp_path / "ok1.png").read_bytes())
    rows += [
        {"file_name": "corrupt.png", "text": "corrupt"},
        {"file_name": "truncated.png", "text": "truncated"},
        {"file_name": "cmyk.jpg", "text": "cmyk"},
        {"file_name": "small.png", "text": "small"},
        {"file_name": "dup.png", "text": "a duplicate"},
        {"file_name": "missing.png", "text": "gone"},
        {"file_name": "../outside.png", "text": "escapes the folder"},
        {"file_name": "ok2.png", "text": "   "},
        "{not json",
    ]
    ds = _dataset(tmp_path, rows, preprocessing={"maxBadFraction": 0.5})
    out = tmp_path / "prep"
    result = prepare_images(ds, resolution=32, out_dir=str(out))
    assert result.error is None
    assert dict(result.dropped) == {"corruptImage": 2, "wrongMode": 1, "tooSmall": 1, "duplicate": 1,
                                    "missingImage": 2, "empty": 1, "badJson": 1}
    by_file = {e["file"]: e["reason"] for e in result.first_errors}
    assert by_file["corrupt.png"] == by_file["truncated.png"] == "corruptImage"
    assert by_file["cmyk.jpg"] == "wrongMode" and by_file["small.png"] == "tooSmall"
    assert by_file["missing.png"] == by_file["../outside.png"] == "missingImage"
    assert result.rows == 30 and result.rows_read == 39
    status = build_status(ds, result)  # the Dataset.status the operator writes
    assert status["dropped"]["corruptImage"] == 2 and status["conditions"][0]["status"] == "True"
    kept = [r for s in ("train", "validation", "test") for r in load_split(str(out), s)]
    assert len(kept) == 30
    assert all(len(r["pixels"]) == 32 * 32 * 3 for r in kept)  # resized and center-cropped
    assert {r["text"] for r in kept} >= {"a shape number 0"}  # whitespace normalized


def test_too_many_bad_images_fail_the_dataset_naming_the_first(tmp_path):
    rows = _good(tmp_path, 5)
    (tmp_path / "bad.png").write_bytes(b"nope")
    rows.append({"file_name": "bad.png", "text": "bad"})
    result = prepare_images(_dataset(tmp_path, rows), resolution=32)
    assert result.error is not None and result.error.reason == "TooManyBadRows"
    assert "bad.png" in result.error.message


def test_split_is_stable_when_rows_are_added_and_captions_are_tokenized(tmp_path):
    pytest.importorskip("transformers")
    if not (TINY_SD / "model_index.json").exists():
        pytest.skip("examples/models/tailor-tiny-sd not built")
    from tailor_trainer.diffusion.model import load_tokenizer

    tok = load_tokenizer(str(TINY_SD))
    rows = _good(tmp_path, 40)
    first = tmp_path / "a"
    prepare_images(_dataset(tmp_path, rows), resolution=32, tokenizer=tok, out_dir=str(first))
    more = list(rows)
    for i in range(40, 60):
        _image(tmp_path / f"new{i}.png", (i, i, 255 - i))
        more.append({"file_name": f"new{i}.png", "text": "another"})
    second = tmp_path / "b"
    prepare_images(_dataset(tmp_path, more), resolution=32, tokenizer=tok, out_dir=str(second))
    for split in ("train", "validation", "test"):
        old = {r["id"] for r in load_split(str(first), split)}
        new = {r["id"] for r in load_split(str(second), split)}
        assert old <= new  # adding rows never moves old ones
    row = load_split(str(first), "train")[0]
    assert len(row["input_ids"]) == tok.model_max_length
    assert row["input_ids"][0] == tok.bos_token_id
    assert os.path.exists(second / "test.parquet")
