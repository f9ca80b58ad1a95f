"""`prod-st`: command-line entry point. Parses arguments, calls the library, prints with rich, and turns
every `ProdStError` into one line on stderr and exit code 2."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from prod_st.errors import ProdStError

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
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    from prod_st.distributed import rank

    quiet = rank() != 0  # under torchrun, one log for the run: rank 0's (other ranks report warnings only)
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "datasets", "sentence_transformers", "transformers", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command("run")
def run_command(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file, or an embedded recipe name.")] = "quickstart",
    output: Annotated[Optional[Path], typer.Option(help="Run folder (default: the recipe's output.dir or runs/<name>).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Remove the earlier run's files (only from a folder prod-st created) and start over."
    )] = False,
) -> None:
    """Run a PROD recipe end to end (default: the offline quickstart). Rerunning resumes."""
    from prod_st.preflight import preflight
    from prod_st.recipe import load_recipe

    from prod_st.distributed import is_main

    loaded = load_recipe(recipe)
    preflight(loaded, recipe)  # models, data folders and split files: before any work (and before torch loads)
    from prod_st.runner import Runner

    runner = Runner(loaded, output, force=force)
    final = runner.run()
    if not is_main():
        return
    print_test_table(f"{loaded.name}: test ({final['num_test_queries']} queries, {final['num_docs']} docs)", final,
                     loaded.eval.metric)
    if final.get("beir"):
        print_beir_table("student: zero-shot BEIR", final["beir"])
    console.print(f"student: {runner.dir / 'student'}   report: {runner.dir / 'report.md'}")


def print_test_table(title: str, final: dict, metric: str) -> None:
    """final.json's test table: the metrics that exist (Acc@k only on answer-only data such as DPR's NQ test),
    headed by the recipe's eval.metric."""
    from prod_st.report import final_test_rows, metric_columns

    rows = final_test_rows(final)
    columns = metric_columns([m for _, m in rows], metric)
    table = Table(title=title)
    table.add_column("model")
    for name in columns:
        table.add_column(name, justify="right")
    for label, metrics in rows:
        table.add_row(label, *(_num(metrics.get(k)) for k in columns))
    console.print(table)


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""


@app.command("validate")
def validate_command(
    recipes: Annotated[list[str], typer.Argument(help="Recipe YAML files or embedded recipe names.")],
) -> None:
    """Check recipes without running them: the schema, and what they name on disk (models, layer counts, dataset
    folders and split files; Hub ids only when they are in the local Hub cache)."""
    from prod_st.preflight import preflight
    from prod_st.recipe import load_recipe

    for recipe in recipes:
        loaded = load_recipe(recipe)
        preflight(loaded, recipe)
        steps = [s.name for s in loaded.stages] + ([f"dpd x{loaded.dpd.rounds}"] if loaded.dpd else [])
        console.print(f"{recipe}: valid ({' -> '.join(steps) or 'evaluate only'})")


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Argument(help="Model folder, Hub id, or packaged name (all-MiniLM-L6-v2).")],
    data: Annotated[Optional[str], typer.Argument(help="BEIR folder, embedded name (wordnet-gloss) or BEIR name.")] = None,
    beir: Annotated[Optional[str], typer.Option(help="Comma-separated BEIR names or folders, zero-shot: one table.")] = None,
    split: Annotated[str, typer.Option(help="qrels split to evaluate.")] = "test",
    output: Annotated[Optional[Path], typer.Option(help="Write the metrics as JSON here.")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Documents retrieved per query.")] = 1000,
    index: Annotated[str, typer.Option(help="faiss index factory string ('Flat' = exact).")] = "Flat",
    batch_size: Annotated[int, typer.Option(min=1, help="Encoding batch size.")] = 64,
    relevance_level: Annotated[int, typer.Option(min=1, help="Lowest grade counted relevant (MRR, recall, MAP).")] = 1,
    max_queries: Annotated[Optional[int], typer.Option(min=1, help="Evaluate only the first N judged queries.")] = None,
) -> None:
    """Evaluate a retriever: nDCG@10, MRR@10, Recall@10/50/100/1000 and MAP through pytrec_eval, on DATA or
    zero-shot on the --beir sets."""
    from prod_st.data import load_retrieval_data
    from prod_st.distributed import is_main
    from prod_st.errors import ProdStError
    from prod_st.evaluation import evaluate_model
    from prod_st.models import load_model
    from prod_st.paths import check_output_file

    if (data is None) == (beir is None):
        raise ProdStError("give either DATA or --beir (comma-separated BEIR names or folders), not both")
    if not is_main():
        return  # evaluation is rank 0's job; other ranks have nothing to write
    if output is not None:
        output = check_output_file(output, "--output file")  # before the work, not after it
    kwargs = dict(top_k=top_k, index_factory=index, batch_size=batch_size, relevance_level=relevance_level,
                  max_queries=max_queries)
    if beir is not None:
        names = [n.strip() for n in beir.split(",") if n.strip()]
        if not names:
            raise ProdStError(f"--beir {beir!r} names no dataset: give comma-separated BEIR names or folders")
        eval_beir(model, names, split, output, kwargs)
        return
    dataset = load_retrieval_data(data, split)
    encoder = load_model(model)
    result = evaluate_model(encoder, dataset, **kwargs)
    table = Table(title=f"{model} on {data} ({split}, {result.num_queries} queries, {result.num_docs} docs)")
    for name in result.metrics:
        table.add_column(name, justify="right")
    table.add_row(*(f"{v:.4f}" for v in result.metrics.values()))
    console.print(table)
    console.print(f"wall time {result.seconds['total']:.1f}s (corpus encoding {result.seconds['encode_corpus']:.1f}s)")
    payload = {
        "model": model, "data": data, "split": split, "num_queries": result.num_queries,
        "num_docs": result.num_docs, "top_k": top_k, "index": index, "metrics": result.metrics,
        "seconds": result.seconds,
    }
    if output is not None:
        write_json_output(output, payload)


