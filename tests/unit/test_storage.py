"""Storage helpers and stage bookkeeping on URI roots. ``file://`` URIs go through pyarrow's
filesystem layer (the code path of s3:// and gs://), so these run the real thing, no Ray."""

from __future__ import annotations

import json

import pytest

from icm import storage
from icm.config import ConfigError, load_config
from icm.stages import STAGE_FILE, pull_local, pull_stages, push_local, stage
from jobs.common import ensure_writable_root


def _config(tmp_path, mirror="mirror"):
    return load_config("smoke", [f"storage.root=file://{tmp_path}/remote",
                                 f"storage.local_mirror={tmp_path / mirror}"])


def test_bytes_json_list_delete_on_a_uri(tmp_path):
    root = f"file://{tmp_path}/r"
    assert storage.read_bytes(storage.join(root, "a.bin")) is None and not storage.exists(root)
    storage.write_bytes(storage.join(root, "a.bin"), b"abc")
    storage.write_json(storage.join(root, "d", "e.json"), {"x": 1})
    assert (tmp_path / "r" / "a.bin").read_bytes() == b"abc"
    assert storage.read_json(storage.join(root, "d", "e.json")) == {"x": 1}
    assert storage.list_files(root) == {"a.bin": 3, "d/e.json": len(json.dumps({"x": 1}, indent=2)) + 1}
    storage.delete(storage.join(root, "d"))
    storage.delete(storage.join(root, "missing"))  # no error
    assert list(storage.list_files(root)) == ["a.bin"]
    assert not list(tmp_path.glob("r/.*"))  # no temporaries left beside the files


def test_join_keeps_uri_options_at_the_end():
    assert storage.join("s3://b/run?region=eu-west-1", "zoo", "x.json") == "s3://b/run/zoo/x.json?region=eu-west-1"
    assert storage.join("/data/run", "zoo") == "/data/run/zoo"


def test_push_and_pull_round_trip_with_the_marker_last(tmp_path):
    local = tmp_path / "local"
    for name, data in {"stage.json": "{}", "a/b.txt": "b", "c.txt": "c", ".hidden.tmp": "x",
                       "ray/ckpt.bin": "big"}.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_text(data)
    uri = f"file://{tmp_path}/remote/stage"
    assert storage.push_dir(local, uri, skip=("ray",), last=(STAGE_FILE,)) == 3
    assert set(storage.list_files(uri)) == {"stage.json", "a/b.txt", "c.txt"}
    assert storage._ordered(["stage.json", "z.txt", "a/stage.json", "b"], (), ("stage.json",))[-2:] == \
        ["a/stage.json", "stage.json"]
    back = tmp_path / "back"
    assert storage.pull_dir(uri, back) == 3
    assert (back / "a" / "b.txt").read_text() == "b" and (back / "stage.json").read_text() == "{}"
    (back / "c.txt").write_text("C")  # same size: kept when asked to keep write-once files
    assert storage.pull_dir(uri, back, keep_same_size=True) == 0 and (back / "c.txt").read_text() == "C"


def test_an_interrupted_push_leaves_the_remote_stage_not_current(tmp_path):
    cfg = _config(tmp_path)
    current = stage(cfg, "zoo", 1, sections=("model",))
    current.begin(cfg)
    (current.directory / "tasks").mkdir()
    (current.directory / "tasks" / "weights.bin").write_bytes(b"w" * 100)
    # The upload of tasks/ fails: on the remote, a file sits where that folder must go.
    (tmp_path / "remote" / "zoo").mkdir(parents=True)
    (tmp_path / "remote" / "zoo" / "tasks").write_text("in the way")
    with pytest.raises(OSError):
        current.finish(current.begin(cfg), {})
    assert (current.directory / STAGE_FILE).is_file()  # the mirror finished ...
    assert not (tmp_path / "remote" / "zoo" / STAGE_FILE).exists()  # ... the URI never got the marker
    assert not current.is_current()
    (tmp_path / "remote" / "zoo" / "tasks").unlink()
    current.finish(current.begin(cfg), {"n": 1})
    assert current.is_current() and current.record()["outputs"] == {"n": 1}


def test_a_fresh_mirror_pulls_a_finished_stage_and_begin_retracts_the_marker(tmp_path):
    cfg = _config(tmp_path, "mirror-a")
    current = stage(cfg, "zoo", 1, sections=("model",))
    started = current.begin(cfg)
    (current.directory / "manifest.parquet").write_bytes(b"m")
    current.finish(started, {})
    fresh = _config(tmp_path, "mirror-b")
    again = stage(fresh, "zoo", 1, sections=("model",))  # pulls the URI's copy
    assert again.is_current() and (tmp_path / "mirror-b" / "zoo" / "manifest.parquet").read_bytes() == b"m"
    other = stage(fresh, "zoo", 2, sections=("model",))
    assert not other.is_current()
    other.begin(fresh)  # a rerun with another fingerprint: the old marker goes first
    assert not (tmp_path / "remote" / "zoo" / STAGE_FILE).exists()
    assert not (tmp_path / "mirror-b" / "zoo" / STAGE_FILE).exists()


