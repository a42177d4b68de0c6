"""The ``squeeze`` command: serve, worker, users, keys, admin, migrate; and the client commands (``squeeze.cli``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Annotated

import typer

from squeeze.cli import register as register_client_commands

cli = typer.Typer(
    help="Squeeze: model compression as a service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
users_cli = typer.Typer(help="Manage users.", no_args_is_help=True)
keys_cli = typer.Typer(help="Manage API keys.", no_args_is_help=True)
cli.add_typer(users_cli, name="users")
cli.add_typer(keys_cli, name="keys")
admin_cli = typer.Typer(help="Housekeeping: unreferenced blobs, artifact retention.", no_args_is_help=True)
cli.add_typer(admin_cli, name="admin")


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    worker: Annotated[
        bool | None,
        typer.Option(help="Also start a worker process (default: yes in embedded mode, with no broker URL set)."),
    ] = None,
) -> None:
    """Run the API (migrating the database first); in embedded mode, with a worker beside it."""
    import uvicorn

    from app.config import get_settings
    from app.main import create_app
    from app.migrate import upgrade_database
    from app.observability import configure_logging

    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    for d in (settings.data_dir, settings.resolved_work_dir, settings.resolved_storage_dir):
        d.mkdir(parents=True, exist_ok=True)
    upgrade_database()
    start_worker = worker if worker is not None else not settings.broker_url
    child: subprocess.Popen[bytes] | None = None
    if start_worker:
        child = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=os.environ.copy())
        typer.echo(f"squeeze: worker process started (pid {child.pid})")
    typer.echo(f"squeeze: database {_redact(settings.resolved_database_url)}")
    typer.echo(f"squeeze: API on http://{host}:{port}  (docs: http://{host}:{port}/docs)")
    typer.echo("squeeze: get an API key with:  squeeze users create NAME   (add --admin for an admin)")
    try:
        uvicorn.run(create_app(migrate_on_start=False), host=host, port=port, log_level="info", log_config=None)
    finally:
        if child is not None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()


@cli.command("worker")
def worker_cmd(
    queues: Annotated[str, typer.Option(help="Comma-separated queues to consume: cpu, gpu.")] = "cpu",
    concurrency: Annotated[int, typer.Option(help="Worker processes (each runs one job at a time).")] = 1,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Compute threads per job (torch and ONNX Runtime). Default: OMP_NUM_THREADS if set, else the "
            "cores this process may use divided by --concurrency (at least 1), so parallel jobs do not "
            "oversubscribe the machine.",
        ),
    ] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run a Celery worker (prefork: each job runs in a child process with time limits and recycling)."""
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        typer.echo(
            "squeeze: refusing to start: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD would let uploaded pickles run code",
            err=True,
        )
        raise typer.Exit(2)
    if "torch" in sys.modules:  # forked children of a torch-initialised parent spin forever
        raise RuntimeError("torch was imported in the worker's parent process")
    from celery.signals import worker_ready

    from app.config import get_settings
    from app.observability import configure_logging
    from app.queue import queue_name
    from worker.presence import WorkerPresence, detect_gpus

    gpus = detect_gpus()
    if gpus and "SQUEEZE_GPU_ENABLED" not in os.environ:
        # Pipelines here may run on CUDA (device cuda, or auto): no address-space limit for them. Set before the
        # settings are read and the pool forks, so every pipeline process sees it.
        os.environ["SQUEEZE_GPU_ENABLED"] = "true"
        get_settings.cache_clear()
    from worker.celery_app import celery_app

    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    settings.resolved_work_dir.mkdir(parents=True, exist_ok=True)
    # Every job's sandbox inherits OMP_NUM_THREADS (allow-listed): torch reads it at import, and the ONNX
    # backends size their sessions from it (worker.compress.onnx_format.session_options).
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    else:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // concurrency)))
    # SIGTERM → soft shutdown (running job gets worker_soft_shutdown_s), then cold shutdown, which requeues it.
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    presence = WorkerPresence(settings, queues=wanted, concurrency=concurrency, gpus=gpus)
    worker_ready.connect(lambda sender, **_: presence.start(getattr(sender, "hostname", None)), weak=False)
    try:
        celery_app.worker_main(
            [
                "worker",
                f"--queues={','.join(queue_name(q, settings) for q in wanted)}",
                f"--concurrency={concurrency}",
                f"--loglevel={loglevel}",
                "--pool=prefork",
                "--without-gossip",
                "--without-mingle",
                f"--hostname=squeeze-{'-'.join(wanted)}-{os.getpid()}@%h",
            ]
        )
    finally:
        presence.stop()


