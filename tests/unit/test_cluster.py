"""Cluster definitions (launcher YAML, KubeRay manifests, runtime env) and the pure parts of job submission."""

from __future__ import annotations

import copy
import importlib.util
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.config import load_config
from pipeline.devstack.netns import Subnet
from pipeline.errors import ConfigError
from pipeline.launch import submit as S

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"


def _ray_schema() -> dict:
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    return json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------- launcher config
def test_launcher_config_validates_against_rays_schema():
    cfg = _load(CLUSTER / "aws-gpu.yaml")
    jsonschema.validate(cfg, _ray_schema())
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]
    gpu_types = {k: v for k, v in cfg["available_node_types"].items() if v["resources"].get("GPU", 0) > 0}
    assert {t["node_config"]["InstanceType"].split(".")[0] for t in gpu_types.values()} >= {"p4d", "p5"}
    assert any("pip install -e" in c for c in cfg["setup_commands"])
    for local in cfg["file_mounts"].values():
        if not local.startswith("~"):
            assert (ROOT / local).exists(), local


def test_schema_check_is_real():
    """The same validation rejects a broken copy (a GPU count as a string, an unknown top-level key)."""
    schema = _ray_schema()
    cfg = _load(CLUSTER / "aws-gpu.yaml")
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_a100"]["resources"]["GPU"] = "8"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(cfg)
    bad["worker_nodes"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


# ---------------------------------------------------------------- KubeRay manifests
def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"].startswith("2.")
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    containers = head["template"]["spec"]["containers"]
    assert containers and containers[0]["image"]
    assert {p["containerPort"] for p in containers[0]["ports"]} >= {6379, 8265}
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        c = group["template"]["spec"]["containers"][0]
        assert c["image"] and int(c["resources"]["limits"]["nvidia.com/gpu"]) > 0
    for c in [containers[0]] + [g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]:
        # credentials come from a Secret, never inline
        assert all("value" not in e or not S._is_secret(e["name"]) for e in c.get("env", []))


def test_raycluster_manifest_structure():
    doc = _load(CLUSTER / "kuberay" / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    _check_ray_cluster_spec(doc["spec"])


def test_rayjob_manifest_structure_and_entrypoint():
    doc = _load(CLUSTER / "kuberay" / "rayjob-pretrain.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    assert spec["shutdownAfterJobFinishes"] is True
    yaml.safe_load(spec["runtimeEnvYAML"])
    # entrypoint: python -m jobs.pretrain CONFIG --set ...; the module and config exist and the config validates
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pretrain"]
    assert (ROOT / "jobs" / "pretrain.py").is_file(), "jobs/pretrain.py (the RayJob's entrypoint) is missing"
    config = argv[3]
    overrides = argv[argv.index("--set") + 1:] if "--set" in argv else []
    assert (ROOT / config).is_file()
    cfg = load_config([ROOT / config], overrides)
    assert cfg.scaling.use_gpu and cfg.scaling.storage_path.startswith("s3://")


def test_runtime_env_file_matches_submit_excludes():
    env = _load(CLUSTER / "runtime_env.yaml")
    assert env["working_dir"] == "."
    assert env["excludes"] == S.WORKING_DIR_EXCLUDES  # one list, two places: keep them equal
    assert not any(S._is_secret(k) for k in env["env_vars"])


def test_working_dir_excludes_keep_the_library():
    """Ray matches excludes with gitwildmatch relative to working_dir; `/data` must not drop pipeline/data/."""
    from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray's working_dir packaging uses

    spec = PathSpec.from_lines("gitwildmatch", S.WORKING_DIR_EXCLUDES)
    for kept in ("pipeline/data/config.py", "pipeline/data", "jobs/pretrain.py", "configs/pretrain/smoke.yaml"):
        assert not spec.match_file(kept), kept
    for dropped in (".venv", ".venv/bin/python", ".git/HEAD", "data/fmnist/x.tar", "runs/ckpt",
                    "pipeline/__pycache__/x.pyc", ".vitpipe-stack/state.json", "model.safetensors"):
        assert spec.match_file(dropped), dropped


# ---------------------------------------------------------------- submission building
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYFAKEKEY"


def test_build_pretrain_submission_forwards_env_and_redacts():
    environ = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_ENDPOINT_URL": "http://s3:9000",
               "MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_TRACKING_TOKEN": "tok-123456", "HOME": "/root"}
    sub = S.build_submission("pretrain", ["configs/pretrain/smoke.yaml"], ["train.steps=3"], job_args=["--resume"],
                             environ=environ)
    assert sub.entrypoint == "python -m jobs.pretrain configs/pretrain/smoke.yaml --set train.steps=3 --resume"
    assert sub.config.train.steps == 3
    env = sub.runtime_env["env_vars"]
    assert env["AWS_SECRET_ACCESS_KEY"] == SECRET and env["AWS_ENDPOINT_URL"] == "http://s3:9000"
    assert "HOME" not in env
    assert sub.runtime_env["working_dir"] == str(S.PROJECT_DIR)
    shown = json.dumps(S.redact(sub.runtime_env))
    assert SECRET not in shown and "AKIAFAKE" not in shown and "tok-123456" not in shown
    assert "http://mlflow:5000" in shown
    assert S.secret_scrubber(sub.runtime_env)(f"key={SECRET}") == "key=***"


def test_config_is_validated_before_submitting():
    with pytest.raises(ConfigError, match="train.stepz"):
        S.build_submission("pretrain", ["configs/pretrain/smoke.yaml"], ["train.stepz=3"], environ={})


def test_config_outside_project_is_refused(tmp_path):
    outside = tmp_path / "smoke.yaml"
    outside.write_text((ROOT / "configs/pretrain/smoke.yaml").read_text())
    with pytest.raises(ValueError, match="outside the project dir"):
        S.build_submission("pretrain", [str(outside)], environ={})
    with pytest.raises(FileNotFoundError, match="not found"):
        S.build_submission("pretrain", ["configs/pretrain/nope.yaml"], environ={})


def test_transfer_needs_a_transfer_config():
    with pytest.raises(ConfigError, match="transfer"):
        S.build_submission("transfer", ["configs/pretrain/smoke.yaml"], job_args=["--from", "models:/x@latest"],
                           environ={})


def test_no_working_dir_and_command_kind():
    sub = S.build_submission("command", job_args=["python", "-c", "print('hi there')"], working_dir=False, environ={})
    assert sub.entrypoint == "python -c 'print('\"'\"'hi there'\"'\"')'"
    assert "working_dir" not in sub.runtime_env
    with pytest.raises(ValueError, match="unknown job kind"):
        S.build_submission("bogus", environ={})


def test_auth_headers_from_token_file(tmp_path):
    token = tmp_path / "tok"
    token.write_text("abc123\n")
    assert S._auth_headers({"RAY_AUTH_TOKEN_PATH": str(token)}) == {"Authorization": "Bearer abc123"}
    assert S._auth_headers({"RAY_AUTH_TOKEN": "xyz"}) == {"Authorization": "Bearer xyz"}
    assert S._auth_headers({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "xyz"}) == {}


# ---------------------------------------------------------------- multi-node naming
def test_subnet_names_fit_linux_interface_names():
    net = Subnet("10.213.7.0/24")
    assert net.host_ip == "10.213.7.1" and net.node_ip(1) == "10.213.7.11"
    for name in (net.bridge, net.veth_host(99), net.veth_node(99)):
        assert len(name) <= 15
    with pytest.raises(ValueError, match="private /24"):
        Subnet("8.8.8.0/24")
    with pytest.raises(ValueError):
        Subnet("10.213.0.0/16")
