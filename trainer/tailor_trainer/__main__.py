"""``python -m tailor_trainer``: the trainer's entrypoint (the RayJob and the local backend use it).

Subcommands:
  run --config FILE       run prep -> adapt -> train -> evaluate for one TrainerConfig
  inspect --dataset FILE  validate a Dataset (prep without writing shards) and print its status
  preflight --config FILE check the base model against the spec on a CPU (no weights) and print
                          the verdict
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tailor_trainer")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline for one TrainerConfig JSON file")
    run.add_argument("--config", required=True, help="TrainerConfig JSON (config.json)")
    run.add_argument("--stages", default=None,
                     help="comma-separated subset of prep,adapt,train,evaluate (default: all)")

    inspect = sub.add_parser("inspect", help="validate a Dataset and print the status Tailor would write")
    inspect.add_argument("--dataset", required=True,
                         help="ResolvedDataset JSON (a Dataset spec plus name/inlineData)")
    inspect.add_argument("--tokenizer", default=None, help="model/tokenizer URI for token statistics")
    inspect.add_argument("--max-seq-length", type=int, default=None)
    inspect.add_argument("--output", choices=["json", "text"], default="json")
    inspect.add_argument("--result-file", default=None, help="also write the JSON status here")

    preflight = sub.add_parser("preflight", help="check the base model against a TrainerConfig on a CPU "
                                                 "(config and tokenizer only, no weights) and print the verdict")
    preflight.add_argument("--config", required=True, help="TrainerConfig JSON (config.json)")
    preflight.add_argument("--result-file", default=None, help="also write the JSON verdict here")

    args = parser.parse_args(argv)
    if args.command == "run":
        from tailor_trainer.pipeline import main_run

        return main_run(args.config, stages=args.stages)
    if args.command == "preflight":
        from tailor_trainer.preflight import main_preflight

        return main_preflight(args.config, result_file=args.result_file)
    from tailor_trainer.stages.prep import main_inspect

    return main_inspect(
        args.dataset,
        tokenizer=args.tokenizer,
        max_seq_length=args.max_seq_length,
        output=args.output,
        result_file=args.result_file,
    )


if __name__ == "__main__":
    sys.exit(main())
