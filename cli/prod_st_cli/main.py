"""`prod-st`: command-line entry point. Parses arguments, calls the library, prints with rich, and turns
every error a user can cause into one `error:` line on stderr.

Exit codes: 0 done; 2 a usage error (a bad option or argument, a recipe that does not validate, a model, dataset
folder or file that does not exist, a run folder prod-st must not use); 3 a data error (a data file that exists
but cannot be used: malformed or non-UTF-8 lines, an empty file, repeated ids, judgements naming missing ids);
4 a full disk (the file being written and the space left are named; nothing half-written is kept, and the same
command resumes once there is space); 130 interrupted (Ctrl-C; finished steps are kept). Anything else is a bug,
with its traceback."""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from prod_st import __version__
from prod_st.util.errors import ProdStError

USAGE_ERROR, DATA_ERROR, DISK_FULL, INTERRUPTED_CODE = 2, 3, 4, 130
INTERRUPTED = "interrupted: finished steps are kept; run the same command again to resume"


class Interrupted(BaseException):
    """Ctrl-C inside a command. Click (and Typer) turn a KeyboardInterrupt into a silent exit or "Aborted!";
    this one passes through them to `main()`, which prints INTERRUPTED and exits 130."""


class _Group(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise Interrupted from e


app = typer.Typer(
    cls=_Group,
    name="prod-st",
    help="PROD progressive distillation for dense retrievers, on sentence-transformers.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
console = Console()


class CorpusDtype(str, Enum):
    """`eval --corpus-dtype`: what the recipe's eval.corpus_dtype takes."""

    float32 = "float32"
    float16 = "float16"


class SearchBackend(str, Enum):
    """`eval --search`: what the recipe's eval.search takes."""

    auto = "auto"
    torch = "torch"
    faiss = "faiss"


err_console = Console(stderr=True)


def say(text: str) -> None:
    """Print a line that names user input (a path, a model, a recipe) verbatim: rich would read `[x]` in it as
    markup and drop it."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def error_line(message: str) -> Text:
    """`error: MESSAGE`, the label in bold red and the message verbatim (a path or a --set value with `[x]` in it
    is printed as given, not read as rich markup)."""
    return Text.assemble(("error:", "bold red"), " ", message)


def _set_verbose(verbose: bool) -> bool:
    """`-v`: debug logging (rank 0 only), wherever it is given: before the command or after it."""
    from prod_st.util.distributed import rank

    if verbose and rank() == 0:
        logging.getLogger().setLevel(logging.DEBUG)
    return verbose


def _print_version(value: bool) -> None:
    if value:
        console.print(f"prod-st {__version__}", highlight=False)
        raise typer.Exit()


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.", callback=_set_verbose)]
Overrides = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="FIELD=VALUE",
    help="Override a recipe field (dotted path, list indices as numbers, a YAML value): --set stages.1.lr=3e-5. "
         "Repeatable; validated like the file.",
)]


@app.callback()
def _setup(
    verbose: Verbose = False,
    version: Annotated[bool, typer.Option(
        "--version", help="Print prod-st's version and exit.", callback=_print_version, is_eager=True
    )] = False,
) -> None:
    from prod_st.util.distributed import rank

    quiet = rank() != 0  # under torchrun, one log for the run: rank 0's (other ranks report warnings only)
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "datasets", "sentence_transformers", "transformers", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


recipes_app = typer.Typer(help="The embedded recipes: list them, print one to copy and edit.",
                          invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
def recipes_list(ctx: typer.Context, verbose: Verbose = False) -> None:
    """List the embedded recipes, one line each (run one with `prod-st run NAME`)."""
    if ctx.invoked_subcommand is not None:
        return
    from prod_st.recipe import embedded_recipes, recipe_summary

    names = embedded_recipes()
    width = max((len(n) for n in names), default=0)
    for name in names:
        console.print(f"{name:<{width}}  {recipe_summary(name)}", highlight=False, markup=False, soft_wrap=True)


@recipes_app.command("show")
def recipes_show(
    name: Annotated[str, typer.Argument(help="An embedded recipe name (see `prod-st recipes`).")],
    verbose: Verbose = False,
) -> None:
    """Print an embedded recipe as shipped, comments included (`prod-st recipes show quickstart > my.yaml`)."""
    from prod_st.recipe import embedded_recipe_file, embedded_recipes

    path = embedded_recipe_file(name.removesuffix(".yaml"))
    if path is None:
        raise ProdStError(f"no embedded recipe {name!r} (embedded: {', '.join(embedded_recipes())})")
    sys.stdout.write(path.read_text(encoding="utf-8"))


@app.command("run")
def run_command(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file, or an embedded recipe name.")] = "quickstart",
    output: Annotated[Optional[Path], typer.Option(help="Run folder (default: the recipe's output.dir or runs/<name>).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Remove the earlier run's files (only from a folder prod-st created) and start over."
    )] = False,
    overrides: Overrides = None,
    no_progress: Annotated[bool, typer.Option(
        "--no-progress", help="No progress bars (log files, CI): only log lines, also kept in <run>/run.log."
    )] = False,
    verbose: Verbose = False,
) -> None:
    """Run a PROD recipe end to end (default: the offline quickstart). Rerunning resumes; every log line is
    appended to <run>/run.log."""
    from prod_st.recipe import load_recipe
    from prod_st.run.preflight import preflight
    from prod_st.util.distributed import is_main

    loaded = load_recipe(recipe, overrides or ())
    preflight(loaded, recipe)  # models, data folders and split files: before any work (and before torch loads)
    if no_progress:
        _disable_progress_bars()
    from tqdm.contrib.logging import logging_redirect_tqdm

    from prod_st.runner import Runner

    runner = Runner(loaded, output, force=force, progress=not no_progress)
    with logging_redirect_tqdm():  # log lines print above the progress bars, not through them
        final = runner.run()
    if not is_main():
        return
    print_test_table(f"{loaded.name}: test ({final['num_test_queries']} queries, {final['num_docs']} docs)", final,
                     loaded.eval.metric)
    if final.get("beir"):
        print_beir_table("student: zero-shot BEIR", final["beir"])
    say(f"student: {runner.dir / 'student'}   report: {runner.dir / 'report.md'}")


def _disable_progress_bars() -> None:
    """--no-progress: the Hugging Face libraries' bars off, and every other tqdm bar (prod-st's teacher scoring
    and corpus encoding) through tqdm's TQDM_DISABLE, read when tqdm is first imported."""
    import os

    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from prod_st.util import progress

    progress.ENABLED = False


def print_test_table(title: str, final: dict, metric: str) -> None:
    """final.json's test table: the metrics that exist (Acc@k only on answer-only data such as DPR's NQ test),
    headed by the recipe's eval.metric."""
    from prod_st.run.report import final_test_rows, metric_columns

    rows = final_test_rows(final)
    columns = metric_columns([m for _, m in rows], metric)
    table = Table(title=Text(title))
    table.add_column("model")
    for name in columns:
        table.add_column(name, justify="right")
    for label, metrics in rows:
        table.add_row(Text(label), *(_num(metrics.get(k)) for k in columns))
    console.print(table)


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""


@app.command("validate")
def validate_command(
    recipes: Annotated[list[str], typer.Argument(help="Recipe YAML files or embedded recipe names.")],
    overrides: Overrides = None,
    schema_only: Annotated[bool, typer.Option(
        "--schema-only", help="Check the schema and cross-references only, not what the recipe names on disk "
        "(models, dataset folders): for a recipe whose data or models are not on this machine."
    )] = False,
    verbose: Verbose = False,
) -> None:
    """Check recipes without running them: the schema, and what they name on disk (models, layer counts, dataset
    folders and split files; Hub ids only when they are in the local Hub cache; a missing dataset folder is
    reported with where its data comes from). Imports no torch: it takes a fraction of a second."""
    from prod_st.recipe import load_recipe
    from prod_st.run.preflight import preflight

    for recipe in recipes:
        loaded = load_recipe(recipe, overrides or ())
        if not schema_only:
            preflight(loaded, recipe)
        steps = [s.name for s in loaded.stages] + ([f"dpd x{loaded.dpd.rounds}"] if loaded.dpd else [])
        what = "schema valid" if schema_only else "valid"
        say(f"{recipe}: {what} ({' -> '.join(steps) or 'evaluate only'})")


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Argument(help="Model folder, Hub id, or packaged name (all-MiniLM-L6-v2).")],
    data: Annotated[Optional[str], typer.Argument(help="BEIR folder, embedded name (wordnet-gloss) or BEIR name.")] = None,
    beir: Annotated[Optional[str], typer.Option(help="Comma-separated BEIR names or folders, zero-shot: one table.")] = None,
    split: Annotated[str, typer.Option(help="qrels split to evaluate.")] = "test",
    output: Annotated[Optional[Path], typer.Option(help="Write the metrics as JSON here.")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Documents retrieved per query.")] = 1000,
    index: Annotated[str, typer.Option(help="faiss index factory string ('Flat' = exact).")] = "Flat",
    index_train_size: Annotated[int, typer.Option(min=1, help="Vectors a trained index (IVF, PQ) learns from, drawn at random across the corpus.")] = 32768,
    search: Annotated[SearchBackend, typer.Option(help="auto: exact search (Flat, SQfp16) with torch on a GPU, faiss otherwise; torch or faiss to force one.")] = SearchBackend.auto,
    corpus_dtype: Annotated[CorpusDtype, typer.Option(help="dtype of the cached corpus embeddings (float16: half the disk).")] = CorpusDtype.float32,
    batch_size: Annotated[int, typer.Option(min=1, help="Encoding batch size.")] = 64,
    relevance_level: Annotated[int, typer.Option(min=1, help="Lowest grade counted relevant (MRR, recall, MAP).")] = 1,
    max_queries: Annotated[Optional[int], typer.Option(min=1, help="Evaluate only the first N judged queries.")] = None,
    verbose: Verbose = False,
) -> None:
    """Evaluate a retriever: nDCG@10, MRR@10, Recall@10/50/100/1000 and MAP through pytrec_eval, on DATA or
    zero-shot on the --beir sets. Under torchrun every rank encodes and searches its share; rank 0 prints and
    writes."""
    from prod_st.data import load_retrieval_data
    from prod_st.recipe import EXACT_INDEXES
    from prod_st.retrieval.evaluation import evaluate_model
    from prod_st.util.distributed import is_main, launched_group
    from prod_st.util.errors import ProdStError
    from prod_st.util.models import load_model
    from prod_st.util.paths import check_output_file

    if (data is None) == (beir is None):
        raise ProdStError("give either DATA or --beir (comma-separated BEIR names or folders), not both")
    if search is SearchBackend.torch and index not in EXACT_INDEXES:
        raise ProdStError(f"--search torch is exact search only (--index {' or '.join(EXACT_INDEXES)}), not {index!r}")
    if output is not None:
        output = check_output_file(output, "--output file")  # before the work, not after it
    with launched_group():
        console.quiet = not is_main()
        kwargs = dict(top_k=top_k, index_factory=index, batch_size=batch_size, dtype=corpus_dtype.value,
                      relevance_level=relevance_level, max_queries=max_queries, index_train_size=index_train_size,
                      search_backend=search.value)
        if beir is not None:
            names = [n.strip() for n in beir.split(",") if n.strip()]
            if not names:
                raise ProdStError(f"--beir {beir!r} names no dataset: give comma-separated BEIR names or folders")
            eval_beir(model, names, split, output, kwargs)
            return
        dataset = load_retrieval_data(data, split)
        encoder = load_model(model)
        result = evaluate_model(encoder, dataset, **kwargs)
        table = Table(title=Text(f"{model} on {data} ({split}, {result.num_queries} queries, {result.num_docs} docs)"))
        for name in result.metrics:
            table.add_column(name, justify="right")
        table.add_row(*(f"{v:.4f}" for v in result.metrics.values()))
        console.print(table)
        seconds = result.seconds
        console.print(f"wall time {seconds['total']:.1f}s (corpus encoding {seconds['encode_corpus']:.1f}s)")
        payload = {
            "model": model, "data": data, "split": split, "num_queries": result.num_queries,
            "num_docs": result.num_docs, "top_k": top_k, "index": index, "corpus_dtype": corpus_dtype.value,
            **({"index_train_size": index_train_size} if index_train_size != 32768 else {}),
            "metrics": result.metrics,
            "seconds": result.seconds,
        }
        if output is not None:
            write_json_output(output, payload)


