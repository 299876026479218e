"""The MLflow model registry for our checkpoints: register, resolve, download, alias, import foreign weights.

A registered version is an MLflow logged model (`models:/m-...`) saved "from code": the pyfunc model file
pipeline/tracking/pyfunc_model.py (MLflow stores the file, nothing is cloudpickled), our checkpoint's
`model.safetensors` + `model.json` as its artifacts, a signature and an input example, so
`mlflow.pyfunc.load_model("models:/NAME@ALIAS")` and `mlflow models serve` work. Our own loading (transfer jobs,
`download_checkpoint`) fetches only the two checkpoint files and reads the safetensors; nothing is ever
unpickled. Versions registered before (a plain artifact folder `runs:/RUN/checkpoint`) still load.
mlflow is imported inside functions only.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np

from pipeline import __version__
from pipeline.errors import RegistryError
from pipeline.model.format import CHECKPOINT_FILES, CONFIG_FILE, FORMAT, WEIGHTS_FILE
from pipeline.model.ref import LATEST, parse_model_uri
from pipeline.tracking.config import resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient


__all__ = [
    "RegisteredVersion",
    "CHECKPOINT_FILES",
    "log_pyfunc_model",
    "register_checkpoint",
    "resolve_version",
    "download_checkpoint",
    "list_models",
    "describe_model",
    "lineage",
    "set_alias",
]

log = logging.getLogger(__name__)

DEFAULT_ARTIFACT_PATH = "checkpoint"
FORMAT_TAG = "vitpipe.format"
PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
_LOGGED_MODEL_RE = re.compile(r"^models:/(?P<id>m-[0-9a-f]+)$")


@dataclass(frozen=True)
class RegisteredVersion:
    """One registered model version, as the registry reports it."""

    name: str
    version: str
    source: str
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    description: str = ""

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _client(tracking_uri: str | None) -> "MlflowClient":
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _check_checkpoint_dir(path: Path) -> None:
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        raise RegistryError(
            f"{path} is not a vitpipe checkpoint: missing {', '.join(missing)} "
            "(write it with pipeline.model.checkpoint.save_checkpoint)"
        )


@contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """mlflow.models.Model.log reads the process-wide tracking URI; point it at `uri` for the call only and
    restore what was there (including $MLFLOW_TRACKING_URI, which mlflow rewrites)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _example_images(size: int, chans: int) -> "Any":
    """One deterministic uint8 image [1, size, size, chans] (a diagonal gradient) for the input example."""
    ramp = (np.add.outer(np.arange(size), np.arange(size)) * (255 / max(2 * size - 2, 1))).astype(np.uint8)
    return np.repeat(ramp[None, :, :, None], chans, axis=3)


def log_pyfunc_model(checkpoint_dir: str | Path, *, run_id: str, tracking_uri: str, name: str,
                     normalize: str = "imagenet") -> str:
    """Logs the checkpoint as an MLflow pyfunc model from code (pyfunc_model.py) to the run `run_id`, with the
    two checkpoint files as its artifacts, an image signature and input example; returns the logged model's id.
    `normalize` is the pixel normalisation the model was trained with (data.augment.normalize)."""
    import mlflow
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec


    checkpoint_dir = Path(checkpoint_dir)
    model = json.loads((checkpoint_dir / CONFIG_FILE).read_text())["model"]
    size, chans, classes = int(model["image_size"]), int(model.get("in_chans", 3)), int(model["num_classes"])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, chans))]),  # what the loader yields
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes or -1))]),  # logits, or features
    )
    with _global_tracking_uri(tracking_uri):
        info = Model.log(
            artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id,
            python_model=str(PYFUNC_MODEL_FILE),
            # only our two files: a checkpoint folder may also hold DeepSpeed shards or loader state
            artifacts={"weights": str(checkpoint_dir / WEIGHTS_FILE), "config": str(checkpoint_dir / CONFIG_FILE)},
            model_config={"normalize": normalize},
            signature=signature,
            input_example=_example_images(size, chans),
            # stated, not inferred (inference would load the model in a subprocess)
            pip_requirements=[f"vitpipe=={__version__}", f"mlflow=={mlflow.__version__}", "torch", "safetensors",
                              "numpy"],
        )
    return info.model_id


