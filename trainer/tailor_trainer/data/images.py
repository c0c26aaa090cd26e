"""Prep for Dataset ``schema: image-caption``: an imagefolder (``metadata.jsonl`` with
``file_name`` and ``text`` beside the images, the Hugging Face layout) -> checked, deduplicated,
resized, split and tokenized rows.

Every image is decoded in full (``Image.load()``: a truncated file fails here, not on a GPU
worker). Rows are dropped, counted in ``dropped{reason}`` and listed in ``firstErrors`` with file
and line exactly like text rows: ``badJson`` / ``wrongType`` / ``missingField`` (the metadata
line), ``missingImage`` (no such file, or a name that leaves the folder), ``corruptImage``
(not decodable or truncated), ``wrongMode`` (not RGB/RGBA/L/LA/P: CMYK, 16-bit, float, ...),
``tooSmall`` (shorter side below the training resolution), ``empty`` (blank caption) and
``duplicate`` (the same pixels as an earlier row: sha256 of the decoded image).

Kept images are resized (shorter side to the resolution, bicubic) and center-cropped to a square,
split by their content hash (``data.split.assign_split``, as text rows), and written with their
tokenized caption to ``<out>/<split>.parquet`` (columns ``id, file, text, pixels`` (uint8 HWC
bytes), ``input_ids``), so training never decodes an image file. The fingerprint is the text
path's order-independent one over the kept rows' ids.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import unicodedata
from typing import Any, Callable, Optional

from tailor_trainer import storage
from tailor_trainer.config import Dedupe, ResolvedDataset
from tailor_trainer.data import DataError
from tailor_trainer.data.engine import MAX_ERRORS, PrepResult, _Fingerprint
from tailor_trainer.data.split import SPLITS, assign_split
from tailor_trainer.redact import redact

METADATA = "metadata.jsonl"
MODES = frozenset({"RGB", "RGBA", "L", "LA", "P"})
MALFORMED = frozenset({"badJson", "wrongType", "missingField", "missingImage", "corruptImage", "wrongMode"})
MAX_IMAGE_BYTES = 64 << 20
MAX_PIXELS = 64_000_000


def image_folder(ds: ResolvedDataset) -> str:
    """The local folder holding metadata.jsonl (source.uri names the folder or that file)."""
    uri = ds.source.uri
    if uri is None:
        raise DataError("InvalidSource", "schema image-caption reads an image folder: set source.uri "
                                         "(source.configMapRef cannot hold images)")
    try:
        path = storage.local_path(uri)
    except storage.StorageError as e:
        raise DataError("InvalidSource", str(e)) from None
    if path is None:
        raise DataError("InvalidSource", f"source.uri {uri!r}: schema image-caption reads a local or mounted "
                                         "folder (a path, file:// or pvc://) in this version")
    if os.path.isfile(path) and os.path.basename(path) == METADATA:
        path = os.path.dirname(path)
    if not os.path.isfile(os.path.join(path, METADATA)):
        raise DataError("EmptySource", f"{uri}: no {METADATA} (the imagefolder layout: images plus a "
                                       "metadata.jsonl with file_name and text on each line)")
    return path


def _normalize(text: str, ds: ResolvedDataset) -> str:
    pre = ds.preprocessing
    if pre.normalize_unicode:
        text = unicodedata.normalize("NFC", text)
    if pre.strip_whitespace:
        text = " ".join(text.split())
    return text


def _inside(folder: str, name: str) -> Optional[str]:
    """The image's path, or None when the name would leave the folder (absolute, .., a link out)."""
    if os.path.isabs(name) or "\x00" in name:
        return None
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    return path if path.startswith(root + os.sep) else None


def load_checked(path: str, resolution: int) -> tuple[Optional[Any], Optional[tuple[str, str]]]:
    """(RGB image resolution x resolution, None) or (None, (reason, message))."""
    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) > MAX_IMAGE_BYTES:
            return None, ("corruptImage", f"larger than {MAX_IMAGE_BYTES >> 20} MiB")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, ("missingImage", f"cannot read: {e.strerror or type(e).__name__}")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_PIXELS:
            return None, ("corruptImage", f"{img.width}x{img.height} pixels is above the limit")
        img.load()  # decodes every pixel: truncated files fail here
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return None, ("corruptImage", f"cannot decode: {type(e).__name__}")
    if img.mode not in MODES:
        return None, ("wrongMode", f"mode {img.mode} (expected one of {', '.join(sorted(MODES))})")
    if resolution <= 0:  # validation without a model: decoded and mode-checked only
        return img, None
    if min(img.size) < resolution:
        return None, ("tooSmall", f"{img.width}x{img.height}, below the training resolution {resolution}")
    if img.mode in ("RGBA", "LA", "P"):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", img.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    else:
        img = img.convert("RGB")
    return resize_crop(img, resolution), None


def resize_crop(img: Any, resolution: int) -> Any:
    from PIL import Image

    w, h = img.size
    scale = resolution / min(w, h)
    if scale != 1.0:
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                         Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def prepare_images(ds: ResolvedDataset, *, resolution: int, tokenizer: Any = None,
                   out_dir: Optional[str] = None,
                   progress: Optional[Callable[[dict], None]] = None) -> PrepResult:
    """Read, check, dedupe, resize, split and (with a tokenizer) tokenize an image folder; write
    ``<out_dir>/<split>.parquet`` when out_dir is set. Errors come back in ``result.error``."""
    r = PrepResult()
    try:
        _run(ds, resolution, tokenizer, out_dir, progress, r)
    except DataError as e:
        r.error = e
    return r


