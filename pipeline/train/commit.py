"""The commit protocol of a training checkpoint, pure (names and bytes in, verdicts out; no storage, no DeepSpeed).

Every rank writes its files into the checkpoint's folder, then its marker `COMMITTED.rank<R>`, last. A marker records
the world size, the step and the size and sha256 of every file its rank wrote:

    {"world_size": W, "step": S, "files": {"<relative path>": {"size": n, "sha256": "..."}}}

A checkpoint is *committed* once the markers of ranks 0 .. W-1 exist (W read from rank 0's); it is *intact* when
every recorded file has its recorded size and sha256. Markers written before digests were recorded (no "files")
make their ranks' files unchecked, so old checkpoints still resume.
"""

from __future__ import annotations

import json
from typing import Any, Callable

__all__ = ["STATE", "MARKER", "MARKER_PREFIX", "state_name", "marker_name", "is_marker", "marker", "is_complete",
           "recorded_files", "damage"]

STATE = "train_state.rank{}.json"
MARKER = "COMMITTED.rank{}"
MARKER_PREFIX = "COMMITTED."

Files = dict[str, dict[str, Any]]  # relative path -> {"size", "sha256"}


def state_name(rank: int) -> str:
    return STATE.format(rank)


def marker_name(rank: int) -> str:
    return MARKER.format(rank)


def is_marker(name: str) -> bool:
    return name.rsplit("/", 1)[-1].startswith(MARKER_PREFIX) and not name.endswith(".tmp")


def marker(world_size: int, step: int, files: Files) -> str:
    """A rank's marker."""
    return json.dumps({"world_size": world_size, "step": step, "files": files}, sort_keys=True)


def is_complete(names: set[str], read_text: Callable[[str], str]) -> bool:
    """Whether a checkpoint folder holding `names` is committed by every rank (`read_text(name)` reads a marker)."""
    if marker_name(0) not in names:
        return False
    try:
        world = int(json.loads(read_text(marker_name(0)))["world_size"])
    except (ValueError, KeyError, TypeError):
        return False
    return all(marker_name(r) in names for r in range(world))


def recorded_files(read_text: Callable[[str], str]) -> tuple[Files, list[str], list[int]]:
    """(files recorded by every rank's marker, the markers that are missing or unreadable, the ranks whose marker
    records no files: written before markers recorded digests)."""
    try:
        world = int(json.loads(read_text(marker_name(0)))["world_size"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return {}, [f"{marker_name(0)} is unreadable"], []
    files: Files = {}
    problems, unrecorded = [], []
    for r in range(world):
        name = marker_name(r)
        try:
            recorded = json.loads(read_text(name)).get("files")
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        except (ValueError, AttributeError, UnicodeDecodeError):
            problems.append(f"{name} is unreadable")
            continue
        if recorded is None:
            unrecorded.append(r)
        elif not _well_formed(recorded):
            problems.append(f"{name} is unreadable")
        else:
            files.update(recorded)  # the ranks wrote disjoint files
    return files, problems, unrecorded


def _well_formed(recorded: Any) -> bool:
    return isinstance(recorded, dict) and all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
        for e in recorded.values())


def damage(files: Files, size_of: Callable[[str], "int | None"],
           sha256_of: Callable[[str], str] | None = None) -> list[str]:
    """How the files differ from their committed sizes (`size_of(rel)`: None when missing), then, all sizes right,
    from their committed sha256 (`sha256_of`, when given)."""
    out = []
    for rel, want in sorted(files.items()):
        size = size_of(rel)
        if size is None:
            out.append(f"{rel} is missing")
        elif size != want["size"]:
            out.append(f"{rel} has {size} bytes, {want['size']} committed")
    if out or sha256_of is None:
        return out
    return [f"{rel} differs from its committed sha256" for rel, want in sorted(files.items())
            if sha256_of(rel) != want["sha256"]]
