"""The embedded recipes: where they are (the package `prod_st.recipes`, or `<repo>/recipes` in a checkout),
their names and one-line summaries."""


from __future__ import annotations

from pathlib import Path


def recipes_folder() -> Path:
    """The embedded recipes: the package `prod_st.recipes`, or `<repo>/recipes` in a source checkout."""
    try:
        from importlib.resources import files

        folder = Path(str(files("prod_st.recipes")))
        if folder.is_dir():
            return folder
    except (ImportError, TypeError, ValueError, AttributeError, NotADirectoryError):
        pass
    return Path(__file__).resolve().parents[2] / "recipes"


def embedded_recipes() -> list[str]:
    """Names of the embedded recipes (`quickstart`, `wordnet-full`, ..., `ablations/prod` in a subfolder), sorted:
    top-level ones first."""
    folder = recipes_folder()
    if not folder.is_dir():
        return []
    names = [p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml")]
    return sorted(names, key=lambda n: (n.count("/"), n))


def embedded_recipe_file(name: str) -> Path | None:
    """The file of embedded recipe `name` (`quickstart`, `ablations/prod`), or None."""
    if not name or name.startswith(("/", ".")) or "\\" in name or ".." in name.split("/"):
        return None
    path = recipes_folder() / f"{name}.yaml"
    return path if path.is_file() else None


def recipe_summary(name: str) -> str:
    """One line about an embedded recipe: the first sentence of its header comment (without its `name:` prefix)."""
    path = embedded_recipe_file(name)
    lines = []
    for line in (path.read_text(encoding="utf-8").splitlines() if path else []):
        if not line.startswith("#") or not line.strip("# "):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    stem = name.rsplit("/", 1)[-1]
    if text.startswith(f"{stem}:"):
        text = text[len(stem) + 1:].strip()
    end = text.find(". ")
    text = text[: end + 1] if end >= 0 else text
    return text if len(text) <= 110 else text[:107].rstrip() + "..."
