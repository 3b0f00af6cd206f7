"""Print the requirements of the distributions in the given pyproject.toml files, one a line, for the image's
dependency layers: they are installed before the code is copied in, so that editing the code reinstalls nothing.

    python pyproject_requirements.py client/pyproject.toml services/pyproject.toml          # run time
    python pyproject_requirements.py 'client/pyproject.toml[web]' services/pyproject.toml   # + the client's web extra
    python pyproject_requirements.py --build client/pyproject.toml services/pyproject.toml  # build time

A requirement on one of the given distributions (worldstream-services needs worldstream-client[video]) is
replaced by that distribution's own requirements and those of the extras it names.
"""
from __future__ import annotations

import re
import sys
import tomllib

REQUIREMENT = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def split(requirement: str) -> tuple[str, list[str]]:
    """(normalized name, extras) of a PEP 508 requirement."""
    match = REQUIREMENT.match(requirement)
    if match is None:
        raise SystemExit(f"cannot read the requirement {requirement!r}")
    extras = [e.strip() for e in (match.group(2) or "").split(",") if e.strip()]
    return normalized(match.group(1)), extras


def runtime_requirements(projects: dict[str, dict]) -> list[str]:
    wanted: list[str] = []
    for project in projects.values():
        for requirement in project.get("dependencies", []):
            name, extras = split(requirement)
            if name in projects:  # a local distribution: its requirements instead of itself
                local = projects[name]
                wanted += local.get("dependencies", [])
                for extra in extras:
                    wanted += local.get("optional-dependencies", {}).get(extra, [])
            else:
                wanted.append(requirement)
    return [r for r in wanted if split(r)[0] not in projects]


def main(argv: list[str]) -> int:
    build = "--build" in argv
    documents = []
    extras_of: dict[str, list[str]] = {}
    for arg in (a for a in argv if a != "--build"):
        path, extras = (arg[:-1].split("[", 1) + [""])[:2] if arg.endswith("]") else (arg, "")
        with open(path, "rb") as f:
            documents.append(tomllib.load(f))
        extras_of[normalized(documents[-1]["project"]["name"])] = [e for e in extras.split(",") if e]
    if build:
        wanted = [r for doc in documents for r in doc.get("build-system", {}).get("requires", [])]
    else:
        projects = {normalized(doc["project"]["name"]): doc["project"] for doc in documents}
        wanted = runtime_requirements(projects)
        for name, extras in extras_of.items():
            wanted += [r for e in extras for r in projects[name].get("optional-dependencies", {})[e]
                       if split(r)[0] not in projects]
    print("\n".join(dict.fromkeys(wanted)))  # first occurrence of each, in order
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
