"""The package's shape in numbers: files and lines per folder, the longest functions, and the
imports written inside functions (deferred imports).

Usage::

    python benchmarks/code_shape.py [PACKAGE_DIR]   # default: mergekit_safemerge/

Lines are physical lines of each ``.py`` file; a function's length runs from its ``def`` to its
last line (decorators excluded). Used for the before/after figures of a restructuring.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _deferred_imports(tree: ast.AST) -> int:
    count = 0
    for function in _functions(tree):
        for node in ast.walk(function):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                count += 1
    return count


def main(root: str = "mergekit_safemerge") -> None:
    package = Path(root)
    per_folder: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    longest: list[tuple[int, str]] = []
    deferred: dict[str, int] = {}
    for path in sorted(package.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        folder = str(path.parent.relative_to(package.parent))
        per_folder[folder][0] += 1
        per_folder[folder][1] += len(text.splitlines())
        name = str(path.relative_to(package.parent))
        # nested functions are counted inside their parent only
        seen_lines: set[int] = set()
        for function in _functions(tree):
            if function.lineno in seen_lines:
                continue
            for inner in _functions(function):
                if inner is not function:
                    seen_lines.add(inner.lineno)
            length = (function.end_lineno or function.lineno) - function.lineno + 1
            longest.append((length, f"{name}:{function.name}"))
        deferred[name] = _deferred_imports(tree)
    total_files = sum(f for f, _ in per_folder.values())
    total_lines = sum(n for _, n in per_folder.values())
    print(f"{'folder':<36}{'files':>6}{'lines':>7}")
    for folder, (files, lines) in sorted(per_folder.items()):
        print(f"{folder:<36}{files:>6}{lines:>7}")
    print(f"{'total':<36}{total_files:>6}{total_lines:>7}")
    print("\nlongest functions:")
    for length, where in sorted(longest, reverse=True)[:10]:
        print(f"  {length:>4}  {where}")
    print(f"\nimports inside functions: {sum(deferred.values())}")
    for name, count in sorted(deferred.items(), key=lambda item: -item[1])[:10]:
        if count:
            print(f"  {count:>4}  {name}")


if __name__ == "__main__":
    main(*sys.argv[1:])
