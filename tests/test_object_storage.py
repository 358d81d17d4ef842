"""Caches and corpora in object storage (issue 10, part 2), against a real S3 server (SeaweedFS on
127.0.0.1): the same commands with a URL give what they give on local disk."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from pipeline.io import storage
from pipeline.cache.format import CHECKSUMS, DONE
from pipeline.errors import UserError
from pipeline.io.locks import pid_namespace, writer_lock
from tests.conftest import run_cli, save_with_tokenizer, tiny_llama
from tests.s3_server import ACCESS_KEY, SECRET_KEY
from tests.test_errors import assert_clean_error

CAPTURE = ("--k", 4, "--tail-samples", 2, "--device", "cpu", "--batch-size", 4)
STUDENT = ("--max-steps", 3, "--device", "cpu")


def arrays(where) -> dict[str, np.ndarray]:
    group = storage.open_group(where, mode="r")
    names = [*group.attrs["shard_arrays"], DONE, CHECKSUMS, "tokenizer_json"]
    return {name: group[name][:] for name in names}


def weights(student_dir) -> dict[str, torch.Tensor]:
    return load_file(student_dir / "model.safetensors")


def test_capture_inspect_and_train_from_s3_equal_local(s3, llama_teacher, corpus_dir, tmp_path):
    local, remote = tmp_path / "c.zarr", "s3://test-bucket/equal/c.zarr"
    for out in (local, remote):
        run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out, *CAPTURE)
    want, got = arrays(local), arrays(remote)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    stats = [json.loads(run_cli("inspect", out, "--json").output) for out in (local, remote)]
    assert stats[1]["bytes_on_disk"] == stats[0]["bytes_on_disk"]  # the same objects, byte for byte
    assert stats[1]["shards_complete"] == stats[0]["shards_complete"] == stats[0]["shards_total"]
    assert stats[1]["captured_mass_mean"] == stats[0]["captured_mass_mean"]
    assert "intact" in run_cli("verify", remote, "--no-progress").output

    students = [tmp_path / "s-local", tmp_path / "s-remote"]
    for cache, out in zip((local, remote), students):  # the remote one through a forkserver DataLoader worker
        run_cli("train-student", "--cache", cache, "--out", out, *STUDENT)
    a, b = weights(students[0]), weights(students[1])
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert json.loads((students[1] / "metrics.json").read_text())["cache"] == remote


def test_a_corpus_in_s3_equals_a_local_one_and_feeds_the_capture(s3, text_dir, llama_teacher, tmp_path):
    local_corpus, remote_corpus = tmp_path / "corpus", "s3://test-bucket/corpus"
    for out in (local_corpus, remote_corpus):
        run_cli("prepare-corpus", "--source", text_dir, "--out", out, "--vocab-size", 320, "--seq-len", 16)
    assert storage.read_text(f"{remote_corpus}/tokenizer.json") == (local_corpus / "tokenizer.json").read_text()
    want, got = (storage.open_group(f"{c}/tokens.zarr", mode="r") for c in (local_corpus, remote_corpus))
    assert dict(got.attrs) == dict(want.attrs)
    for split in ("train", "validation"):
        np.testing.assert_array_equal(got[split][:], want[split][:])
    # the source in the bucket too (a directory URL, listed and read through fsspec): the same corpus
    storage.upload(text_dir, "s3://test-bucket/texts")
    from_bucket = tmp_path / "from-bucket"
    run_cli("prepare-corpus", "--source", "s3://test-bucket/texts", "--out", from_bucket, "--vocab-size", 320,
            "--seq-len", 16)
    read = storage.open_group(f"{from_bucket}/tokens.zarr", mode="r")
    assert read.attrs["corpus_fingerprint"] == want.attrs["corpus_fingerprint"]
    assert read.attrs["source"] == "s3://test-bucket/texts"

    teacher = tmp_path / "teacher"  # a tiny teacher with this corpus's tokenizer
    save_with_tokenizer(tiny_llama(want.attrs["vocab_size"], sharpness=30.0), local_corpus, teacher)
    local_cache, remote_cache = tmp_path / "c.zarr", "s3://test-bucket/from-s3-corpus.zarr"
    run_cli("cache-logits", "--teacher", teacher, "--corpus", local_corpus, "--out", local_cache, *CAPTURE)
    run_cli("cache-logits", "--teacher", teacher, "--corpus", remote_corpus, "--out", remote_cache, *CAPTURE)
    want, got = arrays(local_cache), arrays(remote_cache)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # a prepared corpus is replaced only with --overwrite; a rerun of the capture resumes (nothing to do)
    result = run_cli("prepare-corpus", "--source", text_dir, "--out", remote_corpus, expect=2)
    assert_clean_error(result, "exists and is not empty")
    again = run_cli("cache-logits", "--teacher", teacher, "--corpus", remote_corpus, "--out", remote_cache, *CAPTURE)
    assert "is already complete" in again.output


def test_append_to_a_corpus_in_s3_equals_appending_to_a_local_one(s3, text_dir, tmp_path):
    plays = sorted(text_dir.glob("*.txt"))
    source = tmp_path / "texts"
    source.mkdir()
    for play in plays[:6]:
        shutil.copy(play, source / play.name)
    corpora = (tmp_path / "corpus", "s3://test-bucket/appended-corpus")
    for out in corpora:
        run_cli("prepare-corpus", "--source", source, "--out", out, "--vocab-size", 320, "--seq-len", 16)
    shutil.copy(plays[6], source / ("zz-" + plays[6].name))
    for out in corpora:
        assert "1 new units" in run_cli("prepare-corpus", "--source", source, "--out", out, "--vocab-size", 320,
                                        "--seq-len", 16, "--append").output
    want, got = (storage.open_group(f"{c}/tokens.zarr", mode="r") for c in corpora)
    assert dict(got.attrs) == dict(want.attrs) and got.attrs["counts"]["train"]["documents"] + \
        got.attrs["counts"]["validation"]["documents"] == 7
    for name in ("train", "validation", "train_row_digests"):
        np.testing.assert_array_equal(got[name][:], want[name][:], err_msg=name)
    assert storage.read_text(f"{corpora[1]}/units.json") == (corpora[0] / "units.json").read_text()


def test_a_second_writer_on_a_url_is_refused_and_a_dead_ones_lease_is_taken_over(s3, llama_teacher, corpus_dir):
    out = "s3://test-bucket/locked.zarr"
    with writer_lock(out):
        result = run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out, *CAPTURE,
                         expect=2)
        assert_clean_error(result, "is being written by pid", socket.gethostname())
    # released: marked so (kept, with its fencing token, so the next holder's token is larger)
    assert json.loads(storage.read_text("s3://test-bucket/.locked.zarr.lock"))["released"] is True
    # a writer killed with its lease held: a dead pid of this host's pid namespace, so the lease is free at once
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = {"holder": "a killed capture", "host": socket.gethostname(), "pid": int(dead.stdout),
             "pid_namespace": pid_namespace()}
    storage.write_bytes("s3://test-bucket/.locked.zarr.lock", json.dumps(lease).encode())
    run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out, *CAPTURE)


def test_store_errors_are_one_line_and_never_show_the_secret(s3, cache_path, tmp_path):
    result = run_cli("inspect", "s3://no-such-bucket-here/c.zarr", expect=2)
    assert_clean_error(result, "cache not found: s3://no-such-bucket-here/c.zarr")
    result = run_cli("cache-logits", "--teacher", "x", "--corpus", "s3://no-such-bucket-here/corpus", "--out",
                     tmp_path / "c.zarr", expect=2)
    assert_clean_error(result, "corpus directory not found: s3://no-such-bucket-here/corpus")
    result = run_cli("inspect", "s3://test-bucket/c.zarr", "--storage-options", "{not json", expect=2)
    assert "not valid JSON" in result.output and "Traceback" not in result.output

    # a fresh process, as a user would run it: bad credentials, then no server at the endpoint
    copy = "s3://test-bucket/for-errors.zarr"
    storage.upload(cache_path, copy)
    for env, needle in (({"AWS_SECRET_ACCESS_KEY": "wrong-secret-abcdef"}, f"{copy}: access denied"),
                        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "Could not connect to the endpoint URL")):
        run = subprocess.run([sys.executable, "-m", "pipeline", "inspect", copy], capture_output=True, text=True,
                             env={**os.environ, **env}, timeout=120)
        output = run.stdout + run.stderr
        lines = [line for line in output.splitlines() if line.strip()]
        assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], output
        assert SECRET_KEY not in output and "wrong-secret" not in output


def test_nothing_written_holds_a_credential(s3, llama_teacher, corpus_dir, tmp_path, monkeypatch):
    """The cache records where it lives (the URL), never how to get in."""
    monkeypatch.setenv(storage.OPTIONS_ENV, "")
    out = "s3://test-bucket/secrets.zarr"
    options = json.dumps({"key": ACCESS_KEY, "secret": SECRET_KEY})  # credentials given as options, the worst case
    run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out, *CAPTURE,
            "--storage-options", options)
    monkeypatch.setenv(storage.OPTIONS_ENV, "")
    fs, path = storage.filesystem(out)
    everything = b"".join(fs.cat_file(name) for name in fs.find(path))
    assert ACCESS_KEY.encode() not in everything and SECRET_KEY.encode() not in everything
    provenance = zarr.open_group(f"{out}/provenance", mode="r").attrs
    assert provenance["location"] == out


def count_s3_requests(monkeypatch) -> dict[str, int]:
    """Count the requests s3fs sends (every S3 API call goes through S3FileSystem._call_s3), by operation."""
    import s3fs

    counts: dict[str, int] = {}
    send = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        counts[method] = counts.get(method, 0) + 1
        return await send(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    return counts


def test_opening_a_cache_costs_a_constant_number_of_requests_whatever_its_shards(s3, llama_teacher, corpus_dir,
                                                                               tmp_path, monkeypatch):
    """LogitCache.open (every check: format, every array, completeness, every shard object present) of a
    cache of ~250 shards in S3 sends no more requests than of one of 16: one listing per array, no
    request per shard; and a deleted shard object is still found."""
    import s3fs

    from pipeline import LogitCache
    from pipeline.errors import UserError

    opened = {}
    for name, per_shard in (("few", 32), ("many", 2)):
        local = tmp_path / f"{name}.zarr"
        run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", local, *CAPTURE,
                "--sequences-per-chunk", 1, "--sequences-per-shard", per_shard, "--no-progress")
        remote = f"s3://test-bucket/open/{name}.zarr"
        s3fs.S3FileSystem(skip_instance_cache=True).put(f"{local}/", remote.removeprefix("s3://"), recursive=True)
        with monkeypatch.context() as patch:
            counts = count_s3_requests(patch)
            cache = LogitCache.open(remote)
        opened[name] = (cache.spec.n_shards, sum(counts.values()), counts)
    (few_shards, few, _), (many_shards, many, counts) = opened["few"], opened["many"]
    assert many_shards >= 200 and few_shards <= 16, opened
    arrays = len(cache.attrs["shard_arrays"]) + 4  # the data arrays; the flags, checksums, chunk checksums, row digests
    assert many <= few + 2 and many <= 8 * arrays, opened  # not O(shards): ~2 x 250 x 7 requests before
    assert counts.get("list_objects_v2", 0) <= 2 * arrays, counts

    s3fs.S3FileSystem(skip_instance_cache=True).rm("test-bucket/open/many.zarr/topk_ids/c/17/0/0")
    with pytest.raises(UserError, match="shard 17: topk_ids: missing object"):
        LogitCache.open("s3://test-bucket/open/many.zarr")


HOLDER = """
import sys, time
from pipeline.io.locks import check_lease, writer_lock
url = sys.argv[1]
try:
    with writer_lock(url) as lease:
        print("token", lease.token, flush=True)
        for shard in range(40):
            print("sleeping", flush=True)
            time.sleep(1.5)
            check_lease(url, lease.token)  # what every shard commit of a capture does first
            print("wrote", shard, flush=True)
