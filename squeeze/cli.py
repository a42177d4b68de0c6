"""The client commands of ``squeeze``: login, models, datasets, jobs, download, compress.

Built on ``squeeze.client``; added to the server's typer app by ``register(cli)``. Data (ids, tables, JSON) goes
to stdout, progress and messages to stderr, and the exit code says what happened (``EXIT_CODES``).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Column, Table

from app.jobs.schemas import ArtifactPublic
from squeeze.client import Job, Squeeze
from squeeze.config import config_path, remove_config_file, resolve, write_config_file
from squeeze.errors import (
    ChecksumMismatch,
    ConfigError,
    InvalidArgument,
    JobFailed,
    JobTimeout,
    SqueezeAPIError,
    SqueezeConnectionError,
)
from squeeze.recipes import RECIPES, recipe_steps
from squeeze.results import ResultTable

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_TIMEOUT = 4
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_JOB_FAILED: "the job failed or was cancelled",
    EXIT_USAGE: "usage or spec error: bad arguments, no key, or the server refused the request (4xx)",
    EXIT_UNREACHABLE: "server unreachable, server error (5xx), or a download that failed verification",
    EXIT_TIMEOUT: "--timeout passed while waiting for a job (the job keeps running)",
}
EPILOG = "Exit codes: " + "; ".join(f"{code} {what}" for code, what in EXIT_CODES.items()) + "."

P = ParamSpec("P")
R = TypeVar("R")

err = Console(stderr=True, soft_wrap=True)
out = Console() if sys.stdout.isatty() else Console(width=200)  # logs and pipes: wider than 80 columns

models_cli = typer.Typer(help="Upload, list, show and delete models.", no_args_is_help=True)
datasets_cli = typer.Typer(help="Upload, list, show and delete datasets (.npz, or .jsonl text).", no_args_is_help=True)
jobs_cli = typer.Typer(help="Submit, follow, list and cancel compression jobs.", no_args_is_help=True)


class UsageProblem(InvalidArgument):
    """A mistake in what the user gave (a spec file, a flag combination): exit 2."""


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]squeeze:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def handles_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the client's exceptions into a message on stderr and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except SqueezeAPIError as exc:
            code = EXIT_UNREACHABLE if exc.status >= 500 else EXIT_USAGE
            raise _fail(f"{exc.message} [{exc.code}, HTTP {exc.status}]", code) from None
        except SqueezeConnectionError as exc:
            raise _fail(str(exc), EXIT_UNREACHABLE) from None
        except ChecksumMismatch as exc:
            raise _fail(str(exc), EXIT_UNREACHABLE) from None
        except JobTimeout as exc:
            raise _fail(f"{exc}: follow it with `squeeze jobs watch {exc.job.id}`", EXIT_TIMEOUT) from None
        except JobFailed as exc:
            raise _fail(str(exc), EXIT_JOB_FAILED) from None
        except (ConfigError, InvalidArgument) as exc:
            raise _fail(str(exc), EXIT_USAGE) from None
        except OSError as exc:  # a local file that cannot be read or written
            raise _fail(str(exc), EXIT_USAGE) from None
        except KeyboardInterrupt:
            err.print("squeeze: interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _client() -> Squeeze:
    return Squeeze()


def _print_json(value: BaseModel | dict[str, Any] | list[Any]) -> None:
    data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    print(json.dumps(data, indent=2, default=str))


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@contextmanager
def _transfer(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr (on a terminal) fed by a client progress callback."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task(escape(description), total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


# -- login ----------------------------------------------------------------------------------------------------


@handles_errors
def login(
    url: Annotated[
        str | None, typer.Option(envvar="SQUEEZE_URL", help="Server URL (default: the saved one, else local).")
    ] = None,
    key: Annotated[
        str | None, typer.Option(envvar="SQUEEZE_API_KEY", help="API key (asked for, hidden, when not given).")
    ] = None,
    verify: Annotated[bool, typer.Option(help="Check the key against the server before saving it.")] = True,
) -> None:
    """Save the server URL and API key for later commands (a 0600 file in ~/.config/squeeze)."""
    url = (url or resolve().url).rstrip("/")
    if not key:
        key = typer.prompt("API key", hide_input=True).strip()
    if not key:
        raise UsageProblem("an empty API key")
    if verify:
        with Squeeze(url, key) as client:
            client.list_models(limit=1)
    path = write_config_file(url, key)
    err.print(f"logged in to {escape(url)}; saved to {escape(str(path))} (mode 0600)", highlight=False)


@handles_errors
def logout() -> None:
    """Forget the saved URL and key."""
    path = config_path()
    removed = remove_config_file(path)
    err.print(f"removed {path}" if removed else f"nothing saved at {path}", highlight=False)


# -- models and datasets --------------------------------------------------------------------------------------

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")]
QuietFlag = Annotated[bool, typer.Option("--quiet", "-q", help="Print the id only (for scripts).")]
LimitOpt = Annotated[int, typer.Option(min=1, max=500, help="At most this many, newest first.")]
CursorOpt = Annotated[str | None, typer.Option(help="Continue a listing from this cursor.")]


def _model_line(m: Any) -> str:
    return f"{m.id}  {m.name}  ({m.format}, {_size(m.size_bytes)}, {m.parameters:,} parameters)"


def _dataset_line(d: Any) -> str:
    arrays = ", ".join(d.arrays) if d.has_labels else ", ".join([*d.arrays, "no labels"])
    return f"{d.id}  {d.name}  ({d.num_samples} samples: {arrays}; {_size(d.size_bytes)})"


@models_cli.command("upload")
@handles_errors
def models_upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="Model file.")],
    name: Annotated[str | None, typer.Option(help="Display name (default: the file name).")] = None,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Upload a model (ONNX, .zip of ONNX with external data, .pt2, TorchScript, or a Hugging Face folder as .zip/.tar),
    streamed with a progress bar."""
    with _client() as client, _transfer(f"uploading {path.name}") as progress:
        model = client.upload_model(path, name=name, progress=progress)
    if as_json:
        _print_json(model)
    elif quiet:
        print(model.id)
    else:
        out.print(_model_line(model), highlight=False)