def register_checkpoint(
    checkpoint_dir: str | Path,
    *,
    run_id: str,
    name: str,
    tracking_uri: str | None = None,
    alias: str | None = "latest",
    tags: Mapping[str, Any] | None = None,
    artifact_path: str = DEFAULT_ARTIFACT_PATH,
    description: str | None = None,
    normalize: str = "imagenet",
) -> RegisteredVersion:
    """Logs a checkpoint folder (model.safetensors + model.json; nothing else it holds) to the run `run_id` as
    the pyfunc model `artifact_path` (see log_pyfunc_model), registers it as a new version of `name` with `tags`
    and `description`, and points `alias` at it. The run belongs to its `TrackedRun` (pipeline.tracking.run),
    which calls this through `run.register(...)`."""
    from mlflow.exceptions import MlflowException

    checkpoint_dir = Path(checkpoint_dir)
    _check_checkpoint_dir(checkpoint_dir)
    uri = resolve_tracking_uri(tracking_uri)
    client = _client(uri)
    all_tags = {FORMAT_TAG: FORMAT, **{k: str(v) for k, v in (tags or {}).items()}}
    # A database registry (sqlite://, postgresql://) looks the logged model up through the process-wide
    # tracking URI when the version is created, not through the client's: it must point at this store.
    with _global_tracking_uri(uri):
        model_id = log_pyfunc_model(checkpoint_dir, run_id=run_id, tracking_uri=uri, name=artifact_path,
                                    normalize=normalize)
        try:
            client.create_registered_model(name, description=description)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        mv = client.create_model_version(
            name, source=f"models:/{model_id}", run_id=run_id, tags=all_tags, description=description,
            model_id=model_id,
        )
    if alias and alias.lower() != LATEST:
        client.set_registered_model_alias(name, alias, mv.version)
    log.info("registered %s version %s (alias %s) from run %s", name, mv.version, alias, run_id)
    return RegisteredVersion(name, str(mv.version), mv.source, run_id, all_tags, (alias,) if alias else (),
                             description or "")


def _to_version(mv: Any) -> RegisteredVersion:
    return RegisteredVersion(
        name=mv.name,
        version=str(mv.version),
        source=mv.source,
        run_id=mv.run_id,
        tags=dict(mv.tags or {}),
        aliases=tuple(getattr(mv, "aliases", None) or ()),
        description=mv.description or "",
    )


def _known_models(client: "MlflowClient") -> list[str]:
    return sorted(m.name for m in client.search_registered_models(max_results=1000))


def resolve_version(uri: str, tracking_uri: str | None = None) -> RegisteredVersion:
    """Looks up `models:/NAME/VERSION` or `models:/NAME@ALIAS`. An unknown name, version or alias raises a
    RegistryError that lists the registered models, or the model's versions and aliases."""
    from mlflow.exceptions import MlflowException

    ref = parse_model_uri(uri)
    client = _client(tracking_uri)
    try:
        model = client.get_registered_model(ref.name)
    except MlflowException:
        known = _known_models(client)
        raise RegistryError(
            f"{uri}: no registered model named {ref.name!r} at {resolve_tracking_uri(tracking_uri)}; "
            f"registered models: {', '.join(known) if known else '(none)'}"
        ) from None
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{ref.name}'"))
    try:
        if ref.alias == LATEST:
            if not versions:
                raise MlflowException(f"{ref.name} has no versions")
            mv = client.get_model_version(ref.name, str(versions[-1]))
        elif ref.version:
            mv = client.get_model_version(ref.name, ref.version)
        else:
            mv = client.get_model_version_by_alias(ref.name, ref.alias)
    except MlflowException:
        aliases = dict(getattr(model, "aliases", {}) or {})
        what = f"version {ref.version}" if ref.version else f"alias {ref.alias!r}"
        alias_text = ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "(none)"
        raise RegistryError(
            f"{uri}: model {ref.name!r} has no {what}; versions: "
            f"{', '.join(map(str, versions)) if versions else '(none)'}; aliases: {alias_text}"
        ) from None
    return _to_version(mv)


def _checkpoint_location(client: "MlflowClient", version: RegisteredVersion) -> tuple[str, list[str]] | None:
    """(artifact URI of the folder holding the checkpoint files, the file names there), or None when the source
    is neither a logged model nor a run artifact path."""
    import mlflow.artifacts

    logged = _LOGGED_MODEL_RE.match(version.source)
    if logged:
        folder = client.get_logged_model(logged["id"]).artifact_location.rstrip("/") + "/artifacts"
        names = [Path(a.path).name for a in mlflow.artifacts.list_artifacts(
            artifact_uri=folder, tracking_uri=client.tracking_uri) if not a.is_dir]
        return folder, names
    m = re.match(r"^runs:/(?P<run>[^/]+)/?(?P<path>.*)$", version.source)
    if not m:
        return None
    return version.source, [Path(a.path).name for a in client.list_artifacts(m["run"], m["path"] or None)
                            if not a.is_dir]


