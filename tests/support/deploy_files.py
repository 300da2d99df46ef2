"""Reading the deployment's files the way their tools do, for tests that have no Docker engine: the Dockerfile's
instructions, docker-compose.yml's variable interpolation (the compose spec's `${VAR}`, `${VAR:-default}`,
`${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `$VAR` and `$$`) and the variables it reads."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Instruction", "compose_variables", "dockerfile_instructions", "interpolate", "marked_run"]

_VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}"
                       r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined, with the comment lines just above it."""

    keyword: str
    args: str
    comment: str


def dockerfile_instructions(path: Path) -> list[Instruction]:
    found: list[Instruction] = []
    comment: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        if not pending and not stripped:
            comment = []
            continue
        pending += (" " if pending else "") + stripped.removesuffix("\\").strip()
        if stripped.endswith("\\"):
            continue
        keyword, _, args = pending.partition(" ")
        found.append(Instruction(keyword.upper(), args.strip(), "\n".join(comment)))
        pending, comment = "", []
    return found


def marked_run(path: Path, marker: str) -> str:
    """The shell command of the one RUN instruction whose comment is `marker` (e.g. "wheel:")."""
    runs = [i.args for i in dockerfile_instructions(path) if i.keyword == "RUN" and i.comment == marker]
    assert len(runs) == 1, f"{path.name} has {len(runs)} RUN instructions marked '# {marker}', not one"
    return runs[0]


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """`text` with its variables replaced as compose does; a required variable that is missing raises KeyError
    with the file's own message."""
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        value = env.get(name)
        missing = value is None or (value == "" and op is not None and op.startswith(":"))
        if op and op.endswith("-"):
            return arg if missing else str(value)
        if op and op.endswith("?"):
            if missing:
                raise KeyError(f"{name}: {arg}")
            return str(value)
        return "" if value is None else value
    return _VARIABLE.sub(one, text)


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for k, v in node.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def compose_variables(doc: Mapping[str, Any]) -> set[str]:
    """Every variable a compose file reads from its environment (or .env): the ones it interpolates, and the
    ones its secrets are made from (`secrets: NAME: environment: VAR`)."""
    names = set()
    for text in _strings(doc):
        for m in _VARIABLE.finditer(text):
            if m.group(0) != "$$":
                names.add(m.group("braced") or m.group("bare"))
    for secret in (doc.get("secrets") or {}).values():
        if "environment" in secret:
            names.add(secret["environment"])
    return names