def eval_beir(model: str, names: list[str], split: str, output: Optional[Path], kwargs: dict) -> None:
    """`eval --beir`: every set is loaded before the model (a bad set fails at once), then evaluated in turn.
    When one fails (or Ctrl-C), the sets that finished are still printed and written, then the error is raised."""
    from prod_st.retrieval.evaluation import beir_average, iter_beir, load_beir_sets
    from prod_st.util.models import load_model

    sets = load_beir_sets(names, split)
    encoder = load_model(model)
    results: dict[str, dict] = {}
    try:
        for name, metrics in iter_beir(encoder, sets, **kwargs):
            results[name] = metrics
    except (ProdStError, KeyboardInterrupt) as e:
        if not results:
            raise
        missing = [n for n in names if n not in results]
        print_beir_table(f"{model}: zero-shot BEIR ({split}), {len(results)} of {len(names)} sets, no average",
                         results)
        payload = {"model": model, "split": split, "beir": results, "complete": False, "not_evaluated": missing}
        if output is not None:
            write_json_output(output, payload)
        if isinstance(e, KeyboardInterrupt):
            raise
        kept = f"shown above{' and written to ' + str(output) if output is not None else ''}"
        raise ProdStError(f"{e} (the {len(results)} finished set(s) are {kept})") from None
    results = beir_average(results)
    print_beir_table(f"{model}: zero-shot BEIR ({split})", results)
    if output is not None:
        write_json_output(output, {"model": model, "split": split, "beir": results, "complete": True})


