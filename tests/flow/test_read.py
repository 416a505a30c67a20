
import pytest
from shardkit import image_bytes, sample, write_shard

from pipeline.flow.read import ShardReader, expand_shards, shard_name, split_member


def test_expand_brace_patterns_and_folders(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"{i:05d}.tar", [sample(i)])
    assert expand_shards(str(tmp_path / "{00000..00002}.tar")) == [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert expand_shards([str(tmp_path)]) == [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert expand_shards(["a.tar", "a.tar", "b.tar"]) == ["a.tar", "b.tar"]
    with pytest.raises(ValueError, match="no shards"):
        expand_shards([])


def test_shard_names():
    assert shard_name("s3://bucket/x/00042.tar") == "00042"
    assert shard_name("/data/00001.tar.gz") == "00001"
    assert shard_name("pipe:curl -s -L https://host/a/00007.tar") == "00007"
    assert split_member("dir/000123.jpg") == ("dir/000123", "jpg")
    assert split_member("000123.seg.PNG") == ("000123", "seg.png")


def test_groups_members_by_key_in_order(tmp_path):
    url = write_shard(tmp_path / "a.tar", [sample(i) for i in range(5)])
    reader = ShardReader(url)
    samples = list(reader)
    assert reader.damage is None
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(5)]
    assert [s.index for s in samples] == list(range(5))
    assert all(set(s.members) == {"jpg", "txt", "json"} for s in samples)
    assert samples[2].members["txt"] == sample(2)[1]["txt"]


def test_truncated_tar_keeps_samples_before_the_damage(tmp_path):
    full = write_shard(tmp_path / "full.tar", [sample(i) for i in range(6)])
    size = len(open(full, "rb").read())
    url = write_shard(tmp_path / "cut.tar", [sample(i) for i in range(6)], truncate_to=size // 2)
    reader = ShardReader(url)
    samples = list(reader)
    assert reader.damage is not None
    good = [s for s in samples if s.error is None]
    assert 1 <= len(good) < 6
    assert [s.key for s in good] == [f"{i:09d}" for i in range(len(good))]
    assert samples[-1].error is None or "truncated" in samples[-1].error


def test_not_a_tar_is_a_shard_error(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file at all" * 10)
    with pytest.raises(OSError, match="not a readable tar"):
        list(ShardReader(str(bad)))


# -- transport, damage and odd members (issue: nothing lost, nothing mixed) -------------------------------
import gzip  # noqa: E402
import io  # noqa: E402
import tarfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from shardkit import cut_transfer, http_server  # noqa: E402

from pipeline.errors import TransportError  # noqa: E402


def _tar_bytes(samples) -> bytes:
    path = io.BytesIO()
    with tarfile.open(fileobj=path, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path.getvalue()


def test_a_connection_cut_mid_body_is_a_transport_error_not_damage():
    data = _tar_bytes([sample(i) for i in range(6)])
    with http_server(cut_transfer(data)) as base:
        reader = ShardReader(f"{base}/00000.tar", stall_timeout=10)
        with pytest.raises(TransportError, match="00000.tar"):
            list(reader)
        assert reader.damage is None


def test_a_stalled_server_times_out_instead_of_hanging():
    data = _tar_bytes([sample(i) for i in range(3)])
    release = threading.Event()

    def stall(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data[:1024])
        handler.wfile.flush()
        release.wait(30)

    with http_server(stall) as base:
        started = time.time()
        with pytest.raises(TransportError, match="no data for 1.5 s"):
            list(ShardReader(f"{base}/00000.tar", stall_timeout=1.5))
        release.set()
    assert time.time() - started < 15


def test_a_stalled_pipe_command_is_killed_and_fails():
    started = time.time()
    with pytest.raises(TransportError, match="no data for 1 s"):
        list(ShardReader("pipe:sleep 60", stall_timeout=1))
    assert time.time() - started < 10


def test_a_tar_cut_mid_member_then_gzipped_whole_is_damage(tmp_path):
    data = _tar_bytes([sample(i) for i in range(5)])
    cut = data[: data.index(b"000000003.txt") - 100]  # inside sample 2's last member (a header or its data)
    path = tmp_path / "00000.tar.gz"
    path.write_bytes(gzip.compress(cut))
    reader = ShardReader(str(path))
    samples = list(reader)
    assert reader.damage is not None
    assert [s.key for s in samples][:2] == ["000000000", "000000001"]
    assert len(samples) <= 4


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar.zst", ".tar.bz2", ".tar.xz", ".tar"])
def test_compressed_shards_read_completely(tmp_path, suffix):
    import bz2
    import lzma

    import zstandard

    data = _tar_bytes([sample(i) for i in range(4)])
    pack = {".tar.gz": gzip.compress, ".tar.zst": zstandard.ZstdCompressor().compress, ".tar.bz2": bz2.compress,
            ".tar.xz": lzma.compress, ".tar": bytes}[suffix]
    path = tmp_path / f"00000{suffix}"
    path.write_bytes(pack(data))
    reader = ShardReader(str(path))
    assert [s.key for s in reader] == [f"{i:09d}" for i in range(4)] and reader.damage is None
    assert shard_name(str(path)) == "00000"


def test_quoted_globs_expand(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"{i:05d}.tar", [sample(i)])
    assert expand_shards(str(tmp_path / "*.tar")) == [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    with pytest.raises(ValueError, match="matched no file"):
        expand_shards(str(tmp_path / "*.tgz"))


def test_an_oversized_member_is_not_read_and_its_sample_says_why(tmp_path):
    url = write_shard(tmp_path / "00000.tar", [sample(0), ("000000001", {"jpg": b"x" * 5000, "txt": b"big"}),
                                                 sample(2)])
    samples = list(ShardReader(url, max_member_bytes=4096))
    assert [s.key for s in samples] == ["000000000", "000000001", "000000002"]
    assert "jpg" not in samples[1].members and samples[1].members["txt"] == b"big"
    assert samples[1].skipped == ["member .jpg is 5000 bytes, over the 4096-byte limit "
                                  "(raise --max-member-bytes if such members are legitimate)"]


def test_a_huge_sparse_member_costs_no_memory(tmp_path):
    """A 4 GB sparse member in a ~10 kB tar (GNU tar --sparse) is refused without being materialised."""
    import resource
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.skip("needs GNU tar to write a sparse member")
    folder = tmp_path / "members"
    folder.mkdir()
    for ext, data in sample(0)[1].items():
        (folder / f"000000000.{ext}").write_bytes(data)
    with open(folder / "000000001.jpg", "wb") as fh:
        fh.truncate(4 << 30)  # 4 GB of holes
    (folder / "000000001.txt").write_bytes(b"sparse")
    path = tmp_path / "00000.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(path), "-C", str(folder),
                    "000000000.jpg", "000000000.json", "000000000.txt", "000000001.jpg", "000000001.txt"], check=True)
    assert path.stat().st_size < 100_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reader = ShardReader(str(path))
    samples = list(reader)
    assert [s.key for s in samples] == ["000000000", "000000001"] and reader.damage is None
    assert samples[1].members == {"txt": b"sparse"}
    assert samples[1].skipped == [f"member .jpg is {4 << 30} bytes, over the {64 << 20}-byte limit "
                                  "(raise --max-member-bytes if such members are legitimate)"]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


def test_a_member_name_that_is_not_utf8_becomes_a_warning(tmp_path):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name, payload in (("caf\xe9.jpg", b"j"), ("caf\xe9.txt", b"t"), ("000000002.txt", b"ok")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    path = tmp_path / "00000.tar"
    path.write_bytes(data.getvalue())
    samples = list(ShardReader(str(path)))
    assert [s.key for s in samples] == ["caf\\xe9", "000000002"]
    assert samples[0].members == {"jpg": b"j", "txt": b"t"}
    assert samples[0].warnings == ["member name is not valid UTF-8; the key is shown with \\x escapes: caf\\xe9"]
    samples[0].key.encode("utf-8")  # writable to Parquet


# -- a key written twice (issue #26 item 9): every sample its own row, nothing merged ----------------------
def test_an_adjacent_duplicate_key_is_its_own_sample_not_merged(tmp_path):
    first = ("000000001", {"jpg": image_bytes(1), "txt": b"first"})
    again = ("000000001", {"jpg": image_bytes(2), "txt": b"second"})
    path = tmp_path / "00000.tar"
    path.write_bytes(_tar_bytes([sample(0), first, again, sample(3)]))
    reader = ShardReader(str(path))
    samples = list(reader)
    assert [(s.key, s.index) for s in samples] == [("000000000", 0), ("000000001", 1), ("000000001", 2),
                                                   ("000000003", 3)]
    assert samples[1].members == first[1] and samples[1].error is None
    assert samples[2].members == again[1]
    assert samples[2].error == ("duplicate key: sample 1 of this shard has the same key '000000001'; this one is "
                                "read as its own row (not merged into that one) but not marked ok, since its key "
                                "does not identify it: give each sample its own key")
    assert reader.damage == ("1 sample repeats the key of an earlier sample (000000001 at sample 2): each is its "
                             "own row, with status read")


def test_a_key_repeated_later_or_twice_in_a_row_each_time_is_counted(tmp_path):
    a = ("a", {"jpg": b"1", "txt": b"1"})
    path = tmp_path / "00000.tar"
    # a, b, a (not adjacent), then a three times in a row: each starts where an extension repeats
    path.write_bytes(_tar_bytes([a, ("b", {"txt": b"b"}), ("a", {"jpg": b"2", "txt": b"2"}), ("a", {"txt": b"3"}),
                                 ("a", {"txt": b"4", "jpg": b"4"}), ("a", {"jpg": b"5"}), ("c", {"txt": b"c"})]))
    reader = ShardReader(str(path))
    samples = list(reader)
    assert [s.key for s in samples] == ["a", "b", "a", "a", "a", "a", "c"]
    assert [s.members for s in samples] == [{"jpg": b"1", "txt": b"1"}, {"txt": b"b"}, {"jpg": b"2", "txt": b"2"},
                                            {"txt": b"3"}, {"txt": b"4", "jpg": b"4"}, {"jpg": b"5"}, {"txt": b"c"}]
    assert [s.error is not None for s in samples] == [False, False, True, True, True, True, False]
    assert all("sample 0 of this shard has the same key 'a'" in s.error for s in samples[2:6])
    assert reader.damage == ("4 samples repeat the key of an earlier sample (a at sample 2, a at sample 3, "
                             "a at sample 4 and 1 more): each is its own row, with status read")


def test_a_duplicate_cut_by_damage_keeps_both_reasons(tmp_path):
    data = _tar_bytes([sample(0), sample(0), sample(2)])
    path = tmp_path / "00000.tar"
    path.write_bytes(data[: data.rindex(b"000000000.txt") + 600])  # inside the duplicate's caption
    reader = ShardReader(str(path))
    samples = list(reader)
    assert [s.key for s in samples] == ["000000000", "000000000"]
    assert samples[1].error.startswith("duplicate key: sample 0 ")
    assert "; the shard is truncated or corrupt inside this sample" in samples[1].error
    assert reader.damage.startswith("tar damaged after 2 samples: ")
    assert reader.damage.endswith("; 1 sample repeats the key of an earlier sample (000000000 at sample 1): each "
                                  "is its own row, with status read")