@models_cli.command("list")
@handles_errors
def models_list(limit: LimitOpt = 50, cursor: CursorOpt = None, as_json: JsonFlag = False) -> None:
    """Your models, newest first."""
    with _client() as client:
        page = client.list_models(limit=limit, cursor=cursor)
    if as_json:
        return _print_json(page)
    table = Table(Column("id", no_wrap=True), "name", "format", "size", "parameters", "created")
    for m in page.items:
        table.add_row(m.id, escape(m.name), m.format, _size(m.size_bytes), f"{m.parameters:,}", f"{m.created_at:%F %T}")
    out.print(table)
    if page.next_cursor:
        err.print(f"more: --cursor {page.next_cursor}", highlight=False)


@models_cli.command("show")
@handles_errors
def models_show(model_id: str, as_json: JsonFlag = False) -> None:
    """A model and what inspection found: inputs, outputs, parameters."""
    with _client() as client:
        m = client.get_model(model_id)
    if as_json:
        return _print_json(m)
    out.print(_model_line(m), highlight=False)
    out.print(f"sha256 {m.sha256}  packaging {m.packaging}  created {m.created_at:%F %T}", highlight=False)
    table = Table("", "name", "shape", "dtype")
    for kind, specs in (("input", m.inputs), ("output", m.outputs)):
        for t in specs:
            table.add_row(kind, escape(t.name), str(t.shape), t.dtype)
    out.print(table)


@models_cli.command("rm")
@handles_errors
def models_rm(model_ids: Annotated[list[str], typer.Argument(help="One or more model ids.")]) -> None:
    """Delete models (refused while a queued or running job uses one)."""
    with _client() as client:
        for model_id in model_ids:
            client.delete_model(model_id)
            err.print(f"deleted {model_id}", highlight=False)


