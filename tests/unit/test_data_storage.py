"""Storage access: URL -> filesystem, counted mid-stream retries, no pickled clients, webdataset opener."""

from __future__ import annotations

import importlib
import io
import pickle

import pytest

from pipeline.data import retries
from pipeline.data import storage as st
from pipeline.data.config import StorageConfig
from pipeline.data.manifest import load_dataset_spec
from pipeline.data.readahead import ReadAhead

QUICK = StorageConfig(max_retries=3, backoff_base_s=0.001, backoff_max_s=0.01)


def test_local_paths_and_file_urls(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"hello")
    fs, path = st.get_filesystem(str(tmp_path / "a.bin"))
    assert fs.cat_file(path) == b"hello"
    fs2, path2 = st.get_filesystem(f"file://{tmp_path}/a.bin")
    assert fs2 is fs and path2 == path
    with st.open_url(f"file://{tmp_path}/a.bin") as f:
        assert f.read() == b"hello"
    with st.open_url(str(tmp_path / "sub" / "b.bin"), "wb") as f:  # parent folders are created
        f.write(b"x")
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"x"


def test_unknown_scheme_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unsupported storage URL scheme 'ftp'"):
        st.get_filesystem("ftp://host/x")
    with pytest.raises(FileNotFoundError):
        st.open_url(str(tmp_path / "nope.tar"))
    with pytest.raises(ValueError, match="mode"):
        st.open_url(str(tmp_path / "x"), "r+")


class _FlakyFile(io.BytesIO):
    """A real in-memory stream that breaks once at a given byte (how a reset connection looks to a reader)."""

    def __init__(self, data: bytes, break_at: int, error: Exception):
        super().__init__(data)
        self.break_at, self.error = break_at, error

    def read(self, n=-1):
        if self.break_at is not None and self.tell() + (n if n >= 0 else 1 << 30) > self.break_at:
            self.break_at = None
            raise self.error
        return super().read(n)


def test_retrying_reader_resumes_at_the_byte_reached_and_counts():
    data = bytes(range(256)) * 100
    opened = []

    def opener():
        opened.append(1)
        return _FlakyFile(data, 5000 if len(opened) == 1 else None, ConnectionResetError("reset by peer"))

    before = retries.io_counters()["read_retries"]
    with io.BufferedReader(retries.RetryingReader(opener, "mem://x", QUICK), buffer_size=1024) as f:
        assert f.read() == data
    assert len(opened) == 2
    assert retries.io_counters()["read_retries"] == before + 1
    assert retries.io_counters()["retries"] >= 1


def test_retrying_reader_gives_up_after_max_retries_and_never_retries_not_found():
    def always_broken():
        return _FlakyFile(b"x" * 100, 0, TimeoutError("slow"))

    with pytest.raises(TimeoutError):
        retries.RetryingReader(always_broken, "mem://x", QUICK).read(10)

    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        retries.RetryingReader(missing, "mem://x", QUICK).read(10)
    assert len(calls) == 1


def test_storage_handle_pickles_without_its_client(tmp_path):
    s = st.Storage(StorageConfig(endpoint_url="http://127.0.0.1:9", max_retries=2))
    s.filesystem(str(tmp_path))
    blob = pickle.dumps(s)
    assert b"s3fs" not in blob and b"LocalFileSystem" not in blob
    s2 = pickle.loads(blob)
    assert s2.config == s.config


def test_s3_filesystem_takes_endpoint_and_retry_config_without_connecting():
    cfg = StorageConfig(endpoint_url="http://127.0.0.1:9", max_retries=4, retry_mode="adaptive")
    fs, path = st.get_filesystem("s3://bucket/key.tar", cfg)
    assert path == "bucket/key.tar"
    assert fs.client_kwargs == {} and fs.endpoint_url == "http://127.0.0.1:9"
    assert fs.config_kwargs["retries"] == {"mode": "adaptive", "max_attempts": 5}
    assert st.get_filesystem("s3://other/x", cfg)[0] is fs  # one client per process and config