except Exception as error:
    print("stopped:", error, flush=True)
    sys.exit(3)
"""


def test_two_writers_racing_to_take_over_a_dead_lease_one_wins(s3):
    """A dead holder's lease (a dead pid of this host's pid namespace): two launches take it over at the
    same moment; the conditional write lets exactly one in, with the next fencing token."""
    url = "s3://test-bucket/race.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    storage.write_bytes("s3://test-bucket/.race.zarr.lock", json.dumps(
        {"holder": "a killed capture", "host": socket.gethostname(), "pid": int(dead.stdout),
         "pid_namespace": pid_namespace(), "token": 7}).encode())
    code = ("import sys, time\nfrom pipeline.io.locks import writer_lock\n"
            "with writer_lock(sys.argv[1]) as lease:\n    print('won', lease.token, flush=True)\n    time.sleep(4)\n")
    runs = [subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    winners = [output for output in outputs if output.startswith("won")]
    assert len(winners) == 1 and winners[0].split()[1] == "8", outputs
    loser = next(output for output in outputs if not output.startswith("won"))
    assert "took the lock just now" in loser or "is being written by" in loser, loser


def test_a_holder_paused_past_its_lease_stops_at_its_next_check(s3, monkeypatch):
    """A holder stopped (SIGSTOP) between two commits for longer than the lease's expiry, measured in the
    store's clock, is taken over; continued, it fails to renew and its next commit check stops it:
    nothing more written after the takeover."""
    from pipeline.io import locks

    url = "s3://test-bucket/paused.zarr"
    env = {**os.environ, "LOGIT_CACHE_LEASE_RENEW_S": "0.5", "LOGIT_CACHE_LEASE_EXPIRY_S": "3"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=env, bufsize=0)
    fd = holder.stdout.fileno()
    said = b""
    while b"wrote 0\nsleeping\n" not in said:  # unbuffered: nothing it printed is held back in this process
        chunk = os.read(fd, 1)
        assert chunk, said
        said += chunk
    import psutil

    psutil.Process(holder.pid).suspend()  # during its 1.5 s sleep: between two commits
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):  # what it printed before it stopped, on a slow machine too
        while chunk := os.read(fd, 1 << 16):
            said += chunk
    os.set_blocking(fd, True)
    token = int(said.split(b"\n")[0].split()[1])
    try:
        monkeypatch.setattr(locks, "LEASE_EXPIRY_S", 3.0)
        deadline = time.monotonic() + 60
        while True:  # the paused holder's lease expires in the store's clock; then it is taken over
            try:
                taken = locks.writer_lock(url)
                lease = taken.__enter__()
                break
            except UserError:
                assert time.monotonic() < deadline, "the paused holder's lease never expired"
                time.sleep(0.5)
        assert lease.token == token + 1
    finally:
        psutil.Process(holder.pid).resume()
    try:
        rest = holder.communicate(timeout=60)[0].decode()
    finally:
        taken.__exit__(None, None, None)
    assert holder.returncode == 3, rest
    # after the takeover: its next check stops it, and it writes nothing more
    assert "lost its lease" in rest and not any(line.startswith("wrote") for line in rest.splitlines()), rest


def test_a_live_lease_is_not_taken_over_when_this_machines_clock_runs_ahead(s3, monkeypatch):
    """A lease's age is measured in the store's clock: with this machine's clock a minute ahead (and a
    10 s expiry), a holder renewing its lease is still alive and a second writer is refused."""
    import datetime

    from pipeline.io import locks

    url = "s3://test-bucket/skewed.zarr"
    env = {**os.environ, "LOGIT_CACHE_LEASE_RENEW_S": "0.5"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().startswith("token")

        class Ahead(datetime.datetime):
            @classmethod
            def now(cls, tz=None):
                return super().now(tz) + datetime.timedelta(seconds=60)

        monkeypatch.setattr(locks, "LEASE_EXPIRY_S", 10.0)
        monkeypatch.setattr(datetime, "datetime", Ahead)
        time.sleep(1.0)
        with pytest.raises(UserError, match="is being written by pid"):
            with locks.writer_lock(url):
                pass
    finally:
        holder.kill()
        holder.communicate(timeout=60)


def test_every_renewal_changes_the_lease_so_a_taker_that_read_it_before_loses(s3, monkeypatch):
    """Each renewal writes another record (its renewal count), so the lock's version (its ETag) changes:
    a second writer that read the lease before a renewal, judged it dead and then tries to take it over
    fails its If-Match. One that read it after the renewal takes it with the next token; the holder's
    next renewal and check then find it lost, and its exit leaves the taker's record as it is."""
    from pipeline.io import locks

    url, lock = "s3://test-bucket/renewed.zarr", "s3://test-bucket/.renewed.zarr.lock"
    monkeypatch.setattr(locks, "LEASE_RENEW_S", 3600.0)  # no renewals but the ones this test makes
    with locks.writer_lock(url) as lease:
        stale = storage.read_versioned(lock)  # a second writer's read, before the holder renews
        seen = [stale[:2]]
        for _ in range(2):
            assert locks.renew_lease(lease)
            content, version, _ = storage.read_versioned(lock)
            assert version == lease.version
            seen.append((content, version))
        assert len({content for content, _ in seen}) == 3 and len({version for _, version in seen}) == 3
        assert json.loads(seen[-1][0])["renewals"] == 2 and json.loads(seen[-1][0])["token"] == lease.token

        monkeypatch.setattr(locks, "LEASE_EXPIRY_S", -1.0)  # the second writer judges every lease expired
        with pytest.raises(UserError, match="took the lock just now"):
            locks.take_lease(url, lock, stale)
        locks.check_lease(url, lease.token)  # the stale takeover wrote nothing: still the holder's

        taken = locks.take_lease(url, lock, storage.read_versioned(lock))  # a read after the renewals
        assert taken.token == lease.token + 1  # fencing tokens grow across holders
        assert not locks.renew_lease(lease) and lease.lost.is_set()
        with pytest.raises(UserError, match="lost its lease"):
            locks.check_lease(url, lease.token)
    record = json.loads(storage.read_versioned(lock)[0])
    assert record["token"] == taken.token and not record["released"]


