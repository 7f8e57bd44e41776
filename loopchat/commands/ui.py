"""`loopchat ui`: the browser UI on its own, in front of a gateway running elsewhere."""

from __future__ import annotations

import click


@click.command()
@click.option("--gateway", default="http://127.0.0.1:8000", show_default=True, envvar="LOOPCHAT_GATEWAY",
              help="The loopchat gateway's URL.")
@click.option("--api-key", envvar="LOOPCHAT_API_KEY", default=None,
              help="Sent for every browser session; without it, a gateway that needs keys asks each user for one.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(1, 65535))
def ui(gateway, api_key, host, port):
    """Serve the browser UI (chat, compare, operator) as a client of GATEWAY's HTTP API."""
    from ui.app import build_app

    build_app(gateway, api_key).launch(server_name=host, server_port=port, footer_links=[])
