"""The one owner of a run's checkpoints in storage: `RunStore(run_url, storage)`.

A run's folder (`<scaling.storage_path>/<name>`, Ray's layout) holds its training checkpoints `checkpoint_<step>/`
(every rank's files and commit marker, pipeline.train.commit), `final/` (the exported model) and, during a transfer,
`init/`. The store lists the committed checkpoints (newest first; Ray prunes old ones, so every listing is fresh),
finds the newest intact one (its files checked against the markers: sizes from one listing before anything is
downloaded, then the sha256 of the copy a restore will load; a damaged one is skipped, with a warning, for the
previous one), reads the newest training state, uploads a rank's checkpoint folder (its marker last) and exports
the final model. What a rank writes into its local folder (DeepSpeed's files, the state, the marker) is
pipeline.train.checkpoint's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.data.storage import Storage, is_local
from pipeline.errors import DamagedCheckpointError
from pipeline.model.format import CONFIG_FILE
from pipeline.train import commit
from pipeline.train.checkpoint import checkpoint_dir_name, export_final, read_train_state, step_of, verify_checkpoint

__all__ = ["RunStore"]

log = logging.getLogger(__name__)


class RunStore:
    """A run's folder in storage (see the module docstring). Picklable: only the URL and the storage config
    travel."""

    def __init__(self, url: str, storage: Storage | None = None):
        self.url = url.rstrip("/")
        self.storage = storage or Storage()

    def __repr__(self) -> str:
        return f"RunStore({self.url!r})"

    def checkpoint_url(self, step: int) -> str:
        return f"{self.url}/{checkpoint_dir_name(step)}"

    # -- what is committed ----------------------------------------------------------------------------------------
    def _read_text(self, checkpoint_url: str) -> Callable[[str], str]:
        return lambda name: self.storage.read_bytes(f"{checkpoint_url}/{name}").decode()

    def committed(self) -> Iterator[str]:
        """URLs of the run's committed checkpoints, newest first (each folder's markers read when it is reached)."""
        steps = sorted((step_of(name), name) for name in self.storage.names(self.url) if step_of(name) >= 0)
        for _, name in reversed(steps):
            url = f"{self.url}/{name}"
            try:
                complete = commit.is_complete(set(self.storage.names(url)), self._read_text(url))
            except FileNotFoundError:  # removed while we looked
                continue
            if complete:
                yield url
            else:
                log.warning("ignoring uncommitted checkpoint %s", url)

    def latest(self) -> str | None:
        """The newest committed checkpoint (its files not verified: `fetch_intact` restores the newest intact one)."""
        return next(self.committed(), None)

    def latest_state(self) -> tuple[str, dict[str, Any]] | None:
        """(URL, rank 0's training state) of the newest committed checkpoint, or None. A state file that differs from
        its committed digest is skipped, with a warning, for the previous checkpoint's (only that small file is
        checked here; restores check every file)."""
        damaged = []
        name = commit.state_name(0)
        for url in self.committed():
            data = self.storage.read_bytes(f"{url}/{name}")
            files, _, _ = commit.recorded_files(self._read_text(url))
            recorded = {name: files[name]} if name in files else {}
            problems = commit.damage(recorded, lambda _: len(data), lambda _: hashlib.sha256(data).hexdigest())
            try:
                state = json.loads(data)
            except ValueError:
                problems = problems or [f"{name} is unreadable"]
            if not problems:
                return url, state
            log.warning("committed checkpoint %s is damaged (%s): using the previous one's state", url,
                        "; ".join(problems))
            damaged.append(f"{url.rsplit('/', 1)[-1]}: {', '.join(problems)}")
        if damaged:
            raise DamagedCheckpointError(f"run folder {self.url}: no committed checkpoint has an intact training "
                                         f"state ({'; '.join(damaged)})")
        return None

    # -- restore --------------------------------------------------------------------------------------------------
    def _remote_damage(self, url: str) -> list[str]:
        """The size check of a checkpoint in an object store, from one listing (before downloading it)."""
        files, problems, _ = commit.recorded_files(self._read_text(url))
        return problems + commit.damage(files, self.storage.sizes(url).get)

    @contextlib.contextmanager
    def _fetch_verified(self, url: str) -> Iterator[tuple[str | None, list[str]]]:
        """(local copy or None, what is damaged) of one committed checkpoint."""
        if not is_local(url):
            problems = self._remote_damage(url)  # a truncated file is seen without downloading the checkpoint
            if problems:
                yield None, problems
                return
        with self.storage.fetch_dir(url) as local:
            yield local, verify_checkpoint(local)  # the sha256s of the copy the restore will load

    @contextlib.contextmanager
    def fetch_intact(self, *, agree: Callable[[bool], bool] | None = None) -> Iterator[tuple[str, str] | None]:
        """(URL, local copy) of the newest committed checkpoint whose files match their commit markers, or None
        when the run has none committed. A damaged one (a file missing, truncated or changed in storage) is skipped
        with a warning naming the file, for the previous committed one; none intact raises DamagedCheckpointError,
        one line naming the run folder and the damaged files.

        `agree(intact_here) -> intact_on_every_rank` (pipeline.train.checkpoint.every_rank): every rank of a group
        calls this and must restore the same checkpoint. Each rank checks every file of its own full copy, so they
        see the same damage; the vote keeps them together when one rank's copy alone is bad (a download gone
        wrong)."""
        damaged: list[str] = []
        for url in self.committed():
            with self._fetch_verified(url) as (local, problems):
                intact = not problems if agree is None else agree(not problems)
                if intact and local is not None:
                    if damaged:
                        log.warning("run %s: resuming from %s, the newest intact committed checkpoint", self.url, url)
                    yield url, local
                    return
                problems = problems or ["damaged in another rank's copy"]
            log.warning("committed checkpoint %s is damaged (%s): trying the previous committed one", url,
                        "; ".join(problems))
            damaged.append(f"{url.rsplit('/', 1)[-1]}: {', '.join(problems)}")
        if damaged:
            raise DamagedCheckpointError(
                f"run folder {self.url}: no committed checkpoint is intact ({'; '.join(damaged)}); restore those files "
                "from a copy, or train in a new run folder (another `name`)")
        yield None

    # -- write ----------------------------------------------------------------------------------------------------
    def upload(self, local_dir: str | Path, step: int, *, before_marker: Callable[[], None] | None = None) -> int:
        """Copies one rank's checkpoint folder into the step's checkpoint (which the other ranks fill too), this
        rank's commit marker last: the checkpoint counts as committed only once every rank's bytes are in the
        store. `before_marker` (tests: fault injection) runs after the other files are up. Returns the bytes."""
        return self.storage.put_dir(local_dir, self.checkpoint_url(step), last=commit.is_marker,
                                    before_last=before_marker)

    def put_model(self, local_dir: str | Path, folder: str) -> str:
        """A model checkpoint folder (model.safetensors + model.json, pipeline.model.checkpoint) to `<run>/<folder>`,
        model.json (the format's commit marker) last. Returns its URL."""
        url = f"{self.url}/{folder}"
        self.storage.put_dir(local_dir, url, last=lambda name: name == CONFIG_FILE)
        return url

    def export_final(self, checkpoint_url: str, extra: dict | None = None) -> str:
        """Consolidates the committed ZeRO checkpoint at `checkpoint_url` into the model format at `<run>/final`,
        after checking its files against their commit markers (a damaged one is never exported). Returns the URL."""
        with self.storage.fetch_dir(checkpoint_url) as local, \
                tempfile.TemporaryDirectory(prefix="vitpipe-final-") as tmp:
            damaged = verify_checkpoint(local)
            if damaged:
                raise DamagedCheckpointError(f"final checkpoint {checkpoint_url} is damaged ({'; '.join(damaged)}): "
                                             "resume the run, which retrains from its newest intact checkpoint and "
                                             "rewrites it")
            state = read_train_state(local, 0)
            export_final(local, state["model"], tmp, extra={"run_url": self.url, **(extra or {})})
            url = self.put_model(tmp, "final")
        log.info("final model (step %s) saved to %s", state["step"], url)
        return url

    def remove(self, folder: str) -> None:
        """Deletes `<run>/<folder>` (e.g. a transfer's `init`); a missing one is fine."""
        self.storage.remove(f"{self.url}/{folder}")

    def exists(self) -> bool:
        """Whether the run's folder holds anything."""
        return bool(self.storage.names(self.url))
