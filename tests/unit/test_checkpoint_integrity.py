"""The commit markers' file digests (pipeline.train.checkpoint): what a marker records, how a local copy is verified
against every rank's marker, and how a restore falls back past damaged checkpoints of a run folder. No DeepSpeed:
a stand-in engine writes through a checkpoint engine shaped like DeepSpeed's TorchCheckpointEngine. (The real
engine, ranks and storage: tests/reliability/test_checkpoint_integrity.py.)"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline.errors import DamagedCheckpointError
from pipeline.train import checkpoint as ckpt
from pipeline.train.runstore import RunStore


class TorchCheckpointEngine:  # the name DeepSpeed's plain writer has: its saves are streamed through the hash
    zipfile_serialization = True

    def __init__(self):
        self.saved = 0

    def save(self, state_dict, path: str) -> None:  # what DeepSpeed's does; replaced while a checkpoint is written
        self.saved += 1
        torch.save(state_dict, path)


class OtherCheckpointEngine(TorchCheckpointEngine):
    """Another writer (asynchronous, say): left alone, its files read back."""


class FakeEngine:
    """Writes what DeepSpeed writes for one rank of a 2-rank ZeRO-2 run: rank 0 the module states and `latest`."""

    def __init__(self, rank: int, checkpoint_engine=None):
        self.rank = rank
        self.checkpoint_engine = checkpoint_engine or TorchCheckpointEngine()

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict) -> None:
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        g = torch.Generator().manual_seed(self.rank)
        if self.rank == 0:
            self.checkpoint_engine.save(state_dict={"module": torch.randn(64, 64, generator=g), **client_state},
                                        path=os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))
        self.checkpoint_engine.save({"optimizer_state_dict": {"m": torch.randn(5000, generator=g)}},
                                    os.path.join(save_dir, tag, f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt"))
        if self.rank == 0:
            Path(save_dir, "latest").write_text(tag)


def _save(directory: Path, step: int, world_size: int = 2, engine_cls=TorchCheckpointEngine) -> list[FakeEngine]:
    """One committed checkpoint in `directory`, its ranks' files merged as Ray does. Returns the engines."""
    engines = []
    for rank in range(world_size):
        local = directory.parent / f".{directory.name}.rank{rank}"
        local.mkdir(parents=True)
        if rank == 0:
            (local / ckpt.EMA_FILE).write_bytes(os.urandom(1000))  # written by the EMA before the checkpoint
        engine = FakeEngine(rank, engine_cls())
        ckpt.save_train_checkpoint(engine, local, step=step, rank=rank, world_size=world_size, loader_state=None,
                                   run_id="r")
        for p in local.rglob("*"):
            if p.is_file():
                (directory / p.relative_to(local)).parent.mkdir(parents=True, exist_ok=True)
                p.rename(directory / p.relative_to(local))
        engines.append(engine)
    return engines


def _run(root: Path, steps=(2, 4, 6)) -> str:
    for step in steps:
        _save(root / ckpt.checkpoint_dir_name(step), step)
    return str(root)


def _marker(directory: Path, rank: int) -> dict:
    return json.loads((directory / f"COMMITTED.rank{rank}").read_text())


