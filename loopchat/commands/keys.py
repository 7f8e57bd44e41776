"""`loopchat keys create|list`: API keys; only their hashes are stored."""

from __future__ import annotations

import datetime

import click

from loopchat.options import open_store, settings_options


@click.group()
def keys():
    """Create and list API keys."""


@keys.command()
@click.argument("name")
@click.option("--admin", is_flag=True, help="The key may call the admin API (promote, rollback, cycles).")
@settings_options
def create(settings, name, admin):
    """Create a key for user NAME and print it (it is shown only this once)."""
    if not name.strip() or len(name) > 128:
        raise click.ClickException("NAME must be 1 to 128 characters")
    key = open_store(settings).create_key(name.strip(), admin=admin)
    click.echo(key)
    click.echo(f"created {'an admin' if admin else 'a'} key for {name}; store it now, it is not shown again",
               err=True)


@keys.command("list")
@settings_options
def list_keys(settings):
    """List keys (user, admin, created) without the secrets."""
    store = open_store(settings)
    for row in store.rows("SELECT id, user, admin, created_at, revoked_at FROM api_keys ORDER BY id"):
        when = datetime.datetime.fromtimestamp(row["created_at"]).strftime("%F %T")
        state = "revoked" if row["revoked_at"] else "active"
        click.echo(f"{row['id']:>4}  {row['user']:<24} {'admin' if row['admin'] else 'user ':<6} {when}  {state}")
