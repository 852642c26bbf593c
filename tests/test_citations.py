"""Code, configs, scripts and tests cite public sources only (GPT-NeoX v1.0 files and functions, HF
classes, the Pythia paper, the EleutherAI/pythia repository), never notes that exist only where
the project was developed."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Spelled in pieces so that this file does not match itself.
PRIVATE = ("PYTHIA_" + "FACTS", "CASE_" + "STUDIES", "shared" + "/")
SUFFIXES = {".py", ".gin", ".md", ".yml", ".yaml", ".toml", ".cfg", ".txt", ".json", ".sh"}


def _files():
    for top in ("pythia_jax", "configs", "scripts", "tests"):
        for path in sorted((REPO / top).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                yield path
    for name in ("README.md", "pyproject.toml", "setup.py"):
        if (REPO / name).is_file():
            yield REPO / name


def test_no_citation_of_private_notes():
    found = []
    for path in _files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if any(word in line for word in PRIVATE):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert not found, "cite the public source instead:\n" + "\n".join(found)


def test_the_scan_covers_the_package_configs_and_scripts():
    seen = {p.relative_to(REPO).parts[0] for p in _files()}
    assert {"pythia_jax", "configs", "scripts", "tests"} <= seen
