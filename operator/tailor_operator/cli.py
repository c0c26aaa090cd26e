"""The `tailor` command: the groups and the small commands; the commands that start the trainer
or the operator live in `cli_commands` and are added here (imports go one way)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tailor_operator import cli_commands, crdgen
from tailor_operator.validation import validate_file


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tailor")
def main() -> None:
    """Tailor: declarative fine-tuning of pretrained generative models on Kubernetes."""


@main.command()
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=crdgen.REPO_ROOT,
              show_default=True, help="Repository root to write crds/ (and the chart's copy) under.")
def crds(root: Path) -> None:
    """Regenerate the CRDs from the API models."""
    for path in crdgen.write(root):
        click.echo(str(path))


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def validate(files: tuple[Path, ...]) -> None:
    """Check Dataset/FineTuneJob manifests against the API (exit 1 on any problem)."""
    total = 0
    failed = False
    for path in files:
        checked, problems = validate_file(path)
        total += checked
        for problem in problems:
            failed = True
            click.echo(f"error: {problem}", err=True)
    if failed:
        sys.exit(1)
    if total == 0:
        click.echo("error: no tailor.dev objects found", err=True)
        sys.exit(1)
    click.echo(f"ok: {total} object(s) valid")


@main.group()
def dataset() -> None:
    """Dataset tools."""


main.add_command(cli_commands.run)
main.add_command(cli_commands.operator_cmd)
dataset.add_command(cli_commands.inspect)
