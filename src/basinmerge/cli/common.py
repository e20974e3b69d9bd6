"""Helpers shared by the CLI command modules: dataset options, output checks, printing, and
what a Ctrl-C says (`on_interrupt`)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer

from basinmerge import data as data_mod
from basinmerge import io
from basinmerge.console import console, table
from basinmerge.errors import ConfigError

DATASET_HELP = f"Dataset name ({', '.join(data_mod.names())})."
DATA_HELP = (f"Data spec: a dataset NAME[:split] ({', '.join(data_mod.names())}), a datasets "
             "save_to_disk folder PATH[:split], a .safetensors/.pt file of tensors (x and y, or "
             "input_ids ... and labels), or a .txt file or folder of .txt files (causal LM; "
             "see --tokenizer, --seq-len). --dataset is the same option.")
SEQ_LEN_OPT = typer.Option(128, "--seq-len", help="Text data: tokens per row (also the most "
                           "kept of a datasets folder's token rows).")
TOKENIZER_OPT = typer.Option(None, "--tokenizer", help="Text data: 'bytes' (UTF-8 bytes as "
                             "ids) or a folder with tokenizer files (default: the first model's "
                             "HF folder).")
DATA_ROOT_OPT = typer.Option(None, "--data-root", help="Folder holding dataset files.")
DEVICE_OPT = typer.Option("cpu", "--device", help="Torch device (cpu, cuda, cuda:0, ...).")
JSON_OPT = typer.Option(False, "--json", help="Print JSON instead of a table.")
LIKE_OPT = typer.Option(None, "--like", help="A checkpoint of the same architecture, for "
                        "inputs that do not name theirs (bare safetensors / .pt).")
FORCE_OPT = typer.Option(False, "--force", help="Replace an existing output: a non-empty output "
                         "folder, or the results of an earlier run in --out.")
FORMAT_OPT = typer.Option("auto", "--format", help="Output form: auto (the inputs'), basinmerge, "
                          "hf, safetensors or pt.")
MAX_SHARD_OPT = typer.Option(4096.0, "--max-shard-mib", help="HF output: shard the weights "
                             "past this many MiB per file.")
REPAIR_MODE_OPT = typer.Option("auto", "--repair-mode", help="Which units --repair corrects: "
                               "auto (transformers: both; else units), units (traced hidden "
                               "layers), layernorm (every LayerNorm's output channels), mlp "
                               "(transformer MLP hidden units), both.")
PRINT_RECIPE_OPT = typer.Option(False, "--print-recipe", help="Print the equivalent recipe "
                                "(YAML, for `basinmerge run`) and exit without running.")


def load_splits(name: str, root: str | None = None, train_limit: int | None = None,
                seed: int = 0) -> tuple[data_mod.Dataset, data_mod.Dataset]:
    """Train and test splits of a dataset; optionally a random training subset."""
    train = data_mod.load(name, "train", root)
    test = data_mod.load(name, "test", root)
    if train_limit is not None and train_limit < len(train):
        train = train.subset(train_limit, seed=seed)
    return train, test


def data_record(spec: str | None, *, examples: int | None = None, seed: int = 0,
                seq_len: int = 128, tokenizer: str | None = None,
                root: str | None = None) -> dict[str, Any] | None:
    """The data a command was given, as a recipe's ``data:`` field (and as recorded in its
    output's metadata); None without data."""
    if spec is None:
        return None
    return {"spec": spec, "examples": examples, "seed": seed, "seq_len": seq_len,
            "tokenizer": tokenizer, "root": root}


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    console.print(table(title, columns, rows))


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def comma_list(text: str | None, flag: str, convert: Callable[[str], Any] = str,
               what: str = "values") -> list[Any] | None:
    """A comma-separated option's items (None when the option is not given), each through
    `convert`; an item it refuses is one error naming `flag`."""
    if text is None:
        return None
    try:
        return [convert(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise ConfigError(f"{flag} must be comma-separated {what}, got '{text}'") from e


def parse_kv(options: Sequence[str]) -> dict[str, Any]:
    """Parse repeated ``--opt key=value`` strings; values are JSON when they parse as JSON."""
    out: dict[str, Any] = {}
    for item in options:
        if "=" not in item:
            raise ConfigError(f"option '{item}' must look like key=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


# --------------------------------------------------------------------------- outputs


def check_file_out(path: Path | None, suffixes: tuple[str, ...]) -> None:
    """Check an output file before any work (see `io.check_output`); None: nothing to check."""
    if path is not None:
        io.check_output(path, suffixes=suffixes)


def check_run_out(path: Path, force: bool = False) -> None:
    """Check a run's output folder before any work: refused if it holds an earlier run,
    unless --force."""
    io.check_output(path, folder=True, overwrite=force,
                    overwrite_hint="choose another --out, or pass --force to overwrite it")



# --------------------------------------------------------------------------- Ctrl-C

# The command line being run (set by `basinmerge.cli.main`), and what a Ctrl-C should say.
invocation: list[str] = ["basinmerge"]
_interrupt_note: Callable[[], str] | None = None


def command_line(args: Sequence[str] | None = None) -> str:
    """The exact command line, quoted for a shell (the one being run, or `args`)."""
    return shlex.join(["basinmerge", *args] if args is not None else invocation)


def on_interrupt(note: str | Callable[[], str] | None) -> None:
    """What a Ctrl-C during this command prints after "interrupted; " (a text, or a function
    asked at the time, so it can say what was saved by then); None: the default line."""
    global _interrupt_note
    _interrupt_note = (lambda: note) if isinstance(note, str) else note


def interrupt_message() -> str:
    if _interrupt_note is None:
        return f"interrupted. Run again: {command_line()}"
    try:
        return f"interrupted; {_interrupt_note()}"
    except Exception:  # noqa: BLE001 - the note must never hide the interruption
        return "interrupted"