def eval_beir(model: str, names: list[str], split: str, output: Optional[Path], kwargs: dict) -> None:
    """`eval --beir`: every set is loaded before the model (a bad set fails at once), then evaluated in turn.
    When one fails (or Ctrl-C), the sets that finished are still printed and written, then the error is raised."""
    from prod_st.evaluation import beir_average, iter_beir, load_beir_sets
    from prod_st.models import load_model

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
    from prod_st.paths import write_text_atomic

    write_text_atomic(output, json.dumps(payload, indent=2) + "\n")
    console.print(f"metrics written to {output}")


def print_beir_table(title: str, results: dict) -> None:
    from prod_st.report import metric_columns

    columns = metric_columns(list(results.values()))
    table = Table(title=title)
    for column in ("dataset", *columns):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for name, metrics in results.items():
        style = "bold" if name == "average" else None
        table.add_row(name, *(_num(metrics.get(k)) for k in columns), style=style)
    console.print(table)


@app.command("push")
def push_command(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (runs/<name>).")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="USER/NAME on the Hugging Face Hub.")],
    private: Annotated[bool, typer.Option("--private", help="Create a private repository.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only write the folder that would be uploaded.")] = False,
    dry_run_dir: Annotated[Optional[Path], typer.Option(help="Where --dry-run writes (default RUN_DIR/hub-upload).")] = None,
    exist_ok: Annotated[bool, typer.Option("--exist-ok", help="Push a new commit to an existing repository.")] = False,
) -> None:
    """Publish the run's student with a model card (schedule, metrics per stage and on BEIR, PROD citation)."""
    from prod_st.publish import push_run

    where = push_run(run_dir, repo_id, private=private, dry_run=dry_run, dry_run_dir=dry_run_dir, exist_ok=exist_ok)
    console.print(f"upload folder written to {where}" if dry_run else f"pushed to {where}")


@app.command("student")
def student_command(
    base: Annotated[str, typer.Argument(help="Encoder to cut: folder, Hub id or packaged name.")],
    output: Annotated[Path, typer.Argument(help="Folder to save the student in: new or empty.")],
    layers: Annotated[int, typer.Option(min=1, help="Number of first transformer layers kept.")] = 6,
) -> None:
    """Build PROD's student: the first LAYERS layers of BASE, saved as a SentenceTransformer folder (a new or
    empty one: prod-st does not overwrite a folder it did not create)."""
    from prod_st.models import build_student

    build_student(base, layers, output)
    console.print(f"student with the first {layers} layers of {base} saved to {output}")


def main() -> None:
    """Console-script entry. A usage error (a bad option value, a missing argument) and a ProdStError are each one
    `error:` line on stderr and exit 2; Ctrl-C says how to resume and exits 130. (Click runs in non-standalone
    mode so that its usage errors reach this handler instead of being printed as a multi-line panel.)"""
    try:  # Typer >= 0.20 vendors its own click
        from typer._click import exceptions as click
    except ImportError:  # pragma: no cover - older Typer on the real click
        from click import exceptions as click

    try:
        code = app(standalone_mode=False)
    except click.NoArgsIsHelpError as e:  # `prod-st` or `prod-st CMD` alone: the help, as Typer prints it
        print(e.ctx.get_help() if e.ctx else str(e), file=sys.stderr)
        sys.exit(2)
    except click.UsageError as e:
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        err_console.print(f"[bold red]error:[/] {' '.join(e.format_message().split())}{where}", highlight=False,
                          soft_wrap=True)
        sys.exit(2)
    except ProdStError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt):
        err_console.print(INTERRUPTED, highlight=False, soft_wrap=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