def calls_to_s3(monkeypatch) -> list[tuple[str, dict]]:
    """Every request s3fs sends, as (operation, its parameters), in order."""
    import s3fs

    calls: list[tuple[str, dict]] = []
    send = s3fs.S3FileSystem._call_s3

    async def recorded(self, method, *args, **kwargs):
        calls.append((method, kwargs))
        return await send(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", recorded)
    return calls


def test_taking_a_lease_first_checks_the_store_enforces_conditional_writes(s3, monkeypatch):
    """SeaweedFS refuses a write with an If-Match that does not hold (412), on an object that exists and on
    one that does not; taking a lease checks it on an object that exists, as a renewal or a takeover
    meets it: a probe object of its own beside the lock (never the lock or the data) is written, written
    again with a wrong If-Match (refused), and removed."""
    existing = "s3://test-bucket/conditional/object"
    storage.write_bytes(existing, b"first")
    assert storage.write_if(existing, b"second", storage.NO_SUCH_VERSION) is None
    assert storage.write_if(existing, b"second", None) is None  # If-None-Match on an object that exists
    assert storage.read_text(existing) == "first"

    url, probe = "s3://test-bucket/probed.zarr", "s3://test-bucket/.probed.zarr.lock.probe"
    assert storage.enforces_conditional_writes(probe) is True
    with monkeypatch.context() as patch:
        calls = calls_to_s3(patch)
        with writer_lock(url):
            pass
    key = ".probed.zarr.lock.probe"
    on_probe = [(method, kwargs.get("IfMatch")) for method, kwargs in calls if kwargs.get("Key") == key]
    assert on_probe == [("put_object", None), ("put_object", storage.NO_SUCH_VERSION), ("delete_object", None)], calls
    assert not any(kwargs.get("IfMatch") == storage.NO_SUCH_VERSION for _, kwargs in calls
                   if kwargs.get("Key") != key)  # the lock and the data are never probed
    assert not storage.exists(probe)

def test_a_store_that_ignores_conditional_writes_is_refused_in_one_line(s3, llama_teacher, corpus_dir, monkeypatch):
    """A store that writes whatever If-Match / If-None-Match say would let two writers both take the lease:
    the capture is refused at the start, in one line, before the lock or the cache is written, and the
    probe is removed. (SeaweedFS enforces them: the store that ignores them is played by a client that
    leaves them out of its requests, which is what such a store does with them.)"""
    import s3fs

    send = s3fs.S3FileSystem._call_s3

    async def unconditional(self, method, *args, **kwargs):
        if method == "put_object":
            kwargs.pop("IfMatch", None)
            kwargs.pop("IfNoneMatch", None)
        return await send(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", unconditional)
    out = "s3://test-bucket/unfenced.zarr"
    result = run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out, *CAPTURE,
                     expect=2)
    assert_clean_error(result, f"{out}: this store does not enforce conditional writes", "local disk")
    said = [line for line in result.output.splitlines() if line.strip() and not line.startswith("settings: ")]
    assert len(said) == 1, result.output  # the refusal is one line (beside the settings line every command says)
    for left in (".unfenced.zarr.lock.probe", ".unfenced.zarr.lock", "unfenced.zarr"):
        assert not storage.exists(f"s3://test-bucket/{left}"), left


OURS = "pid:[4026531836] boot 0e0d"
CONTAINER = "pid:[4026532200] boot 0e0d"  # another pid namespace of the same kernel
NAMESAKE = "pid:[4026531836] boot 7a7a"  # the first pid namespace of another machine (the same number)


@pytest.mark.parametrize("record, comparable", [
    ({"host": "node-1", "pid": 42, "pid_namespace": OURS}, True),  # a process of ours
    ({"host": "node-1", "pid": 42, "pid_namespace": CONTAINER}, False),  # a container with our hostname
    ({"host": "node-1", "pid": 42, "pid_namespace": NAMESAKE}, False),  # another machine with our hostname
    ({"host": "node-2", "pid": 42, "pid_namespace": OURS}, False),  # another host
    ({"host": "node-1", "pid": 42}, False),  # a record of an older version: no namespace
    ({"host": "node-1", "pid": 42, "pid_namespace": None}, False),  # written without /proc
    ({"host": "node-1", "pid": "42", "pid_namespace": OURS}, False),  # not a pid
])
def test_a_holders_pid_is_judged_only_from_its_own_pid_namespace(record, comparable):
    from pipeline.io.locks import pid_in_our_namespace

    assert pid_in_our_namespace(record, "node-1", OURS) is comparable
    assert pid_in_our_namespace(record, "node-1", None) is False  # no /proc here: never


def test_a_lease_from_another_pid_namespace_is_not_taken_over_by_its_pid(s3):
    """Containers that share a hostname do not share pids: a lease whose pid is no process here, written
    in another pid namespace, stays its holder's until it expires in the store's clock; the same record
    written in this pid namespace is a dead holder's, taken over at once with the next token."""
    from pipeline.io.locks import writer_holding

    here = pid_namespace()
    if here is None:
        pytest.skip("no /proc/self/ns/pid here")
    url, lock = "s3://test-bucket/container.zarr", "s3://test-bucket/.container.zarr.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"holder": "a capture in another container", "host": socket.gethostname(), "pid": int(dead.stdout),
              "pid_namespace": "pid:[1]" + here[here.index(" boot"):], "token": 3}
    storage.write_bytes(lock, json.dumps(record).encode())
    assert writer_holding(url) == "a capture in another container"
    with pytest.raises(UserError, match="is being written by a capture in another container"):
        with writer_lock(url):
            pass
    storage.write_bytes(lock, json.dumps({**record, "pid_namespace": here}).encode())
    assert writer_holding(url) is None
    with writer_lock(url) as lease:
        assert lease.token == 4