def download_checkpoint(
    uri: str, dst_dir: str | Path, tracking_uri: str | None = None
) -> tuple[Path, RegisteredVersion]:
    """Resolves `uri`, checks that the entry is one of our checkpoints (before fetching the weights), downloads
    its two files into `dst_dir` and returns (folder holding model.safetensors + model.json, the version)."""
    import mlflow.artifacts

    version = resolve_version(uri, tracking_uri)
    client = _client(tracking_uri)
    where = _checkpoint_location(client, version)
    if where is not None:
        missing = [f for f in CHECKPOINT_FILES if f not in where[1]]
        if missing:
            raise RegistryError(
                f"{uri} (version {version.version}, source {version.source}) is not a vitpipe checkpoint: "
                f"missing {', '.join(missing)}; it holds: {', '.join(sorted(where[1])) or '(nothing)'}. "
                "Register weights with `vitpipe registry import` or a pretraining run."
            )
    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    uri_resolved = resolve_tracking_uri(tracking_uri)
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=where[0] if where is not None else version.uri,
            dst_path=str(dst_dir),
            tracking_uri=uri_resolved,
            registry_uri=uri_resolved,
        )
    )
    try:
        _check_checkpoint_dir(local)
        meta = json.loads((local / CONFIG_FILE).read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
            raise RegistryError(f"{CONFIG_FILE} is not a {FORMAT} model description")
    except (RegistryError, ValueError) as e:
        raise RegistryError(f"{uri} (version {version.version}) is not a vitpipe checkpoint: {e}") from None
    return local, version


def list_models(tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every registered model with its latest version number and aliases."""
    client = _client(tracking_uri)
    out = []
    for m in client.search_registered_models(max_results=1000, order_by=["name ASC"]):
        versions = [int(v.version) for v in client.search_model_versions(f"name='{m.name}'")]
        out.append(
            {
                "name": m.name,
                "latest_version": max(versions) if versions else None,
                "versions": len(versions),
                "aliases": dict(getattr(m, "aliases", {}) or {}),
            }
        )
    return out


def describe_model(name: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """A registered model's aliases and every version with its source, run and tags."""
    client = _client(tracking_uri)
    resolve_version_name(client, name, tracking_uri)
    model = client.get_registered_model(name)
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    return {
        "name": name,
        "description": model.description or "",
        "aliases": dict(getattr(model, "aliases", {}) or {}),
        "versions": [
            {"version": str(v.version), "source": v.source, "run_id": v.run_id, "tags": dict(v.tags or {}),
             "description": v.description or "",
             "aliases": sorted(a for a, n in (getattr(model, "aliases", {}) or {}).items() if str(n) == str(v.version)),
             "lineage": _chain(client, _to_version(v))}
            for v in versions
        ],
    }


def lineage(uri: str, tracking_uri: str | None = None) -> list[dict[str, str]]:
    """The chain behind a version, newest first: the version itself, then each version it was fine-tuned from
    (its `source.model` / `source.version` tags), ending at the pretrained one, whose dataset tags name the
    pretraining data (its manifest URL and checksum). A link to a version that no longer exists ends the chain
    with an entry saying so."""
    return _chain(_client(tracking_uri), resolve_version(uri, tracking_uri))


def _chain(client: "MlflowClient", version: RegisteredVersion) -> list[dict[str, str]]:
    """lineage() from a version in hand: one registry request per parent."""
    from mlflow.exceptions import MlflowException

    chain: list[dict[str, str]] = []
    seen: set[str] = set()
    v: RegisteredVersion | None = version
    while v is not None and v.uri not in seen:
        seen.add(v.uri)
        t = v.tags
        chain.append({"uri": v.uri, "run_id": v.run_id or "", "dataset.url": t.get("dataset.url", "unknown"),
                      "dataset.checksum": t.get("dataset.checksum", "unknown"), "steps": t.get("steps", "")})
        parent = t.get("source.model") or t.get("source.registered_model")  # the latter: versions before 0.2
        if not parent or not t.get("source.version"):
            break
        try:
            v = _to_version(client.get_model_version(parent, t["source.version"]))
        except MlflowException:
            chain.append({"uri": f"models:/{parent}/{t['source.version']}", "missing": "true"})
            v = None
    return chain


def resolve_version_name(client: "MlflowClient", name: str, tracking_uri: str | None) -> None:
    """Raises a RegistryError listing the registered models when `name` is not one of them."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        known = _known_models(client)
        raise RegistryError(
            f"no registered model named {name!r} at {resolve_tracking_uri(tracking_uri)}; "
            f"registered models: {', '.join(known) if known else '(none)'}"
        ) from None


def set_alias(name: str, version: str | int, alias: str, tracking_uri: str | None = None) -> RegisteredVersion:
    """Points `alias` at an existing version (checked first, with the versions listed if it is not there)."""
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", alias) or re.fullmatch(r"[vV]\d+", alias) or alias.lower() == LATEST:
        raise RegistryError(
            f"alias {alias!r}: use letters, digits, '-' or '_', not the form v<number>, and not 'latest' "
            "(MLflow reserves it: models:/NAME@latest always means the highest version)"
        )
    resolve_version(f"models:/{name}/{version}", tracking_uri)
    client = _client(tracking_uri)
    client.set_registered_model_alias(name, alias, str(version))
    return _to_version(client.get_model_version(name, str(version)))
