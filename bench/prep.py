"""Benchmark of the prep stage: throughput against a plain loop, and memory on a >1 GB file.

    PYTHONPATH=operator:trainer python bench/prep.py                 # both parts, 1.2 GB file
    PYTHONPATH=operator:trainer python bench/prep.py --big-gb 0.2    # quicker memory check
    PYTHONPATH=operator:trainer python bench/prep.py --skip-memory --rows 50000

Part 1 writes a JSONL file of prompt/completion rows and times, in the same process,
  baseline  for each line: json.loads, tokenize prompt and completion (a straightforward loop)
  prep      the whole stage: read, map, clean, dedupe, split, eval-overlap, tokenize, write Parquet
and prints rows/s, tokens/s and the ratio prep/baseline.

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


def baseline(path: Path, tok) -> tuple[int, int, float]:
    t0 = time.perf_counter()
    rows = tokens = 0
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            ids = tok(row["prompt"])["input_ids"] + tok(row["completion"], add_special_tokens=False)["input_ids"]
            tokens += len(ids) + 1
            rows += 1
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
    baseline(path, tok)


def part_throughput(workdir: Path, tok, rows: int) -> None:
    path = workdir / "completion.jsonl"
    write_completion_file(path, rows)
    size = path.stat().st_size
    b_rows, b_tokens, b_s = baseline(path, tok)
    result, p_s = run_stage(path, tok, "completion", workdir / "out-throughput", max_len=4096)
    p_tokens = result.total_tokens
    print(f"\n== throughput: {rows} completion rows, {size / 1e6:.1f} MB ==")
    print(f"baseline  {b_rows / b_s:10.0f} rows/s  {b_tokens / b_s:12.0f} tokens/s  ({b_s:.1f} s)")
    print(f"prep      {result.rows_read / p_s:10.0f} rows/s  {p_tokens / p_s:12.0f} tokens/s  ({p_s:.1f} s)"
          f"  kept {result.rows}, dropped {dict(result.dropped)}")
    print(f"ratio prep/baseline: rows/s x{(result.rows_read / p_s) / (b_rows / b_s):.2f}, "
          f"tokens/s x{(p_tokens / p_s) / (b_tokens / b_s):.2f}")


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
            part_throughput(workdir, tok, args.rows)
        if not args.skip_memory:
            part_memory(workdir, tok, args.big_gb)


if __name__ == "__main__":
    main()