def test_a_url_with_credentials_keeps_the_store_error_reason_without_the_secret(s3, tmp_path):
    """`s3://user:password@bucket/...`: the store's reason is kept (not cut after its first line), the
    password never printed, in every command that takes the URL."""
    url = "s3://someone:hunter2-secret@test-bucket/c.zarr"
    for args in (("inspect", url), ("verify", url, "--no-progress"),
                 ("train-student", "--cache", url, "--out", tmp_path / "s")):
        result = run_cli(*args, expect=2)
        assert_clean_error(result)
        line = result.output.strip().splitlines()[-1]
        assert "hunter2" not in result.output, result.output
        reason = line.split("Parameter validation failed:", 1)[-1].strip()
        assert len(reason) > 10, line  # the reason itself, not an empty tail


def test_repair_then_capture_restores_a_shard_damaged_at_its_end_in_s3(s3, cache_path, llama_teacher, corpus_dir):
    """The local repair test, in the object store: a shard object whose end (its index) is damaged."""
    from pipeline.cache.integrity import shard_key
    from tests.test_integrity import FIXTURE_CFG
    from stages import cache_logits

    url = "s3://test-bucket/repair.zarr"
    storage.upload(cache_path, url)
    fs, root = storage.filesystem(url)
    key = f"{root}/{shard_key(zarr.open_group(cache_path, mode='r')['topk_logprobs'], 2)}"
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    assert "shard 2: topk_logprobs: checksum mismatch" in run_cli("verify", url, "--no-progress", expect=1).output
    run_cli("verify", url, "--repair", "--no-progress", expect=1)
    cache_logits.main(str(llama_teacher), corpus_dir, url, FIXTURE_CFG, progress=False)
    assert "intact" in run_cli("verify", url, "--no-progress").output
    repaired, original = arrays(url), arrays(cache_path)
    for name in original:
        np.testing.assert_array_equal(repaired[name], original[name], err_msg=name)
