
import pytest
from shardkit import sample, write_shard

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
