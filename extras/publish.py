"""Values from other programs: ``POST /publish`` with a bearer token, and ``flask --app application publish VALUE``.

A published value takes the stream's next id and goes into the history like
any other (in a cluster, through Redis), so every client, of every process, gets it.
"""
import hmac
import json
import logging
import math

import click
from flask import Blueprint, current_app, jsonify, request

from protocol import VALUE

logger = logging.getLogger("extras.publish")
bp = Blueprint("publish", __name__)


def init_app(app):
    """Serve POST /publish (404 unless PUBLISH_TOKEN is set), and add the ``publish`` command."""
    app.register_blueprint(bp)
    app.cli.add_command(publish_command)


def is_finite_number(value):
    """Return True for an int or a float that is neither infinite nor NaN (a bool is not a number here).

    Change this if your values are not numbers.
    """
    return type(value) in (int, float) and math.isfinite(value)


@bp.post("/publish")
def publish():
    """Put a value into the stream for another program: ``{"number": 4.2}`` with a bearer token."""
    token = current_app.config["PUBLISH_TOKEN"]
    if not token:
        return jsonify(error="Not found."), 404  # off unless a token is set
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        logger.warning("Refused a publish without a bearer token")
        return jsonify(error="Send Authorization: Bearer <PUBLISH_TOKEN>."), 401, {"WWW-Authenticate": "Bearer"}
    if not hmac.compare_digest(given.encode(), token.encode()):
        logger.warning("Refused a publish with a wrong token")
        return jsonify(error="Wrong token."), 403
    body = request.get_json(silent=True)
    to_user = current_app.extensions.get("publish_to_user")  # set by extras.notifications
    if to_user is not None and isinstance(body, dict) and "user" in body:
        return to_user(body)
    value = body.get(VALUE) if isinstance(body, dict) else None
    if not is_finite_number(value):
        logger.warning("Refused a publish without a finite number")
        return jsonify(error=f'Send a JSON object {{"{VALUE}": <a finite number>}}.'), 400
    message = current_app.extensions["feed"].publish(value)
    if message is None:
        return jsonify(error="The message queue is unavailable; try again."), 503
    return jsonify(message)


@click.command("publish")
@click.argument("value", type=float)
def publish_command(value):
    """Put VALUE into the stream (of a cluster, with MESSAGE_QUEUE set) and print its message."""
    if not is_finite_number(value):
        raise click.BadParameter(f"{value} is not a finite number", param_hint="VALUE")
    if not current_app.config["MESSAGE_QUEUE"]:
        raise click.UsageError("set MESSAGE_QUEUE=redis://...: the stream of a running cluster lives there")
    message = current_app.extensions["feed"].publish(value)
    if message is None:
        raise click.ClickException(f"Redis at {current_app.config['MESSAGE_QUEUE']} is unavailable")
    click.echo(json.dumps(message))
