"""Writes the error catalogue (docs/errors.md): every message the CLI can print for bad input or a
failed run, read from the ``raise UserError(...)`` / ``raise RuntimeFailure(...)`` statements of
the package with the ``ast`` module, so the catalogue cannot drift from the code.

f-string fields show as ``{expression}`` (``{path}``, ``{args.bands}``); messages built at run
time from a variable show that variable. An error's ``option=`` and the options marked with
``opt("name")`` show as the CLI prints them (``--name``). The CLI prints only the first line of a message.

Usage: python scripts/gen_error_catalog.py > docs/errors.md;
tests/test_docs.py fails when docs/errors.md is stale.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "geoexplora"
BASE_ERRORS = {"UserError": 2, "RuntimeFailure": 1}  # geoexplora/errors.py: what the CLI catches


SHORT_FLAGS = {"creation_options": "--co"}  # as geoexplora.errors.SHORT_FLAGS


def cli_flag(name: str) -> str:
    """As ``geoexplora.errors.cli_flag`` (this script reads the source; it imports nothing)."""
    return SHORT_FLAGS.get(name) or "--" + name.replace("_", "-")


@dataclass(frozen=True)
class ErrorSite:
    module: str  # geoexplora.io.scene
    function: str  # qualified name of the enclosing function, or "<module>"
    kind: str  # UserError, RuntimeFailure or a subclass of them
    exit_code: int
    template: str


def message_templates(node: ast.expr | None) -> list[str]:
    """The message(s) of ``UserError(<node>)`` as text, run-time parts as ``{expression}``; a
    conditional (``a if c else b``) gives one message per branch."""
    if node is None:
        return [""]
    if isinstance(node, ast.Constant):
        return [str(node.value)]
    if isinstance(node, ast.IfExp):
        return message_templates(node.body) + message_templates(node.orelse)
    if isinstance(node, ast.JoinedStr):
        return _concatenations([_field_templates(part) for part in node.values])
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _concatenations([message_templates(node.left), message_templates(node.right)])
    return ["{" + ast.unparse(node) + "}"]


def _field_templates(part: ast.expr) -> list[str]:
    if isinstance(part, ast.Constant):
        return [str(part.value)]
    value = part.value  # a FormattedValue
    if (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Name)
        and value.func.id == "opt"
        and value.args
        and isinstance(value.args[0], ast.Constant)
    ):
        return [cli_flag(value.args[0].value)]  # errors.opt("name"): the CLI prints the flag
    if isinstance(value, (ast.JoinedStr, ast.IfExp)) or (
        isinstance(value, ast.Constant) and isinstance(value.value, str)
    ):
        return message_templates(value)
    return ["{" + ast.unparse(value) + "}"]


def _concatenations(alternatives: list[list[str]]) -> list[str]:
    out = [""]
    for options in alternatives:
        out = [head + tail for head in out for tail in options]
    return out


def error_classes(trees: list[ast.Module]) -> dict[str, int]:
    """``{class name: exit code}`` of UserError, RuntimeFailure and their subclasses in the
    package (a subclass may set its own ``exit_code``)."""
    codes = dict(BASE_ERRORS)
    defs = {
        node.name: node
        for tree in trees
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.name not in BASE_ERRORS
    }
    changed = True
    while changed:
        changed = False
        for name, node in defs.items():
            parent = next(
                (b.id for b in node.bases if isinstance(b, ast.Name) and b.id in codes), None
            )
            if name in codes or parent is None:
                continue
            codes[name] = next(
                (
                    stmt.value.value
                    for stmt in node.body
                    if isinstance(stmt, ast.Assign)
                    and any(getattr(t, "id", None) == "exit_code" for t in stmt.targets)
                    and isinstance(stmt.value, ast.Constant)
                ),
                codes[parent],
            )
            changed = True
    return codes


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, codes: dict[str, int]):
        self.module = module
        self.codes = codes
        self.scope: list[str] = []
        self.sites: list[ErrorSite] = []

    def _visit_scope(self, node) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _visit_scope

    def visit_Raise(self, node: ast.Raise) -> None:
        call = node.exc
        if isinstance(call, ast.Call):
            func = call.func
            kind = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if kind in self.codes:
                where = ".".join(self.scope) or "<module>"
                option = next(
                    (
                        kw.value.value
                        for kw in call.keywords
                        if kw.arg == "option" and isinstance(kw.value, ast.Constant)
                    ),
                    None,
                )
                prefix = f"{cli_flag(option)}: " if option else ""
                self.sites += [
                    ErrorSite(self.module, where, kind, self.codes[kind], prefix + template)
                    for template in message_templates(call.args[0] if call.args else None)
                ]
        self.generic_visit(node)


def collect(package: Path = PACKAGE) -> list[ErrorSite]:
    """Every raise of a CLI error in the package, in module then source order, duplicates
    (same module, function, kind and message) once."""
    paths = sorted(package.rglob("*.py"))
    trees = [ast.parse(path.read_text(encoding="utf-8"), filename=str(path)) for path in paths]
    codes = error_classes(trees)
    sites: list[ErrorSite] = []
    for path, tree in zip(paths, trees):
        collector = _Collector(
            ".".join(path.relative_to(package.parent).with_suffix("").parts), codes
        )
        collector.visit(tree)
        sites += collector.sites
    return list(dict.fromkeys(sites))


def _module_summary(module: str, package: Path) -> str:
    path = package.parent.joinpath(*module.split(".")).with_suffix(".py")
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _class_summary(name: str, package: Path) -> str:
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name == name:
                return " ".join((ast.get_docstring(node) or "").split("\n\n")[0].split())
    return ""


def _code(text: str) -> str:
    """Inline code that survives backticks in the text."""
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def render(package: Path = PACKAGE) -> str:
    sites = collect(package)
    kinds = {site.kind: site.exit_code for site in sites}
    meaning = {
        "UserError": "bad input or usage; nothing was written",
        "RuntimeFailure": "the run itself failed",
    }
    lines = [
        "# Error catalogue",
        "",
        "Generated from the source by `scripts/gen_error_catalog.py`; do not edit by hand.",
        "Every message below is printed on stderr as `geoexplora: error: MESSAGE` (its first",
        "line only; `-v` adds the traceback). `{...}` marks a part filled in at run time: a",
        "path, band, option value or number.",
        "",
    ]
    order = [*BASE_ERRORS, *sorted(set(kinds) - set(BASE_ERRORS))]
    for kind in (k for k in order if k in kinds):
        count = sum(site.kind == kind for site in sites)
        what = meaning.get(kind) or _class_summary(kind, package).rstrip(".")
        lines.append(
            f"- **{kind}** (exit code {kinds[kind]}): {what}. "
            f"{count} message{'s' if count != 1 else ''}."
        )
    lines += [
        "",
        (
            "Common ones, with their fixes, are explained in "
            "[troubleshooting.md](troubleshooting.md)."
        ),
        "",
    ]
    by_module: dict[str, list[ErrorSite]] = {}
    for site in sites:
        by_module.setdefault(site.module, []).append(site)
    commands = sorted(m for m in by_module if m.startswith("geoexplora.commands."))
    for module in commands + sorted(m for m in by_module if m not in commands):
        summary = _module_summary(module, package)
        lines += [f"## {module}", ""] + ([summary, ""] if summary else [])
        for site in by_module[module]:
            first, *rest = site.template.splitlines() or [""]
            more = " (continues on further lines, not printed)" if rest else ""
            lines.append(
                f"- {_code(first)}: {site.kind}, exit {site.exit_code}; in `{site.function}`{more}"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
