"""`loopchat canary start|share|status|promote|rollback`: canary rollouts through the gateway's admin API
(the gateway loads and probes a version before the store names it, and every gateway follows)."""

from __future__ import annotations

import datetime

import click
import httpx


def gateway_options(func):
    options = [
        click.option("--gateway", default="http://127.0.0.1:8000", envvar="LOOPCHAT_GATEWAY", show_default=True,
                     help="Any gateway of the service: they all follow the same store."),
        click.option("--admin-key", envvar="LOOPCHAT_ADMIN_KEY", default=None,
                     help="Admin API key (not needed when the gateway runs in open mode)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def call(gateway: str, admin_key: str | None, method: str, path: str, **kwargs) -> dict:
    """One admin API call; its JSON, or a one-line error."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    try:
        r = httpx.request(method, gateway.rstrip("/") + path, headers=headers, timeout=300, **kwargs)
    except httpx.HTTPError as e:
        raise click.ClickException(f"cannot reach the gateway at {gateway}: {e}") from e
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text.strip() or r.reason_phrase
        raise click.ClickException(f"{r.status_code}: {message}")
    return r.json()


@click.group()
def canary():
    """Canary rollouts: a published version answers a share of users until live evidence decides."""


@canary.command()
@click.argument("version")
@click.option("--share", type=float, required=True, help="Fraction of users, strictly between 0 and 1 (e.g. 0.1).")
@gateway_options
def start(version, share, gateway, admin_key):
    """Put VERSION (e.g. v3) on canary beside the serving version."""
    row = call(gateway, admin_key, "POST", f"/admin/adapters/{version}/canary", json={"share": share})
    click.echo(f"canary {row['id']}: {row['version']} answers {row['share']:.0%} of users beside "
               f"{_version(row['baseline'])} (rule: {_rule(row['rule'])})")


@canary.command()
@click.argument("share", type=float)
@gateway_options
def share(share, gateway, admin_key):
    """Change the running canary's SHARE of users."""
    row = call(gateway, admin_key, "PATCH", "/admin/canary", json={"share": share})
    click.echo(f"canary {row['id']}: {row['version']} answers {row['share']:.0%} of users")


@canary.command()
@gateway_options
def status(gateway, admin_key):
    """The running canary, its live evidence with 95% intervals, the rule's state; recent canaries."""
    body = call(gateway, admin_key, "GET", "/admin/canary")
    row = body["canary"]
    if row is None:
        click.echo(f"no canary running (rule for new ones: {_rule(body['rule'])})")
    else:
        ev, decision = body["evidence"], body["decision"]
        click.echo(f"canary {row['id']}: {row['version']} answers {row['share']:.0%} of users beside "
                   f"{_version(row['baseline'])} since {_when(row['started_at'])}")
        for arm in ("canary", "baseline"):
            a = ev[arm]
            click.echo(f"  {arm:<9}{_version(a['version']):<11}{a['answers']:>6} answers {a['rated']:>6} rated  "
                       f"thumbs-up {_rate(a['rate'], a['ci95'])}")
        h2h = ev["head_to_head"]
        click.echo(f"  head-to-head {h2h['wins']}-{h2h['losses']}-{h2h['ties']} (n={h2h['n']})  "
                   f"win rate {_rate(h2h['win_rate'], h2h['ci95'])}")
        click.echo(f"  rule ({_rule(row['rule'])}): {decision['state']}: {decision['reason']}")
    for r in body["recent"]:
        click.echo(f"  ended: canary {r['id']} {r['version']} {r['outcome']} by {r['ended_by']} {_when(r['ended_at'])}")


@canary.command()
@gateway_options
def promote(gateway, admin_key):
    """End the canary: its version serves everyone."""
    body = call(gateway, admin_key, "POST", "/admin/canary/promote")
    click.echo(f"canary {body['canary']['id']} promoted: {_version(body['serving'])} serves")


@canary.command()
@gateway_options
def rollback(gateway, admin_key):
    """End the canary: its users go back to the serving version."""
    body = call(gateway, admin_key, "POST", "/admin/canary/rollback")
    click.echo(f"canary {body['canary']['id']} rolled back: {_version(body['serving'])} serves")


def _version(version: str | None) -> str:
    return version or "the base model"


def _rule(rule: dict) -> str:
    return (f"{'automatic' if rule['auto'] else 'operator-confirmed'}, min {rule['min_answers']} rated answers or "
            f"{rule['min_votes']} votes, margin {rule['margin']:g}, alpha {rule['alpha']:g}")


def _rate(value: float | None, ci95: list | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" [{ci95[0]:.3f}, {ci95[1]:.3f}]" if ci95 else "")


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%F %T") if ts else "-"