def _shard(directory: Path, step: int, rank: int = 1) -> Path:
    return directory / ckpt.checkpoint_tag(step) / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_markers_record_every_file_each_rank_wrote_hashed_as_written(tmp_path, monkeypatch):
    d = tmp_path / "checkpoint_00000002"
    read_back = []
    digest = ckpt.file_digest
    monkeypatch.setattr(ckpt, "file_digest", lambda p: read_back.append(Path(p).name) or digest(p))
    engines = _save(d, 2)
    assert sorted(read_back) == sorted(["latest", ckpt.EMA_FILE])  # only what DeepSpeed's torch.save did not write
    monkeypatch.undo()
    tag = ckpt.checkpoint_tag(2)
    m0, m1 = _marker(d, 0), _marker(d, 1)
    assert set(m0["files"]) == {f"{tag}/mp_rank_00_model_states.pt", f"{tag}/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                "latest", ckpt.EMA_FILE, "train_state.rank0.json"}
    assert set(m1["files"]) == {f"{tag}/zero_pp_rank_1_mp_rank_00_optim_states.pt", "train_state.rank1.json"}
    assert (m0["world_size"], m0["step"]) == (2, 2)
    for m in (m0, m1):
        for rel, entry in m["files"].items():
            assert entry == ckpt.file_digest(d / rel), rel
    # DeepSpeed's saves went through the hashing writer (torch.save to a file object names its archive "archive"),
    # and the engine got its own save back afterwards
    assert all(e.checkpoint_engine.saved == 0 and "save" not in vars(e.checkpoint_engine) for e in engines)
    with zipfile.ZipFile(_shard(d, 2)) as z:
        assert z.namelist()[0].startswith("archive/")
    assert torch.load(_shard(d, 2), weights_only=False)["optimizer_state_dict"]["m"].shape == (5000,)
    assert ckpt.verify_checkpoint(d) == []


def test_another_checkpoint_writer_is_left_alone_and_its_files_read_back(tmp_path):
    d = tmp_path / "checkpoint_00000002"
    engines = _save(d, 2, engine_cls=OtherCheckpointEngine)
    assert [e.checkpoint_engine.saved for e in engines] == [2, 1]
    for rank in (0, 1):
        for rel, entry in _marker(d, rank)["files"].items():
            assert entry == ckpt.file_digest(d / rel), rel


def test_verify_names_a_truncated_changed_or_missing_file(tmp_path):
    d = tmp_path / "checkpoint_00000002"
    _save(d, 2)
    shard, size = _shard(d, 2), _shard(d, 2).stat().st_size
    rel = shard.relative_to(d).as_posix()
    original = shard.read_bytes()

    shard.write_bytes(original[: size // 2])
    assert ckpt.verify_checkpoint(d) == [f"{rel} has {size // 2} bytes, {size} committed"]
    shard.write_bytes(original)
    _flip(shard)
    assert ckpt.verify_checkpoint(d) == [f"{rel} differs from its committed sha256"]
    shard.unlink()
    assert ckpt.verify_checkpoint(d) == [f"{rel} is missing"]
    shard.write_bytes(original)
    (d / "latest").write_text("x")  # every rank's marker is checked, whichever rank reads the file
    assert ckpt.verify_checkpoint(d) == [f"latest has 1 bytes, {len(ckpt.checkpoint_tag(2))} committed"]
    (d / "latest").write_text(ckpt.checkpoint_tag(2))
    marker = _marker(d, 1)
    marker["files"]["train_state.rank1.json"] = {"sizf": 1}  # a marker damaged into other valid JSON
    (d / "COMMITTED.rank1").write_text(json.dumps(marker))
    assert ckpt.verify_checkpoint(d) == ["COMMITTED.rank1 is unreadable"]


def test_markers_without_digests_are_accepted(tmp_path, caplog):
    """Checkpoints committed before the markers recorded digests still resume (their files are not checked)."""
    d = tmp_path / "checkpoint_00000002"
    _save(d, 2)
    for rank in (0, 1):
        (d / f"COMMITTED.rank{rank}").write_text(json.dumps({"world_size": 2, "step": 2}))
    _shard(d, 2).write_bytes(b"truncated")
    with caplog.at_level(logging.DEBUG, logger="pipeline.train.checkpoint"):
        assert ckpt.verify_checkpoint(d) == []
    assert "record no file digests" in caplog.text
    with RunStore(str(tmp_path)).fetch_intact() as found:
        assert found == (str(d), str(d))


def test_fetch_intact_falls_back_past_damaged_checkpoints_with_a_warning(tmp_path, caplog):
    run = _run(tmp_path)
    with RunStore(run).fetch_intact() as found:
        assert found == (f"{run}/checkpoint_00000006",) * 2
    _shard(tmp_path / "checkpoint_00000006", 6).write_bytes(b"short")
    _flip(tmp_path / "checkpoint_00000004" / "train_state.rank0.json", at=3)
    (tmp_path / "checkpoint_00000008").mkdir()  # uncommitted: ignored as before
    with caplog.at_level(logging.WARNING, logger="pipeline.train.runstore"):
        with RunStore(run).fetch_intact() as (url, local):
            assert url == local == f"{run}/checkpoint_00000002"
            assert ckpt.read_train_state(local, 1)["step"] == 2
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warned) == 2, warned
    assert "checkpoint_00000006" in warned[0] and "step00000006/zero_pp_rank_1_mp_rank_00_optim_states.pt" in warned[0]
    assert "checkpoint_00000004" in warned[1] and "train_state.rank0.json differs" in warned[1]
    assert RunStore(run).latest() == f"{run}/checkpoint_00000006"  # the listing itself is unchanged
    assert list(RunStore(run).committed()) == [f"{run}/checkpoint_0000000{s}" for s in (6, 4, 2)]


def test_fetch_intact_fails_with_one_line_when_none_is_intact(tmp_path):
    run = _run(tmp_path, steps=(2, 4))
    _shard(tmp_path / "checkpoint_00000004", 4).write_bytes(b"")
    _flip(_shard(tmp_path / "checkpoint_00000002", 2, rank=0))
    with pytest.raises(DamagedCheckpointError) as e:
        with RunStore(run).fetch_intact():
            pytest.fail("nothing is intact")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"run folder {run}: no committed checkpoint is intact"), msg
    assert "checkpoint_00000004: step00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt has 0 bytes" in msg, msg
    assert "checkpoint_00000002: step00000002/zero_pp_rank_0_mp_rank_00_optim_states.pt differs" in msg, msg


def test_fetch_intact_follows_the_ranks_vote_and_handles_an_empty_run(tmp_path):
    """Another rank's copy damaged: every rank moves on to the previous checkpoint together."""
    assert RunStore(str(tmp_path / "none")).fetch_intact().__enter__() is None
    run = _run(tmp_path, steps=(2, 4))
    votes = []

    def agree(ok: bool) -> bool:  # the other rank found checkpoint 4 damaged
        votes.append(ok)
        return ok and len(votes) > 1

    with RunStore(run).fetch_intact(agree=agree) as (url, _):
        assert url.endswith("checkpoint_00000002")
    assert votes == [True, True]
    assert ckpt.every_rank(True) and not ckpt.every_rank(False)  # no process group: this process's own vote


def test_latest_state_skips_a_damaged_state_file(tmp_path, caplog):
    run = _run(tmp_path, steps=(2, 4))
    assert RunStore(run).latest_state()[1]["step"] == 4
    _flip(tmp_path / "checkpoint_00000004" / "train_state.rank0.json", at=3)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.runstore"):
        url, state = RunStore(run).latest_state()
    assert url.endswith("checkpoint_00000002") and state["step"] == 2
    assert "train_state.rank0.json differs" in caplog.text

