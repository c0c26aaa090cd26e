"""Benchmark of the prep stage: throughput against a plain loop, and memory on a >1 GB file.

    PYTHONPATH=operator:trainer python bench/prep.py                 # both parts, 1.2 GB file
    PYTHONPATH=operator:trainer python bench/prep.py --big-gb 0.2    # quicker memory check
    PYTHONPATH=operator:trainer python bench/prep.py --skip-memory --rows 50000

Part 1 writes a JSONL file of prompt/completion rows and times, in the same process, alternating,
``--repeat`` times each:
  baseline  what a user writes with Hugging Face ``datasets``: load_dataset("json"), the same
            cleaning (NFC-normalize and strip, drop empty, exact dedupe on the cleaned content),
            ``map(batched=True)`` with the same fast tokenizer, a seeded train/validation/test
            split, each split written to Parquet (fresh datasets cache per repeat: no cache hits)
  prep      the whole stage: read, map, clean, dedupe, split, eval-overlap, tokenize, write Parquet
and prints rows/s and tokens/s as the median of the repeats with their min-max, and the ratio of
the medians prep/baseline. (The stage also does per-row drop reasons, the eval-overlap pass and
streaming in bounded memory, which the baseline does not: the ratio is a fair price, not a win
from batching — both tokenize in batches in Rust.)

Part 2 generates a text file larger than 1 GB on the fly (``--big-gb``), runs the stage on it
while a thread samples the process's RSS, and prints RSS against rows read: streaming means the
curve stays flat after warm-up (what grows is ~16 bytes per row of dedupe/overlap keys).

The tokenizer is ``--tokenizer`` (a model/tokenizer directory), else
examples/models/tailor-tiny-llama if present, else a tiny BPE built like the test fixture.
Timings are informative only; nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer")]

WORDS = ("account password reset invoice billing support ticket customer order refund shipping "
         "delivery model train data cluster node memory token answer question help please thanks "
         "error retry network storage bucket policy access key secret region latency request "
         "response timeout queue worker job schedule report metric alert dashboard").split()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load_tokenizer(arg: str | None, workdir: Path):
    from transformers import AutoTokenizer

    if arg:
        path = arg
    elif (REPO / "examples/models/tailor-tiny-llama/tokenizer_config.json").exists():
        path = str(REPO / "examples/models/tailor-tiny-llama")
    else:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import build_tiny_tokenizer

        path = str(build_tiny_tokenizer(workdir / "tokenizer"))
    return path, AutoTokenizer.from_pretrained(path)


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def write_completion_file(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(rows):
            row = {"prompt": f"Ticket {i}: {sentence(rng, rng.randint(20, 60))}?\nAnswer:",
                   "completion": " " + sentence(rng, rng.randint(20, 80)) + "."}
            f.write(json.dumps(row) + "\n")


def write_big_text_file(path: Path, target_bytes: int, seed: int = 1) -> int:
    """JSONL text rows of ~2 KB each (unique), streamed to disk; returns the row count."""
    rng = random.Random(seed)
    rows = written = 0
    with open(path, "w") as f:
        while written < target_bytes:
            line = json.dumps({"text": f"doc {rows}. " + sentence(rng, 300)}) + "\n"
            f.write(line)
            written += len(line)
            rows += 1
    return rows


def baseline(path: Path, tok, workdir: Path) -> tuple[int, int, float]:
    """The same preparation as a careful ``datasets`` user writes it (batched, fast tokenizer)."""
    import hashlib
    import shutil
    import unicodedata

    from datasets import disable_progress_bars, load_dataset

    disable_progress_bars()
    cache = workdir / "hf-datasets-cache"
    shutil.rmtree(cache, ignore_errors=True)
    out = workdir / "out-baseline"
    out.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    ds = load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))
    rows = len(ds)

    def clean(batch):
        tidy = lambda s: unicodedata.normalize("NFC", s or "")  # noqa: E731
        return {"prompt": [tidy(p).lstrip() for p in batch["prompt"]],
                "completion": [tidy(c).rstrip() for c in batch["completion"]]}

    ds = ds.map(clean, batched=True)
    ds = ds.filter(lambda b: [bool(p.strip()) and bool(c.strip()) for p, c in zip(b["prompt"], b["completion"])],
                   batched=True)
    seen: set[bytes] = set()

    def first_seen(batch):
        keep = []
        for p, c in zip(batch["prompt"], batch["completion"]):
            key = hashlib.blake2b(f"{p}\x00{c}".encode(), digest_size=16).digest()
            keep.append(key not in seen)
            seen.add(key)
        return keep

    ds = ds.filter(first_seen, batched=True)

    def tokenize(batch):
        p = tok(batch["prompt"])["input_ids"]
        c = tok(batch["completion"], add_special_tokens=False)["input_ids"]
        ids = [a + b + [tok.eos_token_id] for a, b in zip(p, c)]
        labels = [[-100] * len(a) + b + [tok.eos_token_id] for a, b in zip(p, c)]
        return {"input_ids": ids, "labels": labels}

    ds = ds.map(tokenize, batched=True, remove_columns=["prompt", "completion"])
    ds = ds.filter(lambda b: [len(x) <= 4096 for x in b["input_ids"]], batched=True)
    tokens = sum(len(x) for x in ds["input_ids"])
    parts = ds.train_test_split(test_size=0.1, seed=42)
    rest = parts["test"].train_test_split(test_size=0.5, seed=42)
    for name, split in (("train", parts["train"]), ("validation", rest["train"]), ("test", rest["test"])):
        split.to_parquet(str(out / f"{name}.parquet"))
    return rows, tokens, time.perf_counter() - t0


def run_stage(path: Path, tok, schema: str, out_dir: Path, max_len: int, progress=None):
    from tailor_trainer.config import ResolvedDataset
    from tailor_trainer.data.engine import PrepOptions, prepare

    ds = ResolvedDataset.model_validate({"name": "bench", "source": {"uri": str(path)}, "schema": schema})
    t0 = time.perf_counter()
    result = prepare(ds, PrepOptions(tokenizer=tok, max_seq_length=max_len, out_dir=str(out_dir),
                                     progress=progress, progress_every=10_000))
    elapsed = time.perf_counter() - t0
    if result.error:
        raise SystemExit(f"prep failed: {result.error.reason}: {result.error.message}")
    return result, elapsed


def warm_up(workdir: Path, tok) -> None:
    """First calls import pandas (via pyarrow), jinja, etc.: keep one-time costs out of timings."""
    path = workdir / "warm.jsonl"
    write_completion_file(path, 200, seed=99)
    run_stage(path, tok, "completion", workdir / "out-warm", max_len=4096)
    baseline(path, tok, workdir)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):10.0f} ({min(values):.0f}-{max(values):.0f})"


def part_throughput(workdir: Path, tok, rows: int, repeat: int) -> None:
    path = workdir / "completion.jsonl"
    write_completion_file(path, rows)
    size = path.stat().st_size
    base: dict[str, list[float]] = {"rows": [], "tokens": []}
    prep: dict[str, list[float]] = {"rows": [], "tokens": []}
    for i in range(repeat):
        b_rows, b_tokens, b_s = baseline(path, tok, workdir)
        base["rows"].append(b_rows / b_s)
        base["tokens"].append(b_tokens / b_s)
        result, p_s = run_stage(path, tok, "completion", workdir / f"out-throughput-{i}", max_len=4096)
        prep["rows"].append(result.rows_read / p_s)
        prep["tokens"].append(result.total_tokens / p_s)
        print(f"  repeat {i + 1}: baseline {b_s:.1f} s ({b_tokens} tokens), prep {p_s:.1f} s "
              f"({result.total_tokens} tokens, kept {result.rows}, dropped {dict(result.dropped)})", flush=True)
    print(f"\n== throughput: {rows} completion rows, {size / 1e6:.1f} MB, median (min-max) of {repeat} ==")
    print(f"baseline  rows/s {_spread(base['rows'])}   tokens/s {_spread(base['tokens'])}")
    print(f"prep      rows/s {_spread(prep['rows'])}   tokens/s {_spread(prep['tokens'])}")
    med = statistics.median
    print(f"prep/baseline (medians): rows/s {med(prep['rows']) / med(base['rows']):.2f}, "
          f"tokens/s {med(prep['tokens']) / med(base['tokens']):.2f}  (<1: the stage is slower)")


def part_memory(workdir: Path, tok, gigabytes: float) -> None:
    path = workdir / "big.jsonl"
    t0 = time.perf_counter()
    n = write_big_text_file(path, int(gigabytes * 1e9))
    size = path.stat().st_size
    print(f"\n== memory: {size / 1e9:.2f} GB, {n} text rows (generated in {time.perf_counter() - t0:.0f} s) ==")
    samples: list[tuple[int, int]] = []  # (rows read, rss)
    state = {"rows": 0, "stop": False}

    def sampler() -> None:
        while not state["stop"]:
            samples.append((state["rows"], rss_bytes()))
            time.sleep(0.25)

    def progress(p: dict) -> None:
        state["rows"] = p["rowsRead"]

    start_rss = rss_bytes()
    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    result, elapsed = run_stage(path, tok, "text", workdir / "out-memory", max_len=4096, progress=progress)
    state["stop"] = True
    thread.join()
    peak = max(r for _, r in samples)
    warm = [r for rows, r in samples if rows >= 0.05 * n]
    warm_rss = warm[0] if warm else start_rss
    print(f"prep: {result.rows_read / elapsed:.0f} rows/s, {result.total_tokens / elapsed:.0f} tokens/s, "
          f"{size / 1e6 / elapsed:.1f} MB/s ({elapsed:.0f} s); kept {result.rows}")
    print("RSS vs rows read:")
    for frac in (0.05, 0.25, 0.5, 0.75, 1.0):
        at = [r for rows, r in samples if rows >= frac * n * 0.999] or [samples[-1][1]]
        print(f"  {int(frac * 100):3d}%  {at[0] / 2**20:8.1f} MiB")
    print(f"RSS before {start_rss / 2**20:.1f} MiB, after 5% of rows {warm_rss / 2**20:.1f} MiB, "
          f"peak {peak / 2**20:.1f} MiB; growth after warm-up {(peak - warm_rss) / 2**20:.1f} MiB "
          f"for a {size / 2**20:.0f} MiB file ({(peak - warm_rss) / max(1, n):.1f} bytes/row)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20_000, help="rows for the throughput part")
    ap.add_argument("--big-gb", type=float, default=1.2, help="size of the generated file for the memory part")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--repeat", type=int, default=3, help="throughput runs of each side (median, min-max)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tailor-bench-prep-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        name, tok = load_tokenizer(args.tokenizer, workdir)
        print(f"tokenizer {name} (vocab {len(tok)}), {os.cpu_count()} CPUs")
        warm_up(workdir, tok)
        if not args.skip_throughput:
            part_throughput(workdir, tok, args.rows, args.repeat)
        if not args.skip_memory:
            part_memory(workdir, tok, args.big_gb)


if __name__ == "__main__":
    main()