def write_json_output(output: Path, payload: dict) -> None:
    """`payload` as JSON into `output` (by rank 0 only, under torchrun)."""
    from prod_st.util.distributed import is_main
    from prod_st.util.paths import write_text_atomic

    if not is_main():
        return
    write_text_atomic(output, json.dumps(payload, indent=2) + "\n")
    say(f"metrics written to {output}")


def print_beir_table(title: str, results: dict) -> None:
    from prod_st.run.report import metric_columns

    columns = metric_columns(list(results.values()))
    table = Table(title=Text(title))
    for column in ("dataset", *columns):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for name, metrics in results.items():
        style = "bold" if name == "average" else None
        table.add_row(Text(name), *(_num(metrics.get(k)) for k in columns), style=style)
    console.print(table)


@app.command("push")
def push_command(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (runs/<name>).")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="USER/NAME on the Hugging Face Hub.")],
    private: Annotated[bool, typer.Option("--private", help="Create a private repository.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only write the folder that would be uploaded.")] = False,
    dry_run_dir: Annotated[Optional[Path], typer.Option(help="Where --dry-run writes (default RUN_DIR/hub-upload).")] = None,
    exist_ok: Annotated[bool, typer.Option("--exist-ok", help="Push a new commit to an existing repository.")] = False,
    verbose: Verbose = False,
) -> None:
    """Publish the run's student with a model card (schedule, metrics per stage and on BEIR, PROD citation)."""
    from prod_st.publish.push import push_run

    where = push_run(run_dir, repo_id, private=private, dry_run=dry_run, dry_run_dir=dry_run_dir, exist_ok=exist_ok)
    say(f"upload folder written to {where}" if dry_run else f"pushed to {where}")


