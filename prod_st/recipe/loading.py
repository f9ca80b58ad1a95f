"""Loading a recipe: YAML (duplicate keys refused) from a path or an embedded name, `--set` overrides, and
pydantic's errors as one line naming every field path; `data_origin` reads a recipe's `Data:` header."""


from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from prod_st.recipe.catalogue import embedded_recipe_file, embedded_recipes
from prod_st.recipe.schema import NAME_PATTERN, RUN_NAME_PATTERN, Recipe
from prod_st.util.errors import ProdStError


class _Loader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys (PyYAML would silently keep the last one)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given at line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        except TypeError:  # an unhashable key: let PyYAML report it
            pass
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def data_origin(path_or_name: str | Path) -> str | None:
    """Where a recipe's data comes from: the `Data:` paragraph of the recipe file's header comment (a download
    page, a script, the files to put in the folder), as one line; None when the header has none or the file
    cannot be read. The shipped recipes keep one, and so do copies made with `prod-st recipes show`, so that a
    dataset folder that is not on this machine can be reported with how to get it."""
    try:
        path, _ = _resolve(path_or_name)
        lines = path.read_text(encoding="utf-8").splitlines()
    except (ProdStError, OSError, UnicodeDecodeError):
        return None
    paragraphs: list[list[str]] = [[]]
    for line in lines:
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text:
            paragraphs[-1].append(text)
        elif paragraphs[-1]:
            paragraphs.append([])
    for paragraph in paragraphs:
        text = " ".join(paragraph)
        if "Data:" in text:
            return text[text.index("Data:") + len("Data:"):].strip() or None
    return None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _unwrap(annotation: Any) -> Any:
    """The annotation without Optional / Annotated wrappers."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The schema model at a pydantic error location (to suggest the field a typo meant)."""
    current: Any = Recipe
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            current = field.annotation
        elif typing.get_origin(current) is list:
            current = typing.get_args(current)[0]
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


_PATTERN_HELP = {
    NAME_PATTERN: "lowercase letters, digits, '-' and '_'",
    RUN_NAME_PATTERN: "letters, digits, '.', '-' and '_' (it names the run folder)",
}


def _format_error(error: dict) -> str:
    loc = tuple(error["loc"])
    path = ".".join(str(p) for p in loc)
    if error["type"] == "value_error" and "error" in error.get("ctx", {}):
        message = str(error["ctx"]["error"])
    else:
        message = error["msg"]
    if error["type"] == "extra_forbidden" and loc:
        model = _model_at(loc[:-1])
        if model is not None:
            fields = list(model.model_fields)
            close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
            message = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "") + \
                f"; allowed: {', '.join(fields)}"
    elif error["type"] == "missing":
        message = "required key missing"
    elif error["type"] == "string_pattern_mismatch":
        allowed = _PATTERN_HELP.get(error.get("ctx", {}).get("pattern"))
        if allowed:
            message = f"{error['input']!r} is not a valid name: use {allowed}"
    if loc and loc[-1] == "[key]":  # a dict key (a teacher name): name the key itself
        loc = loc[:-1]
        path = ".".join(str(p) for p in loc)
    message = _one_line(message)
    return f"{path}: {message}" if path else message


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate an already-parsed mapping; every problem is reported on one line prefixed by `source`."""
    if not isinstance(data, dict):
        kind = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ProdStError(f"{source}: the top level must be a mapping of recipe sections (name, data, student, "
                          f"teachers, stages, ...), got {kind}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ProdStError(f"{source}: " + "; ".join(_format_error(e) for e in exc.errors())) from None


def _resolve(path_or_name: str | Path) -> tuple[Path, str]:
    """(file, how to name it in messages) for a path or an embedded recipe name."""
    text = str(path_or_name)
    path = Path(text).expanduser()
    looks_like_path = isinstance(path_or_name, Path) or path.suffix in (".yaml", ".yml") or "/" in text or "\\" in text
    embedded = None if path.is_file() or path.suffix in (".yaml", ".yml") else embedded_recipe_file(text)
    if embedded is not None:
        return embedded, f"{text}.yaml"
    if path.is_file() or looks_like_path:
        if not path.exists():
            raise ProdStError(f"recipe file not found: {text}")
        if not path.is_file():
            raise ProdStError(f"recipe path is not a file: {text}")
        return path, text
    names = ", ".join(embedded_recipes()) or "none found"
    raise ProdStError(f"recipe {text!r} not found: no such file, and not an embedded recipe (embedded: {names})")


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`a.b.1.c=value` -> (["a", "b", 1, "c"], value): a dotted path (integers index lists) and a YAML value
    (`3e-5`, `true`, `null`, `[scifact, nfcorpus]`, `'007'` for a string)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ProdStError(f"--set {text!r}: expected FIELD=VALUE with a dotted field path, e.g. stages.1.lr=3e-5")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ProdStError(f"--set {text!r}: the value is not valid YAML ({_one_line(exc)})") from None
    return [int(p) if p.isdigit() else p for p in key.split(".")], value


def apply_overrides(data: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """`data` (a parsed recipe mapping) with each `FIELD=VALUE` of `overrides` set, in order. A missing mapping on
    the way is created (`publish.repo_id=me/x`); a list index must exist. What the values mean is checked by
    the schema afterwards, like the file's own fields."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for depth, part in enumerate(path):
            where = ".".join(str(p) for p in path[: depth + 1])
            last = depth == len(path) - 1
            if isinstance(node, list):
                if not isinstance(part, int) or part >= len(node):
                    size = f"{len(node)} entries (0..{len(node) - 1})" if node else "no entries"
                    raise ProdStError(f"--set {text!r}: {where}: {'.'.join(map(str, path[:depth])) or 'recipe'} is "
                                      f"a list with {size}; give an existing index")
                if last:
                    node[part] = value
                else:
                    node = node[part]
            elif isinstance(node, dict):
                key = str(part)
                if last:
                    node[key] = value
                else:
                    if node.get(key) is None:
                        node[key] = {}
                    node = node[key]
            else:
                raise ProdStError(f"--set {text!r}: {'.'.join(map(str, path[:depth]))} is a value "
                                  f"({node!r}), not a section or list")
    return data


def load_recipe(path_or_name: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load and validate a recipe from a YAML file or an embedded recipe name, with `overrides` (`--set
    FIELD=VALUE`, see :func:`apply_overrides`) applied before validation; any problem is a one-line
    :class:`ProdStError`. The overrides are kept on the recipe (`Recipe.overrides`)."""
    path, source = _resolve(path_or_name)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ProdStError(f"{source}: not a UTF-8 text file ({_one_line(exc)})") from None
    except OSError as exc:
        raise ProdStError(f"{source}: cannot read the recipe ({_one_line(exc.strerror or exc)})") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(p for p in (exc.context, exc.problem) if p) or str(exc)
        raise ProdStError(f"{source}: invalid YAML{where}: {_one_line(what)}") from None
    except yaml.YAMLError as exc:
        raise ProdStError(f"{source}: invalid YAML: {_one_line(exc)}") from None
    if overrides:
        if not isinstance(data, dict):
            parse_recipe(data, source)  # the top-level error
        data = apply_overrides(data, list(overrides))
        source = f"{source} with --set"
    recipe = parse_recipe(data, source)
    recipe._overrides = list(overrides)
    return recipe