def _run(ds: ResolvedDataset, resolution: int, tokenizer: Any, out_dir: Optional[str],
         progress: Optional[Callable[[dict], None]], r: PrepResult) -> None:
    folder = image_folder(ds)
    cols = {"file_name": ds.column_map.get("file_name", "file_name"), "text": ds.column_map.get("text", "text")}
    fp = _Fingerprint(ds.schema_.value)
    seen: set[str] = set()
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}

    def drop(key: str, line: int, file: str, message: str) -> None:
        r.dropped[key] += 1
        if len(r.first_errors) < MAX_ERRORS:
            r.first_errors.append({"line": line, "file": redact(file), "reason": key, "message": redact(message)})

    with open(os.path.join(folder, METADATA), "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            r.rows_read += 1
            if progress and r.rows_read % 200 == 0:
                progress({"rowsRead": r.rows_read})
            try:
                value = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                drop("badJson", line_no, METADATA, "not a JSON object")
                continue
            if not isinstance(value, dict):
                drop("wrongType", line_no, METADATA, "not a JSON object")
                continue
            name, text = value.get(cols["file_name"]), value.get(cols["text"])
            if not isinstance(name, str) or not name:
                drop("missingField", line_no, METADATA, f"no {cols['file_name']!r} string")
                continue
            if not isinstance(text, str):
                drop("missingField" if text is None else "wrongType", line_no, name,
                     f"{cols['text']!r} is not a string")
                continue
            text = _normalize(text, ds)
            if not text and ds.preprocessing.drop_empty:
                drop("empty", line_no, name, "blank caption")
                continue
            path = _inside(folder, name)
            if path is None or not os.path.isfile(path):
                drop("missingImage", line_no, name, "no such image in the folder")
                continue
            img, issue = load_checked(path, resolution)
            if issue is not None:
                drop(issue[0], line_no, name, issue[1])
                continue
            pixels = img.tobytes()
            rid = hashlib.sha256(pixels).hexdigest()[:32]
            if rid in seen:
                if ds.preprocessing.dedupe is not Dedupe.none:
                    r.dropped["duplicate"] += 1
                    continue
                rid = hashlib.sha256(pixels + text.encode()).hexdigest()[:32]
            seen.add(rid)
            split = assign_split(rid, ds.split)
            rows[split].append({"id": rid, "file": name, "text": text, "pixels": pixels})
    for split, kept in rows.items():
        r.splits[split] = len(kept)
        r.sequences[split] = len(kept)
        for row in kept:
            fp.add(row["id"])
    r.fingerprint = fp.hexdigest()
    _check(ds, r)
    if tokenizer is not None:
        for kept in rows.values():
            if kept:
                ids = tokenizer([row["text"] for row in kept], padding="max_length", truncation=True,
                                max_length=tokenizer.model_max_length).input_ids
                for row, i in zip(kept, ids):
                    row["input_ids"] = list(i)
    if out_dir is not None:
        _write(out_dir, rows, resolution)


def _check(ds: ResolvedDataset, r: PrepResult) -> None:
    where = ds.source.uri
    if r.rows_read == 0:
        raise DataError("EmptySource", f"{where}: {METADATA} has no rows")
    bad = sum(v for k, v in r.dropped.items() if k in MALFORMED)
    limit = ds.preprocessing.max_bad_fraction
    if bad / r.rows_read > limit:
        first = r.first_errors[0] if r.first_errors else None
        lead = f"; first: {first['file']} line {first['line']}: {first['reason']}" if first else ""
        raise DataError("TooManyBadRows", f"{bad} of {r.rows_read} rows ({100 * bad / r.rows_read:.1f}%) "
                        f"are malformed or bad images, above maxBadFraction {100 * limit:g}%{lead} "
                        "(see firstErrors)")
    if r.rows == 0:
        why = ", ".join(f"{k} {v}" for k, v in r.dropped.most_common())
        raise DataError("AllRowsDropped", f"all {r.rows_read} rows were dropped ({why})")
    if r.splits["train"] == 0:
        raise DataError("EmptyTrainSplit", f"no row landed in the train split ({r.rows} rows); add rows "
                        "or lower split.validation/split.test")


def _write(out_dir: str, rows: dict[str, list[dict[str, Any]]], resolution: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(out_dir, exist_ok=True)
    for split, kept in rows.items():
        table = pa.table({
            "id": pa.array([x["id"] for x in kept], pa.string()),
            "file": pa.array([x["file"] for x in kept], pa.string()),
            "text": pa.array([x["text"] for x in kept], pa.string()),
            "pixels": pa.array([x["pixels"] for x in kept], pa.binary()),
            "input_ids": pa.array([x.get("input_ids", []) for x in kept], pa.list_(pa.int32())),
        }, metadata={b"resolution": str(resolution).encode()})
        pq.write_table(table, os.path.join(out_dir, f"{split}.parquet"))


def load_split(prep_dir: str, split: str) -> list[dict[str, Any]]:
    """Rows of ``<prep_dir>/<split>.parquet`` (pixels still bytes; see diffusion.batches)."""
    import pyarrow.parquet as pq

    path = os.path.join(prep_dir, f"{split}.parquet")
    if not os.path.exists(path):
        return []
    return pq.read_table(path).to_pylist()