class ExportFormat(str, Enum):
    """`export --format`: the text layout, the id layout, or both."""

    both = "both"
    text = "text"
    ids = "ids"


@app.command("export")
def export_command(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (runs/<name>); its finished stages are exported.")],
    out: Annotated[Path, typer.Argument(help="Folder to write the dataset in: new or empty.")],
    stage: Annotated[Optional[list[str]], typer.Option(
        "--stage", help="A stage to export (03-ce or ce; repeatable). Default: every distill stage and DPD round.",
    )] = None,
    format: Annotated[ExportFormat, typer.Option(
        "--format", help="text: query, positive, negative_1..k, score; ids: query_id, corpus_ids, scores + corpus "
                         "and queries; both.",
    )] = ExportFormat.both,
    push: Annotated[bool, typer.Option("--push", help="Upload OUT as a Hub dataset (needs --repo-id).")] = False,
    repo_id: Annotated[Optional[str], typer.Option("--repo-id", help="USER/NAME of the Hub dataset.")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create a private dataset repository.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --push: only write OUT, the folder that would be "
                                                            "uploaded.")] = False,
    exist_ok: Annotated[bool, typer.Option("--exist-ok", help="Push a new commit to an existing repository.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    verbose: Verbose = False,
) -> None:
    """Write the teacher scores of a run's stages (hard negatives + the teacher's scores, positive first) as a
    `datasets` dataset with its card, in the layouts sentence-transformers, Tevatron and FlagEmbedding read;
    `--push` uploads it to the Hub."""
    from prod_st.publish.export import FORMATS, export_run, folder_size, push_export
    from prod_st.util.hub import check_repo_id, hub_api

    if (push or dry_run) and not repo_id:
        raise ProdStError("--push and --dry-run need --repo-id USER/NAME")
    if (private or exist_ok) and not (push or dry_run):
        raise ProdStError("--private and --exist-ok go with --push")
    if repo_id:
        repo_id = check_repo_id(repo_id)
    api = hub_api() if push and not dry_run else None  # no token: refused before the export
    formats = FORMATS if format == ExportFormat.both else (format.value,)
    stages = export_run(run_dir, out, stages=stage, formats=formats, repo_id=repo_id, progress=not no_progress)
    for s in stages:
        say(f"{s.folder}: {s.rows:,} rows ({', '.join(s.configs)})")
    say(f"dataset written to {out} ({folder_size(out) / 1e6:.1f} MB)")
    if push and not dry_run:
        say(f"pushed to {push_export(out, repo_id, private=private, exist_ok=exist_ok, api=api)}")


@app.command("student")
def student_command(
    base: Annotated[str, typer.Argument(help="Encoder to cut: folder, Hub id or packaged name.")],
    output: Annotated[Path, typer.Argument(help="Folder to save the student in: new or empty.")],
    layers: Annotated[int, typer.Option(min=1, help="Number of first transformer layers kept.")] = 6,
    verbose: Verbose = False,
) -> None:
    """Build PROD's student: the first LAYERS layers of BASE, saved as a SentenceTransformer folder (a new or
    empty one: prod-st does not overwrite a folder it did not create)."""
    from prod_st.util.models import build_student

    build_student(base, layers, output)
    say(f"student with the first {layers} layers of {base} saved to {output}")


def main() -> None:
    """Console-script entry. A usage error (a bad option value, a missing argument) and a ProdStError are each one
    `error:` line on stderr and exit 2, a DataError exit 3, a full disk exit 4; Ctrl-C says how to resume and exits 130. (Click runs
    in non-standalone mode so that its usage errors reach this handler instead of being printed as a multi-line
    panel.)"""
    try:  # Typer >= 0.20 vendors its own click
        from typer._click import exceptions as click
    except ImportError:  # pragma: no cover - older Typer on the real click
        from click import exceptions as click

    try:
        code = app(standalone_mode=False)
    except click.NoArgsIsHelpError as e:  # `prod-st` or `prod-st CMD` alone: the help, as Typer prints it
        print(e.ctx.get_help() if e.ctx else str(e), file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except click.UsageError as e:
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        err_console.print(error_line(f"{' '.join(e.format_message().split())}{where}"), highlight=False,
                          soft_wrap=True)
        sys.exit(USAGE_ERROR)
    except ProdStError as e:
        err_console.print(error_line(str(e)), highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except (Interrupted, KeyboardInterrupt):
        # On a line of its own: Ctrl-C can land mid-line (a terminal's "^C", a progress bar, a log line).
        err_console.print(f"\n{INTERRUPTED}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(INTERRUPTED_CODE)
    except Exception as e:  # a full disk, however the library that hit it words it (safetensors, torch, pyarrow)
        from prod_st.util.paths import disk_full_error

        if (full := disk_full_error(e)) is None:
            raise
        err_console.print(error_line(str(full)), highlight=False, soft_wrap=True)
        sys.exit(full.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