def test_gs_needs_gcsfs():
    try:
        importlib.import_module("gcsfs")
    except ImportError:
        with pytest.raises(ValueError, match="gcsfs"):
            st.get_filesystem("gs://bucket/x")
    else:
        assert st.get_filesystem("gs://bucket/x", StorageConfig(anon=True))[1] == "bucket/x"


def test_webdataset_opener_is_registered():
    gopen = importlib.import_module("webdataset.gopen")
    st.register_wds_opener(StorageConfig())
    assert gopen.gopen_schemes["s3"].func is st.wds_opener


def test_url_join():
    assert st.url_join("s3://b/ds/", "x.tar") == "s3://b/ds/x.tar"
    assert st.url_join("s3://b/ds", "s3://c/y.tar") == "s3://c/y.tar"
    assert st.parent_url("s3://b/ds/manifest.json") == "s3://b/ds"


def test_manifest_errors_name_the_url_and_problem(tmp_path):
    with pytest.raises(ValueError, match=f"not found: {tmp_path}/manifest.json"):
        load_dataset_spec(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_dataset_spec(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="format is 'other'"):
        load_dataset_spec(str(tmp_path / "manifest.json"))
    (tmp_path / "manifest.json").write_text(
        '{"format": "vitpipe-shards/1", "shards": [{"url": "a.tar", "samples": 3}], "num_samples": 4}')
    with pytest.raises(ValueError, match="num_samples is 4 but the shards hold 3"):
        load_dataset_spec(str(tmp_path))
    (tmp_path / "manifest.json").write_text(
        '{"format": "vitpipe-shards/1", "shards": [{"url": "a.tar", "samples": 3}], "num_samples": 3,'
        ' "class_names": ["x", "y"], "label_type": "single"}')
    m = load_dataset_spec(str(tmp_path))
    assert m.shards == [f"{tmp_path}/a.tar"] and m.num_classes == 2 and m.num_samples == 3


def test_brace_pattern_with_sample_count():
    m = load_dataset_spec("s3://b/i21k-{000000..000003}.tar|10")
    assert m.shards[0] == "s3://b/i21k-000000.tar" and m.shards[-1] == "s3://b/i21k-000003.tar"
    assert m.samples_per_shard == [3, 3, 2, 2] and m.num_samples == 10 and not m.exact_counts
    assert load_dataset_spec("s3://b/x-{0..1}.tar|4|multi").label_type == "multi"
    for bad in ("s3://b/x-{0..3}.tar|many", "s3://b/x-{0..3}.tar|2", "s3://b/x.tar|3|odd"):
        with pytest.raises(ValueError, match="dataset pattern"):
            load_dataset_spec(bad)


def test_read_ahead_streams_objects_in_order_across_abandoned_and_missing_ones(tmp_path):
    """The loader's read-ahead thread: each stream gets exactly its object's bytes, whether the one before it was
    read to the end, closed half-way, or missing (its error raised by its own stream, not the next one's)."""
    bodies = [bytes([i]) * (3000 + 1000 * i) for i in range(4)]
    paths = []
    for i, body in enumerate(bodies):
        (tmp_path / f"o{i}").write_bytes(body)
        paths.append(str(tmp_path / f"o{i}"))
    paths.insert(2, str(tmp_path / "missing"))
    ahead = ReadAhead(paths, st.StorageConfig(read_block_size=1024), blocks=2)
    try:
        with ahead.open(0) as f:
            assert f.read() == bodies[0]
        with ahead.open(1) as f:
            assert f.read(100) == bodies[1][:100]  # closed half-way: the rest is skipped
        with ahead.open(2) as f, pytest.raises(FileNotFoundError):
            f.read()
        for k in (3, 4):
            with ahead.open(k) as f:
                assert f.read() == bodies[k - 1]
    finally:
        ahead.close()
    before = retries.io_counters()["bytes_read"]
    ahead = ReadAhead(paths[:1], st.StorageConfig(), blocks=1)
    with ahead.open(0) as f:
        f.read()
    ahead.close()
    assert retries.io_counters()["bytes_read"] - before == len(bodies[0])
