"""Registry helpers that need no server: model URIs, lineage tags, code version."""

from __future__ import annotations

import re

import pytest

from pipeline.config import config_hash, load_config
from pipeline.errors import RegistryError
from pipeline.lineage import lineage_tags
from pipeline.model.ref import parse_model_uri
from pipeline.version import code_version


@pytest.mark.parametrize(
    "uri, name, version, alias",
    [
        ("models:/vit-b16-i21k/3", "vit-b16-i21k", "3", None),
        ("models:/vit-b16-i21k@champion", "vit-b16-i21k", None, "champion"),
        ("models:/m@latest", "m", None, "latest"),
        ("models:/m/latest", "m", None, "latest"),  # MLflow's own form: the highest version
        ("models:/m@LATEST", "m", None, "latest"),
    ],
)
def test_parse_model_uri(uri, name, version, alias):
    ref = parse_model_uri(uri)
    assert (ref.name, ref.version, ref.alias) == (name, version, alias)


@pytest.mark.parametrize("bad", ["vit-b16", "models:/", "models:/a/b/c", "models:/a@", "runs:/abc/model", "models:/a/v3"])
def test_parse_model_uri_rejects_other_forms(bad):
    with pytest.raises(RegistryError, match=r"models:/NAME/VERSION or models:/NAME@ALIAS"):
        parse_model_uri(bad)


def test_lineage_tags_record_where_a_checkpoint_came_from():
    cfg = load_config("configs/pretrain/smoke.yaml", ["data.train=s3://b/fmnist/train/manifest.json"])

    class FakeManifest:  # any object with .url and .checksum (the data Manifest's fields)
        url = "s3://b/fmnist/train/manifest.json"
        checksum = "sha256:abc"

    tags = lineage_tags(cfg, run_id="r1", step=20, images_seen=1280, dataset=FakeManifest(), extra={"x": 1})
    assert tags["dataset.url"] == "s3://b/fmnist/train/manifest.json"
    assert tags["dataset.checksum"] == "sha256:abc"
    assert tags["steps"] == "20" and tags["images_seen"] == "1280"
    assert tags["resolution"] == "28" and tags["model.variant"] == "vit_pico4"
    assert tags["config_hash"] == config_hash(cfg)
    assert tags["run_id"] == "r1" and tags["x"] == "1"
    assert all(isinstance(v, str) for v in tags.values())
    # without a manifest the configured URL is recorded and the checksum says it is unknown
    bare = lineage_tags(cfg, run_id=None)
    assert bare["dataset.url"] == cfg.data.train and bare["dataset.checksum"] == "unknown"


def test_code_version_starts_with_the_package_version():
    from pipeline import __version__

    v = code_version()
    assert v == __version__ or re.fullmatch(re.escape(__version__) + r"\+g[0-9a-f]{12}(\+dirty)?", v)


def test_a_tree_without_git_reports_the_submitting_checkouts_version(tmp_path, monkeypatch):
    """A Ray job runs from an uploaded copy without .git: `vitpipe submit` puts the checkout's version (commit and
    dirty flag) in the job's environment, and the job reports that."""
    from pipeline import __version__
    from pipeline.launch.submit import runtime_env_for
    from pipeline.version import CODE_VERSION_ENV

    monkeypatch.delenv(CODE_VERSION_ENV, raising=False)
    assert code_version(tmp_path) == __version__
    env = runtime_env_for(environ={})["env_vars"]
    assert env[CODE_VERSION_ENV] == code_version()  # this checkout's: +g<commit> when it is a git clone
    monkeypatch.setenv(CODE_VERSION_ENV, env[CODE_VERSION_ENV])
    assert code_version(tmp_path) == env[CODE_VERSION_ENV]
    assert CODE_VERSION_ENV not in runtime_env_for(working_dir=False, environ={})["env_vars"]
