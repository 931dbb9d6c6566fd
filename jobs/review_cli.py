"""``chromascan review DST``: the curators' web app (pipeline/review.py), served locally."""

from __future__ import annotations

from typing import Annotated

import typer

DEFAULT_PORT = 8750


def review_command(
    dst: Annotated[
        str,
        typer.Argument(metavar="DST", help="Colorize destination: folder or URL (s3://...)."),
    ],
    reviewer: Annotated[
        str | None,
        typer.Option(help="Your name, recorded with every decision (not needed with --read-only)."),
    ] = None,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Browse only: no decisions can be made.")
    ] = False,
    host: Annotated[
        str,
        typer.Option(help="Address to listen on; anything but loopback needs --token."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = (
        DEFAULT_PORT
    ),
    token: Annotated[
        str | None,
        typer.Option(
            envvar="CHROMASCAN_REVIEW_TOKEN",
            help="Required on every request (open http://HOST:PORT/?token=...); "
            "needed to listen beyond loopback. Also read from $CHROMASCAN_REVIEW_TOKEN.",
            show_envvar=False,
        ),
    ] = None,
    cache: Annotated[
        str | None,
        typer.Option(help="Folder for the thumbnails made on demand (default: ~/.cache)."),
    ] = None,
) -> None:
    """Browse every scan and its colourised copy; approve or reject them with a reason.

    Decisions are appended to DST/review/ (Parquet), never edited; `manifest export-bag
    --approved-only` bags the approved outputs.
    """
    from pipeline.review import ReviewConfig, create_app, is_loopback

    if not is_loopback(host) and not token:
        raise typer.BadParameter(
            f"listening on {host} exposes the archive to the network; give --token too",
            param_hint="'--host'",
        )
    if not read_only and not (reviewer and reviewer.strip()):
        raise typer.BadParameter(
            "give your name (it is recorded with each decision), or use --read-only",
            param_hint="'--reviewer'",
        )
    if token is not None and len(token) < 16:
        raise typer.BadParameter("use a token of at least 16 characters", param_hint="'--token'")
    import socket
    import sys

    import uvicorn

    app, _state = create_app(
        ReviewConfig(
            dst=dst,
            reviewer=None if read_only else reviewer.strip(),  # type: ignore[union-attr]
            read_only=read_only,
            token=token,
            cache_dir=cache,
        )
    )
    # The socket is bound here, so that --port 0 can say which port it got.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        # Listening before the line below: a browser opened at once waits in the backlog
        # while uvicorn starts, instead of being refused.
        listener.listen(128)
    except OSError as err:
        listener.close()
        raise typer.BadParameter(f"cannot listen on {host}:{port} ({err.strerror})") from err
    bound = listener.getsockname()[1]
    where = f"http://{host if ':' not in host else f'[{host}]'}:{bound}/"
    typer.echo(f"chromascan review: {'read-only, ' if read_only else ''}serving on {where}")
    sys.stdout.flush()  # a supervisor (or a test) reading the pipe learns the port now
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[listener])
