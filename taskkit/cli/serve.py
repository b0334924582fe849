"""``taskkit serve``: the HTTP service and dashboard (``taskkit.api``) under uvicorn.

::

    taskkit serve [--host 127.0.0.1] [--port 8000] [--app workers.app] [--log-level info]

Decisions:

- It listens on the loopback address by default. Any other address (``0.0.0.0``, a LAN
  address, a host name other than ``localhost``) needs ``TASKKIT_API_TOKEN``: without one the
  command refuses with one line and exit 2, since whoever reaches the port could read every
  run and dead letter (and changes need the token anyway).
- The Celery app (``--app``, else ``TASKKIT_APP``, else ``workers.app``) is loaded before it
  listens, so a wrong module is one line and exit 2 rather than a 500 on the first replay.
- The database's schema revision is not required to be at head to start: ``/health/ready``
  answers 503 naming it, which is what a load balancer acts on.
- Logs and alerts are set up as in a worker: ``TASKKIT_LOG_FORMAT=json`` makes uvicorn's
  records JSON lines too, and a breaker that opens here (a reset from the dashboard) alerts.
- FastAPI, uvicorn and the app load inside the command, so ``taskkit --help`` does without
  them (``tests/cli/test_startup.py``); without the ``api`` extra it says what to install.

Example::

    $ TASKKIT_API_TOKEN=$(openssl rand -hex 16) taskkit serve --host 0.0.0.0 --port 8000
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

import typer

from taskkit.cli import _common
from taskkit.cli._common import DEFAULT_APP, AppOption, CliError, fail

__all__ = ["is_loopback", "serve_app"]

serve_app = typer.Typer(cls=_common.Group)

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``127.0.0.0/8``, ``::1``,
    ``localhost``); a name other than ``localhost`` is not (it could resolve anywhere).

    Example::

        is_loopback("127.0.0.1"), is_loopback("0.0.0.0")    # (True, False)
    """
    if host.strip().lower() in {"localhost", "localhost."}:
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


@serve_app.command("serve")
def _serve_command(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    app_spec: AppOption = DEFAULT_APP,
    log_level: Annotated[
        str, typer.Option("--log-level", help="uvicorn's log level: " + ", ".join(LOG_LEVELS))
    ] = "info",
) -> None:
    """Run the HTTP service and dashboard (needs TASKKIT_API_TOKEN beyond loopback)."""
    try:
        api = _build(host, app_spec, log_level)
    except CliError as exc:
        raise fail(exc.message, exc.code) from None
    import uvicorn  # noqa: PLC0415 - checked by _build

    uvicorn.run(api, host=host, port=port, log_level=log_level, log_config=_observe())


def _observe() -> dict[str, Any]:
    """Logs and alerts as in a worker (``taskkit.telemetry``): ``TASKKIT_LOG_FORMAT`` for
    taskkit's records and uvicorn's, the ``LOG_*`` filter, the breaker alerts; returns
    uvicorn's log config."""
    import copy  # noqa: PLC0415

    from uvicorn.config import LOGGING_CONFIG  # noqa: PLC0415

    from taskkit.config import load_settings  # noqa: PLC0415
    from taskkit.telemetry.alerts import install_alerts  # noqa: PLC0415
    from taskkit.telemetry.logs import configure_logging  # noqa: PLC0415

    settings = load_settings()
    configure_logging(settings)
    install_alerts(settings)
    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    if settings.log_format == "json":
        json_formatter = {"()": "taskkit.telemetry.logs.JsonFormatter"}
        config["formatters"] = {"default": json_formatter, "access": dict(json_formatter)}
    return config


def _build(host: str, app_spec: str, log_level: str) -> Any:
    if log_level not in LOG_LEVELS:
        raise CliError(f"--log-level {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    from taskkit.config import load_settings  # noqa: PLC0415 - pydantic: only here
    from taskkit.errors import ConfigurationError  # noqa: PLC0415

    try:
        settings = load_settings()
    except ConfigurationError as exc:
        raise CliError(str(exc)) from None
    if settings.api_token is None and not is_loopback(host):
        raise CliError(
            f"refusing to listen on {host} without TASKKIT_API_TOKEN: set a token, or listen on "
            "127.0.0.1"
        )
    try:
        import uvicorn  # noqa: F401, PLC0415

        from taskkit.api import create_api  # noqa: PLC0415
    except ImportError as exc:
        raise CliError(
            f"taskkit serve needs the api extra ({exc.name} is missing): pip install 'taskkit[api]'"
        ) from None
    from taskkit.cli._launch import load_app  # noqa: PLC0415

    return create_api(settings, celery_app=load_app(app_spec))
