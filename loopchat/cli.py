"""The `loopchat` command: one entry point that wires the rooms together."""

from __future__ import annotations

import click

from loopchat import __version__
from loopchat.commands.canary import canary
from loopchat.commands.feedback import export, feedback, users
from loopchat.commands.keys import keys
from loopchat.commands.loop import cycle, worker
from loopchat.commands.model import model
from loopchat.commands.serve import serve, up
from loopchat.commands.simulate import simulate
from loopchat.commands.train import eval_command, train
from loopchat.commands.ui import ui


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loopchat")
def cli():
    """loopchat: a chat service that gets better from its own users."""


for command in (up, serve, worker, cycle, canary, train, eval_command, model, keys, export, feedback, users, ui, simulate):
    cli.add_command(command)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
