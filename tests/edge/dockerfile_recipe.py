"""Read the Dockerfile as a recipe, to rebuild the image's file layout without Docker.

Only what the image tests need: the final stage's ARG defaults, ENV and LABEL (with ${VAR}
expanded as Docker does), WORKDIR, the COPY instructions that take files from the build context, the
RUN that installs the Python packages, the RUN that bakes the weights, and the CMD.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass
class Copy:
    source: str  # relative to the build context
    destination: PurePosixPath  # absolute in the image


@dataclass
class Recipe:
    copies: list[Copy] = field(default_factory=list)
    env_at_bake: dict[str, str] = field(default_factory=dict)  # ARG + ENV when the bake runs
    env: dict[str, str] = field(default_factory=dict)  # ENV of the final image
    labels: dict[str, str] = field(default_factory=dict)
    install: str = ""  # the RUN line that installs the Python packages
    bake: list[str] = field(default_factory=list)  # the bake command (VAR=value ... python ...)
    cmd: list[str] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def expand(value: str, variables: dict[str, str]) -> str:
    return VARIABLE.sub(lambda m: variables.get(m.group(1) or m.group(2), ""), value)


class RecipeReader:
    """Follows the instructions in order, as Docker does, keeping only the last stage."""

    def __init__(self, build_args: dict[str, str]) -> None:
        self.build_args = build_args
        self.on_from("")

    def on_from(self, rest: str) -> None:  # a new stage: only the last one is the image
        self.recipe, self.variables, self.workdir = Recipe(), {}, PurePosixPath("/")

    def on_arg(self, rest: str) -> None:
        name, _, default = rest.partition("=")
        self.variables[name] = self.build_args.get(name, expand(default, self.variables))

    def pairs(self, rest: str) -> dict[str, str]:
        split = (pair.partition("=") for pair in shlex.split(rest))
        return {name: expand(value, self.variables) for name, _, value in split}

    def on_env(self, rest: str) -> None:
        for name, value in self.pairs(rest).items():
            self.variables[name] = self.recipe.env[name] = value

    def on_label(self, rest: str) -> None:
        self.recipe.labels |= self.pairs(rest)

    def on_workdir(self, rest: str) -> None:
        self.workdir = self.workdir / expand(rest, self.variables)

    def on_copy(self, rest: str) -> None:
        if rest.startswith("--from"):  # from another stage, not from the build context
            return
        source, destination = shlex.split(rest)
        target = self.workdir / destination
        if destination.endswith("/") and not source.endswith("/"):
            target = target / PurePosixPath(source).name
        self.recipe.copies.append(Copy(source, target))

    def on_run(self, rest: str) -> None:
        if "pip install" in rest:
            self.recipe.install = rest
        elif "bake_weights.py" in rest:
            self.recipe.env_at_bake = dict(self.variables)
            words = [w for w in shlex.split(rest) if not w.startswith("--mount=")]
            self.recipe.bake = [expand(w, self.variables) for w in words]

    def on_cmd(self, rest: str) -> None:
        self.recipe.cmd = json.loads(rest)


def read_recipe(dockerfile: Path, build_args: dict[str, str]) -> Recipe:
    reader = RecipeReader(build_args)
    for keyword, rest in instructions(dockerfile.read_text()):
        handler = getattr(reader, f"on_{keyword.lower()}", None)
        if handler is not None:
            handler(rest)
    return reader.recipe