@users_cli.command("create")
def users_create(
    name: str, admin: Annotated[bool, typer.Option("--admin", help="May see every user's resources.")] = False
) -> None:
    """Create a user and print a new API key for it (shown once)."""
    from app.auth.service import create_key, create_user
    from app.db import session_scope
    from app.migrate import upgrade_database

    upgrade_database()
    with session_scope() as s:
        user = create_user(s, name=name, is_admin=admin)
        key = create_key(s, user=user)
    typer.echo(key)


@keys_cli.command("create")
def keys_create(user: str) -> None:
    """Print a new API key for an existing user (shown once)."""
    from app.auth.service import create_key, find_user
    from app.db import session_scope

    with session_scope() as s:
        key = create_key(s, user=find_user(s, name=user))
    typer.echo(key)


@keys_cli.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key, or its prefix (the part after 'sqz_').")],
) -> None:
    """Revoke an API key; requests with it get 401 from then on."""
    from app.auth.service import revoke_key
    from app.db import session_scope

    with session_scope() as s:
        revoked = revoke_key(s, key_or_prefix=key)
        prefix = revoked.prefix
    typer.echo(f"revoked key {prefix}")


@cli.command()
def migrate() -> None:
    """Upgrade the database schema to the newest revision."""
    from app.migrate import upgrade_database

    upgrade_database()
    typer.echo("database is at the newest revision")


DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Only say what would be deleted.")]
GraceOpt = Annotated[
    float,
    typer.Option(min=0, help="Keep unreferenced blobs younger than this many minutes: their row may be coming."),
]


@admin_cli.command("gc")
def admin_gc(
    dry_run: DryRunOpt = False,
    grace_minutes: GraceOpt = 60,
) -> None:
    """Delete stored blobs that no model, dataset or artifact refers to (uploads in progress are never touched)."""
    from datetime import timedelta

    from app.admin.service import collect_garbage
    from app.db import get_sessionmaker
    from app.storage import get_store

    with get_sessionmaker()() as s:
        report = collect_garbage(s, get_store(), grace=timedelta(minutes=grace_minutes), dry_run=dry_run)
    typer.echo(
        f"gc: {'would delete' if dry_run else 'deleted'} {len(report.deleted)} unreferenced blobs "
        f"({report.deleted_bytes} bytes); kept {report.kept_recent} younger than {grace_minutes:g} minutes"
    )


@admin_cli.command("retention")
def admin_retention(
    older_than_days: Annotated[
        int | None,
        typer.Option(
            min=1, help="Delete artifacts of jobs finished longer ago (default: SQUEEZE_ARTIFACT_RETENTION_DAYS)."
        ),
    ] = None,
    dry_run: DryRunOpt = False,
    grace_minutes: GraceOpt = 60,
) -> None:
    """Delete old jobs' artifacts, then their blobs unless another row shares them; jobs, models and datasets stay."""
    from datetime import timedelta

    from app.admin.service import expire_artifacts
    from app.config import get_settings
    from app.db import get_sessionmaker
    from app.storage import get_store

    days = older_than_days or get_settings().artifact_retention_days
    if not days:
        typer.echo("squeeze: give --older-than-days N (or set SQUEEZE_ARTIFACT_RETENTION_DAYS)", err=True)
        raise typer.Exit(2)
    with get_sessionmaker()() as s:
        report = expire_artifacts(
            s, get_store(), older_than=timedelta(days=days), grace=timedelta(minutes=grace_minutes), dry_run=dry_run
        )
    typer.echo(
        f"retention: {'would delete' if dry_run else 'deleted'} {report.artifacts} artifacts "
        f"({report.artifact_bytes} bytes) of {report.jobs} jobs finished before {report.cutoff:%Y-%m-%d %H:%M} UTC"
        + ("" if dry_run else f"; {len(report.blobs.deleted)} blobs ({report.blobs.deleted_bytes} bytes) freed")
    )


register_client_commands(cli)  # login, models, datasets, jobs, download, compress: the API's client side


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def main() -> None:
    from app.errors import SqueezeError

    try:
        cli()
    except SqueezeError as exc:
        typer.echo(f"squeeze: {exc.message}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