def test_a_stale_mirror_is_replaced_and_a_current_one_left_alone(tmp_path):
    cfg = _config(tmp_path)
    current = stage(cfg, "task_vectors", 1, sections=())
    current.finish(current.begin(cfg), {})
    leftover = current.directory / "vectors" / "shard-00009"  # the mirror only: not the URI's
    leftover.mkdir(parents=True)
    pull_stages(cfg, "task_vectors")
    assert leftover.is_dir()  # same stage.json on both sides: nothing moves
    (current.directory / STAGE_FILE).write_text('{"fingerprint": "old"}')
    pull_stages(cfg, "task_vectors")
    assert not leftover.exists()  # replaced by the URI's copy
    assert json.loads((current.directory / STAGE_FILE).read_text())["fingerprint"] == current.fingerprint


def test_worker_outputs_move_with_push_local_and_pull_local(tmp_path):
    writer, reader = _config(tmp_path, "node-1"), _config(tmp_path, "node-2")
    snapshot = writer.storage.path("zoo", "tasks", "cats", "snapshots", "step-000004")
    snapshot.mkdir(parents=True)
    (snapshot / "vector.safetensors").write_bytes(b"v")
    (snapshot / "snapshot.json").write_text("{}")
    push_local(writer, snapshot, last=("snapshot.json",))
    assert (tmp_path / "remote" / "zoo" / "tasks" / "cats" / "snapshots" / "step-000004" / "snapshot.json").is_file()
    pull_local(reader, reader.storage.path("zoo", "tasks", "cats"))
    assert (reader.storage.path("zoo", "tasks", "cats", "snapshots", "step-000004", "vector.safetensors")
            .read_bytes() == b"v")
    layout = writer.storage.path("zoo", "lora_layout.json")
    layout.write_text("{}")
    push_local(writer, layout)
    pull_local(reader, reader.storage.path("zoo", "lora_layout.json"))
    assert reader.storage.path("zoo", "lora_layout.json").read_text() == "{}"


def test_a_retrained_generator_of_the_same_size_replaces_the_drivers_old_copy(tmp_path):
    """Multi-node URI root: the driver's mirror holds run 1's generator, a task on another node
    pushes run 2's (same architecture: the same file size). The driver's pull must take run 2's,
    or Stage.finish pushes the old weights back over the new ones (as it did)."""
    driver, task = _config(tmp_path, "driver"), _config(tmp_path, "task-node")
    current = stage(driver, "generator", "run-2", sections=("model",))
    started = current.begin(driver)
    (current.directory / "generator.safetensors").write_bytes(b"A" * 8)  # run 1's weights
    written = task.storage.path("generator")
    written.mkdir(parents=True, exist_ok=True)
    (written / "generator.safetensors").write_bytes(b"B" * 8)  # run 2's, on the other node
    push_local(task, written)
    pull_local(driver, current.directory)  # what jobs/generator.py does
    current.finish(started, {})
    assert (tmp_path / "remote" / "generator" / "generator.safetensors").read_bytes() == b"B" * 8
    assert (current.directory / "generator.safetensors").read_bytes() == b"B" * 8
    (current.directory / "task.json").write_text('{"fingerprint": "old"}')  # one rewritten file
    storage.write_json(storage.join(driver.storage.uri("generator"), "task.json"), {"fingerprint": "new"})
    pull_local(driver, current.directory / "task.json")
    assert json.loads((current.directory / "task.json").read_text()) == {"fingerprint": "new"}
    (current.directory / "snapshot.bin").write_bytes(b"C" * 8)
    storage.write_bytes(storage.join(driver.storage.uri("generator"), "snapshot.bin"), b"D" * 8)
    pull_local(driver, current.directory, write_once=True)  # same size: not fetched again
    assert (current.directory / "snapshot.bin").read_bytes() == b"C" * 8


def test_config_takes_uris_with_a_mirror_and_keeps_local_roots_local(tmp_path, monkeypatch):
    monkeypatch.setenv("ICM_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config("smoke", ["storage.root=s3://bucket/runs/a/"])
    assert cfg.storage.is_remote and cfg.storage.root == "s3://bucket/runs/a"
    assert cfg.storage.uri("zoo", "ray") == "s3://bucket/runs/a/zoo/ray"
    assert cfg.storage.path("zoo").parent.parent == tmp_path / "cache" / "storage-mirrors"
    assert load_config("smoke", ["storage.root=s3://bucket/runs/a"]).storage == cfg.storage  # same mirror
    local = load_config("smoke", [f"storage.root={tmp_path}/run"]).storage
    assert not local.is_remote and local.uri("zoo") == str(tmp_path / "run" / "zoo") == str(local.path("zoo"))
    with pytest.raises(ConfigError, match=r"'storage.root'.*not a storage URI"):
        load_config("smoke", ["storage.root=s3://"])
    with pytest.raises(ConfigError, match="local_mirror is only used with a URI"):
        load_config("smoke", [f"storage.root={tmp_path}", f"storage.local_mirror={tmp_path}"])


def test_an_unknown_or_unwritable_uri_fails_before_any_work_naming_storage_root(tmp_path):
    unknown = load_config("smoke", ["storage.root=nosuchfs://bucket/run"])
    with pytest.raises(storage.StorageError, match=r"storage.root 'nosuchfs://bucket/run'.*Fix:"):
        ensure_writable_root(unknown)
    (tmp_path / "a-file").write_text("")
    blocked = load_config("smoke", [f"storage.root=file://{tmp_path}/a-file/run",
                                    f"storage.local_mirror={tmp_path}/m"])
    with pytest.raises(storage.StorageError, match=r"storage.root .* is not writable.*Fix:"):
        ensure_writable_root(blocked)
    assert ensure_writable_root(_config(tmp_path)) == tmp_path / "mirror"