@datasets_cli.command("upload")
@handles_errors
def datasets_upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="An .npz, or .jsonl text.")],
    name: Annotated[str | None, typer.Option(help="Display name (default: the file name).")] = None,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Upload an .npz (one array per model input, optional integer `labels`) or a JSONL file of {"text", "label"}
    lines (hf models), streamed with a progress bar."""
    with _client() as client, _transfer(f"uploading {path.name}") as progress:
        dataset = client.upload_dataset(path, name=name, progress=progress)
    if as_json:
        _print_json(dataset)
    elif quiet:
        print(dataset.id)
    else:
        out.print(_dataset_line(dataset), highlight=False)


@datasets_cli.command("list")
@handles_errors
def datasets_list(limit: LimitOpt = 50, cursor: CursorOpt = None, as_json: JsonFlag = False) -> None:
    """Your datasets, newest first."""
    with _client() as client:
        page = client.list_datasets(limit=limit, cursor=cursor)
    if as_json:
        return _print_json(page)
    table = Table(Column("id", no_wrap=True), "name", "samples", "arrays", "labels", "size", "created")
    for d in page.items:
        arrays = ", ".join(f"{k} {v.shape}" for k, v in d.arrays.items())
        table.add_row(
            d.id,
            escape(d.name),
            str(d.num_samples),
            escape(arrays),
            "yes" if d.has_labels else "no",
            _size(d.size_bytes),
            f"{d.created_at:%F %T}",
        )
    out.print(table)
    if page.next_cursor:
        err.print(f"more: --cursor {page.next_cursor}", highlight=False)


@datasets_cli.command("show")
@handles_errors
def datasets_show(dataset_id: str, as_json: JsonFlag = False) -> None:
    """A dataset: its arrays, sample count and labels."""
    with _client() as client:
        d = client.get_dataset(dataset_id)
    if as_json:
        return _print_json(d)
    out.print(_dataset_line(d), highlight=False)
    table = Table("array", "shape", "dtype")
    for k, v in d.arrays.items():
        table.add_row(escape(k), str(v.shape), v.dtype)
    out.print(table)


@datasets_cli.command("rm")
@handles_errors
def datasets_rm(dataset_ids: Annotated[list[str], typer.Argument(help="One or more dataset ids.")]) -> None:
    """Delete datasets (refused while a queued or running job uses one)."""
    with _client() as client:
        for dataset_id in dataset_ids:
            client.delete_dataset(dataset_id)
            err.print(f"deleted {dataset_id}", highlight=False)


# -- jobs -----------------------------------------------------------------------------------------------------

RECIPE_HELP = f"Named steps: {', '.join(RECIPES)} (see `squeeze compress --help`)."
RecipeOpt = Annotated[str | None, typer.Option(help=RECIPE_HELP)]
StepsJsonOpt = Annotated[
    str | None,
    typer.Option(
        "--steps-json",
        help='Custom steps as JSON (or @file.json): \'[{"op": "prune", "method": "magnitude", "sparsity": 0.3}]\'.',
    ),
]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu or cuda (default: auto).")]
CacheOpt = Annotated[bool | None, typer.Option("--cache/--no-cache", help="Reuse an identical earlier result.")]
TimeoutOpt = Annotated[
    float | None, typer.Option(min=0, help="Give up waiting after this many seconds (exit 4; the job goes on).")
]
PollOpt = Annotated[float, typer.Option(min=0.05, help="Seconds between status polls.")]


def _parse_json_or_yaml(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as json_error:
        try:
            import yaml
        except ImportError:
            raise UsageProblem(f"{source}: not valid JSON ({json_error}), and PyYAML is not installed") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageProblem(f"{source}: neither JSON nor YAML: {exc}") from None


def _steps(recipe: str | None, steps_json: str | None) -> list[dict[str, Any]] | None:
    if recipe and steps_json:
        raise UsageProblem("give --recipe or --steps-json, not both")
    if recipe:
        try:
            return recipe_steps(recipe)
        except KeyError as exc:
            raise UsageProblem(exc.args[0]) from None
    if steps_json:
        source = "--steps-json"
        if steps_json.startswith("@"):
            source = steps_json[1:]
            steps_json = Path(source).read_text()
        steps = _parse_json_or_yaml(steps_json, source)
        steps = [steps] if isinstance(steps, dict) else steps
        if not isinstance(steps, list):
            raise UsageProblem(f"{source}: steps must be a JSON list of objects")
        return steps
    return None


def _build_spec(
    spec_file: str | None,
    *,
    model: str | None,
    dataset: str | None,
    recipe: str | None,
    steps_json: str | None,
    device: str | None,
    cache: bool | None,
    batch_size: int | None,
    max_samples: int | None,
) -> dict[str, Any]:
    """A spec dict from a JSON/YAML file (``-``: stdin), flags overriding its fields. The server validates it."""
    spec: dict[str, Any] = {}
    if spec_file:
        text = sys.stdin.read() if spec_file == "-" else Path(spec_file).read_text()
        loaded = _parse_json_or_yaml(text, spec_file)
        if not isinstance(loaded, dict):
            raise UsageProblem(f"{spec_file}: a job spec is an object with model_id, dataset_id, steps, ...")
        spec = loaded
    for key, value in (("model_id", model), ("dataset_id", dataset), ("device", device), ("cache", cache)):
        if value is not None:
            spec[key] = value
    steps = _steps(recipe, steps_json)
    if steps is not None:
        spec["steps"] = steps
    evaluation = {"batch_size": batch_size, "max_samples": max_samples}
    if any(v is not None for v in evaluation.values()):
        spec["evaluation"] = {**spec.get("evaluation", {}), **{k: v for k, v in evaluation.items() if v is not None}}
    if "model_id" not in spec:
        raise UsageProblem("no model: give --model ID or a spec file with model_id")
    return spec


def _watch(job: Job, *, timeout: float | None, poll: float) -> Job:
    """Follow a job to its end: a live bar with the stage on a terminal, one line per change in logs."""
    if err.is_terminal:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[stage]}"),
            TimeElapsedColumn(),
            console=err,
        ) as bar:
            task = bar.add_task(job.id, total=1.0, completed=job.progress, stage=f"{job.status}: {job.stage}")

            def update(j: Job) -> None:
                bar.update(task, completed=j.progress, stage=escape(f"{j.status}: {j.stage}"))

            return job.wait(timeout, poll=poll, on_update=update)
    seen: list[tuple[str, str]] = []

    def log(j: Job) -> None:
        if not seen or seen[-1] != (j.status, j.stage):
            seen.append((j.status, j.stage))
            err.print(f"{j.id}  {j.status:<9}  {j.progress:4.0%}  {escape(j.stage)}", highlight=False)

    return job.wait(timeout, poll=poll, on_update=log)


def _print_result_table(table: ResultTable) -> None:
    t = Table("metric", "baseline", "result", "ratio", title=escape(table.title), caption=escape(table.caption))
    for row in table.rows:
        t.add_row(row.metric, row.baseline_text, row.result_text, row.ratio_text)
    out.print(t)


def _finish(job: Job, *, as_json: bool) -> None:
    """Print a finished job (table or JSON) and exit 1 unless it succeeded."""
    if as_json:
        _print_json(job)
    elif job.succeeded:
        _print_result_table(job.table())
    if not job.succeeded:
        why = f": {job.error.message} [{job.error.code}]" if job.error else ""
        raise _fail(f"job {job.id} {job.status}{why}", EXIT_JOB_FAILED)


@jobs_cli.command("submit", epilog=EPILOG)
@handles_errors
def jobs_submit(
    spec_file: Annotated[
        str | None, typer.Argument(help="Job spec as a JSON or YAML file ('-' reads stdin); flags override it.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model id (model_id).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset id (dataset_id).")] = None,
    recipe: RecipeOpt = None,
    steps_json: StepsJsonOpt = None,
    device: DeviceOpt = None,
    cache: CacheOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="evaluation.batch_size")] = None,
    max_samples: Annotated[int | None, typer.Option(help="evaluation.max_samples")] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow the job to its end, like `jobs watch`.")] = False,
    timeout: TimeoutOpt = None,
    poll: PollOpt = 1.0,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Submit a job. The server checks the spec at once: a mistake exits 2 with its message."""
    spec = _build_spec(
        spec_file,
        model=model,
        dataset=dataset,
        recipe=recipe,
        steps_json=steps_json,
        device=device,
        cache=cache,
        batch_size=batch_size,
        max_samples=max_samples,
    )
    with _client() as client:
        job = client.submit_job(spec)
        if not watch:
            if as_json:
                _print_json(job)
            elif quiet:
                print(job.id)
            else:
                out.print(f"{job.id}  {job.status}{'  (cache hit)' if job.cache_hit else ''}", highlight=False)
            return
        err.print(f"submitted {job.id}", highlight=False)
        _finish(_watch(job, timeout=timeout, poll=poll), as_json=as_json)


