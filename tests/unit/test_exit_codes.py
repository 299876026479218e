"""How a command ends (pipeline.commands.run): each kind of error -> its exit code and one line on stderr, the same
for `vitpipe` and the Ray job entrypoints (jobs/*.py), which run the CLI's own commands."""

from __future__ import annotations

import argparse
import sys

import pytest

from pipeline.cli import job_main, main
from pipeline.commands.run import reported_cluster_errors, run_command
from pipeline.errors import ConfigError, DamagedCheckpointError, RegistryError, RunStopped


def _raising(exc: BaseException):
    def func(args):
        raise exc

    return func


def _foreign(module: str) -> Exception:
    """An exception whose class lives in `module` (how run_command recognises mlflow's and botocore's)."""
    cls = type("ServiceDown", (Exception,), {"__module__": module})
    return cls("connection refused")


QUIET = argparse.Namespace(verbose=False)
VERBOSE = argparse.Namespace(verbose=True)


@pytest.mark.parametrize("exc, code, line", [
    (ConfigError("train.steps: must be > 0"), 2, "prog: train.steps: must be > 0"),
    (RegistryError("no registered model named 'x'"), 2, "prog: no registered model named 'x'"),
    (DamagedCheckpointError("no intact checkpoint"), 2, "prog: no intact checkpoint"),
    (ValueError("dataset manifest not found: /x/manifest.json"), 2, "prog: dataset manifest not found: /x/manifest.json"),
    (FileNotFoundError("config file not found: a.yaml"), 2, "prog: config file not found: a.yaml"),
    (RunStopped("r", 7, "s3://b/r/checkpoint_7"), 143,
     "prog: run 'r' stopped (stop requested) at step 7; checkpoint s3://b/r/checkpoint_7 is committed: continue with "
     "--resume"),
    (_foreign("mlflow.exceptions"), 2, "prog: ServiceDown: connection refused (check the tracking URI: "
     "tracking.tracking_uri, --tracking-uri or $MLFLOW_TRACKING_URI)"),
    (_foreign("botocore.exceptions"), 2, "prog: ServiceDown: connection refused (check storage.endpoint_url / "
     "$AWS_ENDPOINT_URL and the credentials)"),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None)
def test_each_error_is_its_exit_code_and_one_line(exc, code, line, capsys):
    assert run_command(_raising(exc), QUIET, "prog") == code
    out, err = capsys.readouterr()
    assert err.splitlines() == [line] and out == ""


def test_success_is_the_commands_own_code():
    assert run_command(lambda args: None, QUIET, "prog") == 0
    assert run_command(lambda args: 3, QUIET, "prog") == 3


def test_interrupts_and_closed_pipes_end_quietly(capsys, monkeypatch):
    assert run_command(_raising(KeyboardInterrupt()), QUIET, "prog") == 130
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # a closed pipe leaves sys.stdout None; restored after the test
    assert run_command(_raising(BrokenPipeError()), QUIET, "prog") == 0
    assert sys.stdout is None
    monkeypatch.undo()
    assert capsys.readouterr().err == ""


def test_anything_else_and_verbose_keep_the_traceback(capsys):
    with pytest.raises(RuntimeError):
        run_command(_raising(RuntimeError("bug")), QUIET, "prog")
    for exc in (ValueError("x"), FileNotFoundError("y"), _foreign("mlflow.exceptions")):
        with pytest.raises(type(exc)):
            run_command(_raising(exc), VERBOSE, "prog")
    # a ConfigError says where and what to do: still its one line
    assert run_command(_raising(ConfigError("where: what")), VERBOSE, "prog") == 2
    assert capsys.readouterr().err == "prog: where: what\n"


def test_an_unreachable_cluster_is_one_line():
    cmd = argparse.Namespace(verbose=False, prog="vitpipe jobs")
    auth = type("AuthenticationError", (Exception,), {})
    for exc in (ConnectionError("refused"), RuntimeError("dashboard 503"), auth("401")):
        assert reported_cluster_errors(_raising(exc))(cmd) == 2
    with pytest.raises(KeyError):
        reported_cluster_errors(_raising(KeyError("bug")))(cmd)
    with pytest.raises(ConnectionError):
        reported_cluster_errors(_raising(ConnectionError("refused")))(argparse.Namespace(verbose=True, prog="p"))


def test_cli_and_job_share_the_mapping_and_differ_only_in_the_name(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    assert main(["transfer-suite", str(tmp_path / "none")]) == 2
    cli_err = capsys.readouterr().err
    assert job_main("transfer suite", ["transfer-suite", str(tmp_path / "none")]) == 2
    job_err = capsys.readouterr().err
    assert cli_err.startswith("vitpipe transfer-suite: transfer suite ") and "no such folder" in cli_err
    assert job_err == cli_err.replace("vitpipe transfer-suite: ", "transfer suite: ", 1)
    assert job_main("pretrain job", ["pretrain", missing]) == 2
    assert capsys.readouterr().err == f"pretrain job: config file not found: {missing}\n"


def test_the_job_entrypoints_report_bad_input_in_one_line(tmp_path, capsys):
    import jobs.make_shards
    import jobs.pretrain
    import jobs.transfer
    import jobs.transfer_suite

    missing = str(tmp_path / "nope.yaml")
    assert jobs.pretrain.main([missing]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"pretrain job: config file not found: {missing}"
    assert jobs.transfer.main([missing, "--from", "models:/m@a"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"transfer job: config file not found: {missing}"
    assert jobs.transfer_suite.main([str(tmp_path)]) == 2
    assert "transfer suite: transfer suite" in capsys.readouterr().err
    job = tmp_path / "job.yaml"
    job.write_text("source: /images\n")
    assert jobs.make_shards.main([str(job)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"make_shards job: {job}: expected a mapping with at least "
                                                        "'source' and 'dest'")
