"""The code behind a stage's results: the package modules its module imports, directly or through
others (read from the source, not from what happens to be imported), less the plumbing that reads
params, writes files, reports progress and logs runs. A training stage puts the digest of these files
in its checkpoint's fingerprint, so a checkpoint trained by other code is never resumed; dvc.yaml
names the same files among the stage's deps (a test holds the two together)."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = "pipeline"
ROOT = Path(__file__).resolve().parent.parent  # the folder that holds the package
PLUMBING = frozenset({PACKAGE, *(f"{PACKAGE}.{name}" for name in (
    "config", "configbase", "configerrors", "configfamilies", "files", "progress", "sourcecode", "stagecli",
    "tracking"))})


def module_file(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def direct_imports(module: str) -> set[str]:
    """The package modules `module`'s source imports anywhere (also inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(module_file(module).read_text(), str(module_file(module)))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == PACKAGE:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if module_file(f"{node.module}.{a.name}").exists()}  # `from pkg import module`
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
    return found


def result_code(module: str) -> list[str]:
    """The source files (paths from the package's parent, as dvc.yaml names them) behind `module`'s
    results, sorted."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            pending += direct_imports(name)
    return sorted(module_file(m).relative_to(ROOT).as_posix() for m in seen - PLUMBING)


def code_digest(module: str) -> str:
    """sha256 over the paths and bytes of `result_code(module)`."""
    digest = hashlib.sha256()
    for path in result_code(module):
        digest.update(path.encode() + b"\0" + (ROOT / path).read_bytes() + b"\0")
    return digest.hexdigest()