@jobs_cli.command("watch", epilog=EPILOG)
@handles_errors
def jobs_watch(job_id: str, timeout: TimeoutOpt = None, poll: PollOpt = 1.0, as_json: JsonFlag = False) -> None:
    """Follow a job (progress bar, stage) to its end, then print the before/after table."""
    with _client() as client:
        job = client.get_job(job_id)
        _finish(_watch(job, timeout=timeout, poll=poll), as_json=as_json)


@jobs_cli.command("show", epilog=EPILOG)
@handles_errors
def jobs_show(job_id: str, as_json: JsonFlag = False) -> None:
    """A job's status, stage, error, artifacts and (when done) its before/after table."""
    with _client() as client:
        job = client.get_job(job_id)
    if as_json:
        return _print_json(job)
    out.print(f"{job.id}  {job.status}  {job.progress:.0%}  {escape(job.stage)}", highlight=False)
    if job.error:
        out.print(f"error: {escape(job.error.message)} [{job.error.code}]", highlight=False)
    if job.metrics:
        _print_result_table(job.table())
    for a in job.artifacts:
        out.print(f"artifact {a.id}  {a.kind}  {escape(a.filename)}  {_size(a.size_bytes)}", highlight=False)


@jobs_cli.command("list")
@handles_errors
def jobs_list(
    status: Annotated[
        Literal["queued", "running", "succeeded", "failed", "cancelled"] | None, typer.Option(help="Only these.")
    ] = None,
    limit: LimitOpt = 50,
    cursor: CursorOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Your jobs, newest first."""
    with _client() as client:
        page = client.list_jobs(status=status, limit=limit, cursor=cursor)
    if as_json:
        return _print_json(page)
    table = Table(
        Column("id", no_wrap=True), "status", "progress", "stage", "steps", Column("model", no_wrap=True), "created"
    )
    for j in page.items:
        steps = ", ".join(f"{s.get('op')}:{s.get('method')}" for s in j.spec.get("steps", [])) or "evaluate"
        table.add_row(
            j.id,
            j.status,
            f"{j.progress:.0%}",
            escape(j.stage),
            escape(steps),
            str(j.spec.get("model_id", "")),
            f"{j.created_at:%F %T}",
        )
    out.print(table)
    if page.next_cursor:
        err.print(f"more: --cursor {page.next_cursor}", highlight=False)


@jobs_cli.command("cancel", epilog=EPILOG)
@handles_errors
def jobs_cancel(job_id: str) -> None:
    """Cancel a queued or running job (finished jobs are left as they are)."""
    with _client() as client:
        job = client.cancel_job(job_id)
    out.print(f"{job.id}  {job.status}", highlight=False)


# -- download and compress ------------------------------------------------------------------------------------


@handles_errors
def download(
    artifact_or_job: Annotated[str, typer.Argument(help="An artifact id (art_…) or a job id (job_…).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File or folder (default: the artifact's file name).")
    ] = None,
    kind: Annotated[
        str, typer.Option(help="For a job id: which artifact: model, report (JSON) or report_markdown.")
    ] = "model",
) -> None:
    """Download an artifact with a progress bar: resumes a partial `.part` file, verifies the sha256."""
    with _client() as client:
        if artifact_or_job.startswith("job_"):
            job = client.get_job(artifact_or_job)
            art = job.artifact(kind)
            if art is None:
                raise UsageProblem(f"job {job.id} ({job.status}) has no {kind} artifact")
        else:
            art = client.get_artifact(artifact_or_job)
        path = _download(client, art, output or Path(Path(art.filename).name))
    print(path)


def _download(client: Squeeze, art: ArtifactPublic, dest: Path) -> Path:
    final = dest / Path(art.filename).name if dest.is_dir() else dest
    part = final.with_name(final.name + ".part")
    if part.exists() and 0 < part.stat().st_size < art.size_bytes:
        err.print(f"resuming {final} from {_size(part.stat().st_size)}", highlight=False)
    with _transfer(f"downloading {final.name}") as progress:
        path = client.download_artifact(art, final, progress)
    err.print(f"{path}: sha256 {art.sha256} verified", highlight=False)
    return path


_RECIPE_LINES = "\n".join(
    f"  {r.name:<13} {r.summary}{' (needs --data)' if r.needs_data else ''}" for r in RECIPES.values()
)
COMPRESS_HELP = f"""Upload a model (and data), compress it, follow the job and download the result: one line.

    squeeze compress model.onnx --data data.npz --recipe int8

Recipes (--recipe):

{_RECIPE_LINES}

Or your own steps with --steps-json (the job spec's "steps", see the README). With --data, both versions are
measured on it (accuracy needs a "labels" array). The before/after table goes to stdout; the compressed model is
saved next to the input as MODEL.RECIPE.onnx (or .pt2) unless -o says where."""


@handles_errors
def compress(
    model: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="ONNX or .pt2 model.")],
    data: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, readable=True, help=".npz data: evaluation and calibration."),
    ] = None,
    recipe: RecipeOpt = None,
    steps_json: StepsJsonOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to save the compressed model.")] = None,
    device: DeviceOpt = None,
    cache: CacheOpt = None,
    timeout: TimeoutOpt = None,
    poll: PollOpt = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the finished job as JSON, not a table.")] = False,
) -> None:
    if not recipe and not steps_json:
        raise UsageProblem(f"give --recipe ({', '.join(RECIPES)}) or --steps-json")
    if recipe and recipe in RECIPES and RECIPES[recipe].needs_data and data is None:
        raise UsageProblem(f"recipe {recipe} calibrates on data: add --data file.npz")
    steps = _steps(recipe, steps_json)
    with _client() as client:
        with _transfer(f"uploading {model.name}") as progress:
            m = client.upload_model(model, progress=progress)
        err.print(f"model   {_model_line(m)}", highlight=False)
        spec: dict[str, Any] = {"model_id": m.id, "steps": steps}
        if data is not None:
            with _transfer(f"uploading {data.name}") as progress:
                d = client.upload_dataset(data, progress=progress)
            err.print(f"data    {_dataset_line(d)}", highlight=False)
            spec["dataset_id"] = d.id
        if device is not None:
            spec["device"] = device
        if cache is not None:
            spec["cache"] = cache
        job = client.submit_job(spec)
        err.print(f"job     {job.id}{'  (cache hit)' if job.cache_hit else ''}", highlight=False)
        job = _watch(job, timeout=timeout, poll=poll)
        if not job.succeeded:
            _finish(job, as_json=as_json)
        art = job.artifact("model")
        if art is None:
            raise UsageProblem(f"job {job.id} produced no model")
        dest = output or model.with_name(f"{model.stem}.{recipe or 'compressed'}{Path(art.filename).suffix}")
        path = _download(client, art, dest)
        _finish(job, as_json=as_json)
    if not as_json:
        out.print(f"saved {path}", highlight=False)


@handles_errors
def decode(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="A .sqz file (encode/squeeze result).")
    ],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to write the ONNX model (default: FILE.onnx).")
    ] = None,
) -> None:
    """Decode a .sqz file (the result of an encode/squeeze step) into a plain ONNX model; needs no server."""
    from squeeze.loader import SqueezeFormatError
    from squeeze.loader import decode as decode_sqz

    try:
        path = decode_sqz(file, output or file.with_suffix(".onnx"))
    except SqueezeFormatError as exc:
        raise UsageProblem(f"{file}: {exc}") from None
    err.print(f"{file} ({_size(file.stat().st_size)}) -> {path} ({_size(path.stat().st_size)})", highlight=False)
    print(path)


def register(app: typer.Typer) -> None:
    """Add the client commands to the ``squeeze`` typer app."""
    app.command("login", epilog=EPILOG)(login)
    app.command("logout")(logout)
    app.add_typer(models_cli, name="models", epilog=EPILOG)
    app.add_typer(datasets_cli, name="datasets", epilog=EPILOG)
    app.add_typer(jobs_cli, name="jobs", epilog=EPILOG)
    app.command("download", epilog=EPILOG)(download)
    app.command("compress", help=COMPRESS_HELP, epilog=EPILOG)(compress)
    app.command("decode", epilog=EPILOG)(decode)
