"""Benchmark of the hyperparameter search: wall time of a Ray Tune search against the same
trainings run as plain ``fit()`` calls.

    PYTHONPATH=operator:trainer python bench/search.py                  # 4 trials x 20 steps, 3 repeats
    PYTHONPATH=operator:trainer python bench/search.py --trials 6 --steps 40 --concurrent 2

Same model (``--model``, default examples/models/tailor-tiny-llama), same prepared rows (the
quickstart support instructions, tokenized once by the prep stage), same trials (the values the
search drew, from its manifest), same steps, CPU threads and concurrency, alternating
  search  the train stage with ``spec.search`` (``run_train`` -> ``search.run_search``: Ray Tune,
          FIFO scheduler so every trial does the same work as its plain twin; each trial a Tune
          actor that imports the trainer and loads the model), then copying the best model
  plain   the same trial configs (``search.trial_config``) trained by ``training.fit`` in this
          process, one after another (``--concurrent`` > 1: a pool of that many processes
          started with ``multiprocessing`` spawn, as many as the search runs at once)
each ``--repeats`` times (>= 3). The local Ray is started once before timing (its start-up is
printed separately), as a RayJob's cluster is already up. Prints the median wall time of each
with its spread (min-max) and the ratio search/plain: the search's overhead (Tune's controller,
an actor and imports per trial, result reporting, experiment-state saving). Informative only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def config(work: Path, args: argparse.Namespace, run: str, search: bool = True):
    from tailor_trainer.config import TrainerConfig

    body = {
        "run": {"job": "bench", "name": run}, "model": {"uri": args.model},
        "dataset": {"name": "support", "source": {"uri": args.data}, "schema": "instruction",
                    "split": {"validation": 0.05, "test": 0.05}},
        "adaptation": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "hyperparameters": {"learningRate": 1e-3, "batchSize": args.batch_size, "maxSteps": args.steps,
                            "maxSeqLength": args.seq, "checkpointEverySteps": args.steps,
                            "evalEverySteps": max(1, args.steps // 4), "seed": 1},
        "evaluation": {"metrics": ["loss"]},
        "resources": {"workers": 1, "cpusPerWorker": args.threads},
        "outputUri": str(work / run),
    }
    if search:
        body["search"] = {"space": {"learningRate": {"choices": [1e-4, 3e-4, 1e-3, 3e-3]},
                                    "lora": {"r": {"choices": [4, 8, 16]}}},
                          "trials": args.trials, "concurrentTrials": args.concurrent, "scheduler": "fifo",
                          "seed": 1}
    return TrainerConfig.model_validate(body)


def run_search(cfg, prep_dir: Path) -> tuple[float, list[dict]]:
    from tailor_trainer.stages import StageContext
    from tailor_trainer.stages.train import run_train

    run_dir = Path(cfg.output_uri)
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(prep_dir, run_dir / "prep")
    ctx = StageContext(config=cfg, run_dir=str(run_dir), config_hash=cfg.config_hash(), model_dir=cfg.model.uri)
    start = time.perf_counter()
    manifest = run_train(ctx)
    wall = time.perf_counter() - start
    table = manifest["search"]["table"]
    assert all(t["state"] == "completed" for t in table), table
    return wall, table


def plain_trial(spec: dict) -> int:
    """One trial as a plain fit() (in this process, or a spawned one)."""
    sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer")]
    from tailor_trainer.batches import load_rows
    from tailor_trainer.config import TrainerConfig
    from tailor_trainer.training import fit

    cfg = TrainerConfig.model_validate(spec["config"])
    os.makedirs(spec["trainDir"], exist_ok=True)
    train, val = load_rows(spec["runDir"], "train"), load_rows(spec["runDir"], "validation")
    _, outcome = fit(cfg, cfg.model.uri, train, val, config_hash=cfg.config_hash(), train_dir=spec["trainDir"],
                     threads=spec["threads"])
    return outcome["steps"]


def run_plain(cfg, table: list[dict], prep_dir: Path, concurrent: int, threads: int) -> float:
    from tailor_trainer.batches import load_rows
    from tailor_trainer.search import trial_config

    run_dir = Path(cfg.output_uri)
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(prep_dir, run_dir / "prep")
    n = len(load_rows(str(run_dir), "train"))
    # lora.r comes back from the summary as a float (contract.Trial.params)
    specs = [{"config": trial_config(cfg, {**t["params"], "lora.r": int(t["params"]["lora.r"])}, n)[0]
              .model_dump(mode="json", by_alias=True), "runDir": str(run_dir), "threads": threads,
              "trainDir": str(run_dir / "train" / t["id"])} for t in table]
    start = time.perf_counter()
    if concurrent == 1:
        steps = [plain_trial(s) for s in specs]
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(concurrent) as pool:
            steps = pool.map(plain_trial, specs, chunksize=1)
    wall = time.perf_counter() - start
    assert steps == [t["steps"] for t in table], (steps, table)
    return wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "examples" / "models" / "tailor-tiny-llama"))
    p.add_argument("--data", default=str(REPO / "examples" / "data" / "support-instructions.jsonl"))
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--concurrent", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per trial (cpusPerWorker)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from tailor_trainer.runtime import ensure_ray
    from tailor_trainer.stages.prep import run_prep

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tailor-bench-search-"))
    run_prep(config(work, args, "prep", search=False), str(work / "prep-run"))
    prep_dir = work / "prep-run" / "prep"
    t = time.perf_counter()
    ensure_ray(config(work, args, "ray"))
    ray_start = time.perf_counter() - t
    print(f"model {args.model}\n{args.trials} trials x {args.steps} steps, {args.concurrent} at once, batch "
          f"{args.batch_size}, max {args.seq} tokens, {args.threads} thread(s) per trial; "
          f"local Ray start-up {ray_start:.1f} s (not counted)\n")
    walls: dict[str, list[float]] = {"search": [], "plain": []}
    for r in range(args.repeats):
        wall, table = run_search(config(work, args, f"search-{r}"), prep_dir)
        walls["search"].append(wall)
        walls["plain"].append(run_plain(config(work, args, f"plain-{r}"), table, prep_dir, args.concurrent,
                                        args.threads))
        drawn = ", ".join("{} lr {:g} r {:g}".format(t["id"], t["params"]["learningRate"], t["params"]["lora.r"])
                          for t in table)
        print(f"repeat {r + 1}: search {walls['search'][-1]:.1f} s, plain {walls['plain'][-1]:.1f} s  ({drawn})")
    med = {k: statistics.median(v) for k, v in walls.items()}
    print(f"\n{'run':<8}{'median s':>10}{'min s':>8}{'max s':>8}{'per trial s':>13}")
    for k, v in walls.items():
        print(f"{k:<8}{med[k]:>10.1f}{min(v):>8.1f}{max(v):>8.1f}{med[k] / args.trials:>13.2f}")
    ratios = [s / p for s, p in zip(walls["search"], walls["plain"])]
    print(f"ratio search/plain: median {statistics.median(ratios):.2f} (per repeat "
          f"{', '.join(f'{x:.2f}' for x in ratios)}); overhead per trial "
          f"{(med['search'] - med['plain']) / args.trials * args.concurrent:+.1f} s")
    print(json.dumps({"walls": walls, "rayStartSeconds": round(ray_start, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
