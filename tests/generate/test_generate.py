"""`cxrmax generate` over real HTTP on loopback: the test server (FastAPI + uvicorn) runs the tiny
Qwen2-VL built in code, with fault injection; the selection comes from a mini MIMIC-CXR."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cxrmax.cli import app
from cxrmax.core.errors import CxrmaxError, InputError
from cxrmax.core.schemas import TRAJECTORY_SCHEMA
from cxrmax.generate import read_trajectories
from cxrmax.generate.backends import Sampling, make_backend
from cxrmax.generate.orchestrator import GenerateOptions, GenerationAborted, generate
from cxrmax.generate.prompts import load_prompt, prompt_hash
from cxrmax.generate.responses import BackendError
from cxrmax.generate.roster import resolve_model
from cxrmax.generate.status import generation_status
from cxrmax.generate.store import read_shard

pytest.importorskip("fastapi")
pytest.importorskip("torch")

MODEL = "tiny-vlm"


@pytest.fixture(scope="session")
def selection_path(mini_mimic, tmp_path_factory):
    from cxrmax.mimic import MimicCXR, write_selection

    table = MimicCXR(mini_mimic).select()
    return write_selection(table, tmp_path_factory.mktemp("selection") / "selection.parquet")


@pytest.fixture(scope="session")
def small_selection(selection_path, tmp_path_factory):
    """The first 10 rows of the selection (most tests need only a few requests)."""
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("selection-small") / "small.parquet"
    pq.write_table(pq.read_table(selection_path).slice(0, 10), path)
    return path


@pytest.fixture(scope="session")
def vlm_engine(tiny_vlm_path):
    from cxrmax.generate.backends import TransformersEngine

    return TransformersEngine(tiny_vlm_path, device="cpu")


@pytest.fixture(scope="session")
def _servers(vlm_engine):
    from cxrmax.testing import serve_in_thread

    first = serve_in_thread(engine=vlm_engine, served_model_name=MODEL)
    second = serve_in_thread(engine=vlm_engine, served_model_name=MODEL)
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture
def server(_servers):
    """The tiny-VLM server with no faults and fresh counters."""
    first, second = _servers
    for handle in (first, second):
        handle.set_faults()
        handle.reset_stats()
    return first


@pytest.fixture
def second_server(_servers, server):
    return _servers[1]


def _options(selection, mimic_root, out, base_urls, **overrides) -> GenerateOptions:
    settings = dict(
        model=resolve_model(MODEL),
        selection=Path(selection),
        mimic_root=Path(mimic_root),
        out=Path(out),
        prompt=load_prompt("rationale"),
        base_urls=list(base_urls),
        max_tokens=4,
        concurrency=4,
        backoff_base=0.01,
        backoff_max=0.05,
        timeout=30.0,
    )
    settings.update(overrides)
    return GenerateOptions(**settings)


def _keys(out) -> list[str]:
    return read_trajectories(out, columns=["request_key"])["request_key"].to_pylist()


@pytest.mark.slow
def test_full_run_over_mini_mimic_then_rerun_does_nothing(server, selection_path, mini_mimic, tmp_path):
    options = _options(selection_path, mini_mimic, tmp_path, [server.base_url], samples=2)
    stats = generate(options)
    selection = pq.read_table(selection_path)
    n_rows = selection.num_rows
    assert stats.done == 2 * n_rows and stats.failed == 0
    assert server.stats["completed"] == 2 * n_rows

    table = read_trajectories(tmp_path, model=MODEL)
    assert table.schema == TRAJECTORY_SCHEMA
    assert table.num_rows == 2 * n_rows
    assert pc.count_distinct(table["request_key"]).as_py() == 2 * n_rows
    assert sorted(set(table["sample_id"].to_pylist())) == sorted(selection["sample_id"].to_pylist())
    assert sorted(table["sample_index"].to_pylist()) == sorted([0, 1] * n_rows)
    row = table.filter(pc.equal(table["sample_index"], 0)).slice(0, 1).to_pylist()[0]
    source = selection.filter(pc.equal(selection["sample_id"], row["sample_id"])).to_pylist()[0]
    assert row["labels"] == source["labels"] and row["image_path"] == source["image_path"]
    assert row["prompt_id"] == "rationale-v1" and row["prompt_hash"] == prompt_hash(row["prompt"])
    assert row["model"] == MODEL and row["served_model"] == MODEL and row["backend"] == "openai"
    assert row["endpoint"] == server.base_url and row["image_max_edge"] == 1024
    assert row["completion_tokens"] and row["prompt_tokens"] > 20  # the image tokens are in the prompt
    assert row["finish_reason"] in ("stop", "length") and row["attempts"] == 1
    positives = [k for k, v in source["labels"].items() if v == 1.0]
    assert all(name in row["prompt"] for name in positives)

    # Readable by `datasets` too.
    from datasets import Dataset

    shard = sorted((tmp_path / "trajectories" / MODEL).glob("part-*.arrow"))[0]
    assert Dataset.from_file(str(shard)).num_rows == read_shard(shard).num_rows

    server.reset_stats()
    again = generate(options)
    assert again.done == 0 and again.already_done == 2 * n_rows
    assert server.stats["requests"] == 0
    [status] = generation_status(tmp_path)
    assert (status.planned, status.distinct_keys, status.missing, status.duplicates) == (
        2 * n_rows,
        2 * n_rows,
        0,
        0,
    )

    # Other sampling settings are other requests: nothing is mixed with the old answers.
    more = generate(
        _options(selection_path, mini_mimic, tmp_path, [server.base_url], samples=2, max_tokens=5)
    )
    assert more.done == 2 * n_rows


def test_retries_recover_from_injected_429_500_and_malformed(server, small_selection, mini_mimic, tmp_path):
    server.set_faults(script=[429, 500, 503, "malformed", 429, 502])
    stats = generate(_options(small_selection, mini_mimic, tmp_path, [server.base_url], concurrency=2))
    assert stats.done == 10 and stats.failed == 0
    assert stats.retries == 6
    assert stats.errors == {"rate_limit": 2, "server": 3, "malformed": 1}
    table = read_trajectories(tmp_path)
    assert sum(a - 1 for a in table["attempts"].to_pylist()) == 6
    assert pc.count_distinct(table["request_key"]).as_py() == 10


def test_hang_is_cut_by_the_timeout_and_retried(server, small_selection, mini_mimic, tmp_path):
    server.set_faults(script=["hang"], hang_s=30)
    stats = generate(_options(small_selection, mini_mimic, tmp_path, [server.base_url], timeout=1.0))
    assert stats.done == 10 and stats.errors == {"timeout": 1}


def test_client_errors_are_recorded_without_retry_and_retried_on_request(
    server, small_selection, mini_mimic, tmp_path
):
    server.set_faults(script=["ok", 400, "ok", 400])
    options = _options(small_selection, mini_mimic, tmp_path, [server.base_url], concurrency=1)
    stats = generate(options)
    assert (stats.done, stats.failed, stats.retries) == (8, 2, 0)
    [status] = generation_status(tmp_path)
    assert status.failed_by_kind == {"client": 2} and status.missing == 0 and status.failed_of_planned == 2

    server.reset_stats()
    rerun = generate(options)  # permanent failures are not retried by a plain rerun
    assert (rerun.done, rerun.skipped_failed, server.stats["requests"]) == (0, 2, 0)
    retried = generate(_options(small_selection, mini_mimic, tmp_path, [server.base_url], retry_failed=True))
    assert retried.done == 2
    [status] = generation_status(tmp_path)
    assert status.failed == 0 and status.distinct_keys == 10 and status.rows == 10


def test_truncated_answers_are_recorded_and_redone_with_retry_length(
    server, small_selection, mini_mimic, tmp_path
):
    server.set_faults(truncate=True)
    options = _options(small_selection, mini_mimic, tmp_path, [server.base_url])
    assert generate(options).length == 10
    server.set_faults()
    assert generate(options).done == 0  # length answers are kept unless asked
    redo = generate(_options(small_selection, mini_mimic, tmp_path, [server.base_url], retry_length=True))
    assert redo.done == 10
    table = read_trajectories(tmp_path)
    assert table.num_rows == 10 and pc.count_distinct(table["request_key"]).as_py() == 10


def test_two_base_urls_both_receive_requests(server, second_server, small_selection, mini_mimic, tmp_path):
    stats = generate(
        _options(small_selection, mini_mimic, tmp_path, [server.base_url, second_server.base_url], samples=2)
    )
    assert stats.done == 20
    assert server.stats["completed"] > 0 and second_server.stats["completed"] > 0
    assert server.stats["completed"] + second_server.stats["completed"] == 20
    endpoints = set(read_trajectories(tmp_path)["endpoint"].to_pylist())
    assert endpoints == {server.base_url, second_server.base_url}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_dead_server_and_wrong_model_fail_fast_with_clear_messages(
    server, small_selection, mini_mimic, tmp_path
):
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    start = time.monotonic()
    with pytest.raises(CxrmaxError, match=r"cannot reach the model server at .*vllm serve"):
        generate(_options(small_selection, mini_mimic, tmp_path, [dead]))
    with pytest.raises(CxrmaxError, match=r"does not serve model 'qwen-nope'; it serves 'tiny-vlm'"):
        generate(
            _options(
                small_selection, mini_mimic, tmp_path, [server.base_url], model=resolve_model("qwen-nope")
            )
        )
    assert time.monotonic() - start < 30  # no retry loop with backoff
    assert server.stats["requests"] == 0


def test_first_requests_failing_the_same_way_abort_the_run(server, small_selection, mini_mimic, tmp_path):
    wrong_root = tmp_path / "not-mimic"
    wrong_root.mkdir()
    # A wrong root is found before the first request (issue 16), naming the selection row and the root.
    with pytest.raises(InputError, match=r"row 1 field 'image_path'.*not found.*--mimic-root"):
        generate(_options(small_selection, wrong_root, tmp_path, [server.base_url]))
    with pytest.raises(InputError, match=r"--mimic-root .*: no such folder"):
        generate(_options(small_selection, tmp_path / "absent", tmp_path, [server.base_url]))
    # Nothing was recorded as failed, so the fixed command does everything.
    [status] = generation_status(tmp_path)
    assert status.failed == 0 and status.distinct_keys == 0
    server.set_faults(script=[400] * 10)
    with pytest.raises(GenerationAborted, match=r"client 400"):
        generate(_options(small_selection, mini_mimic, tmp_path, [server.base_url]))


def test_shards_partition_the_work_without_overlap(server, selection_path, mini_mimic, tmp_path):
    first = generate(_options(selection_path, mini_mimic, tmp_path, [server.base_url], shard=(0, 2)))
    second = generate(_options(selection_path, mini_mimic, tmp_path, [server.base_url], shard=(1, 2)))
    n_rows = pq.read_table(selection_path).num_rows
    assert first.done > 0 and second.done > 0 and first.done + second.done == n_rows
    keys = _keys(tmp_path)
    assert len(keys) == len(set(keys)) == n_rows
    folder = tmp_path / "trajectories" / MODEL
    assert {p.name.split("-")[1] for p in folder.glob("part-*.arrow")} == {"0of2", "1of2"}
    # The unsharded run over the same output finds everything done.
    assert generate(_options(selection_path, mini_mimic, tmp_path, [server.base_url])).already_done == n_rows
    [status] = generation_status(tmp_path)
    assert status.missing == 0 and status.duplicates == 0


def test_transformers_backend_in_process(tiny_vlm_path, small_selection, mini_mimic, tmp_path):
    options = _options(
        small_selection,
        mini_mimic,
        tmp_path,
        [],
        backend="transformers",
        model=resolve_model(str(tiny_vlm_path)),
    )
    options.model_path = str(tiny_vlm_path)
    stats = generate(options)
    assert stats.done == 10
    table = read_trajectories(tmp_path)
    assert set(table["backend"].to_pylist()) == {"transformers"}
    assert all(t is not None for t in table["text"].to_pylist())


def test_make_backend_from_python(server, mini_mimic):
    import asyncio

    from cxrmax.mimic.images import ImageCache

    image = next(Path(mini_mimic).glob("files/*/*/*/*.jpg"))

    async def ask():
        backend = make_backend("openai", MODEL, base_urls=[server.base_url])
        await backend.start()
        try:
            jpeg = ImageCache(Path(mini_mimic).parent / "cache-py").jpeg(image)
            return await backend.complete("Describe the film.", jpeg, Sampling(0.7, 0.9, 4, seed=1))
        finally:
            await backend.close()

    completion = asyncio.run(ask())
    assert completion.finish_reason in ("stop", "length") and completion.completion_tokens >= 1

    async def vllm_missing():
        await make_backend("vllm", "Qwen/Qwen2-VL-7B-Instruct").start()

    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(CxrmaxError, match="vllm serve"):
            asyncio.run(vllm_missing())
    with pytest.raises(BackendError):
        from cxrmax.generate.responses import parse_chat_response

        class _Response:
            status_code = 200
            content = b"not json"
            headers: dict = {}

        parse_chat_response(_Response(), "x")


# ----------------------------------------------------------------------------------- CLI
def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_cli_generate_status_and_governance(server, small_selection, mini_mimic, tmp_path):
    out = tmp_path / "out"
    common = ["--selection", str(small_selection), "--mimic-root", str(mini_mimic), "--out", str(out)]
    refused = _cli("generate", "--model", MODEL, *common, "--base-url", "https://api.openai.com/v1")
    assert refused.exit_code == 2
    assert "data use agreement" in refused.output and "--allow-external-endpoint" in refused.output
    assert not out.exists()

    result = _cli(
        "generate", "--model", MODEL, *common, "--base-url", server.base_url, "--max-tokens", "4", "--quiet"
    )
    assert result.exit_code == 0, result.output
    assert "answered now" in result.output
    status = _cli("generate", "status", str(out), "--json", "-")
    assert status.exit_code == 0
    assert '"missing": 0' in status.output and '"distinct_keys": 10' in status.output

    listing = _cli("models", "list", "--json", "-")
    assert listing.exit_code == 0 and "Qwen/Qwen2-VL-7B-Instruct" in listing.output
    serve = _cli("models", "serve-command", "qwen2-vl")
    assert serve.exit_code == 0 and serve.output.startswith("vllm serve Qwen/Qwen2-VL-7B-Instruct")
    assert _cli("models", "serve-command", "nope").exit_code == 2
    assert _cli("generate", "--model", MODEL).exit_code == 2  # missing options


@pytest.mark.slow
def test_kill_minus_9_then_rerun_loses_nothing_and_duplicates_nothing(
    server, selection_path, mini_mimic, tmp_path
):
    server.set_faults(delay_s=0.05)
    out = tmp_path / "out"
    folder = out / "trajectories" / MODEL
    command = [
        sys.executable, "-m", "cxrmax", "generate", "--model", MODEL, "--selection", str(selection_path),
        "--mimic-root", str(mini_mimic), "--out", str(out), "--base-url", server.base_url, "--samples", "2",
        "--max-tokens", "4", "--concurrency", "4", "--rows-per-shard", "7", "--quiet",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        committed = sum(read_shard(p).num_rows for p in folder.glob("part-*.arrow")) if folder.exists() else 0
        if committed >= 14 and list(folder.glob("wal-*.jsonl")):
            break
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    # Every committed shard is complete and readable; answers received so far are in shards or the journal.
    answered_before = {}
    for shard in folder.glob("part-*.arrow"):
        for row in read_shard(shard, ["request_key", "text"]).to_pylist():
            answered_before[row["request_key"]] = row["text"]
    for journal in folder.glob("wal-*.jsonl"):
        import json

        for line in journal.read_text().splitlines(keepends=True):
            if line.endswith("\n"):
                row = json.loads(line)
                answered_before[row["request_key"]] = row["text"]
    assert len(answered_before) >= 14

    time.sleep(1.0)  # let the requests the killed client left in flight finish on the server
    server.reset_stats()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    total = 2 * pq.read_table(selection_path).num_rows
    table = read_trajectories(out)
    keys = table["request_key"].to_pylist()
    assert len(keys) == len(set(keys)) == total
    final = dict(zip(keys, table["text"].to_pylist(), strict=True))
    for key, text in answered_before.items():
        assert final[key] == text  # kept, not asked again
    missing = total - len(answered_before)
    assert f"{missing} requests to do, {len(answered_before)} already done" in rerun.stderr
    assert server.stats["completed"] == missing
    assert not list(folder.glob("wal-*")) and not list(folder.glob(".*.tmp"))


def test_server_subprocess_stub_with_faults():
    import httpx

    from cxrmax.testing import serve_subprocess

    with serve_subprocess(None, "stub-teacher") as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        models = httpx.get(server.base_url + "/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["stub-teacher"]
        server.set_faults(script=[503])
        body = {"model": "stub-teacher", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        first = httpx.post(server.base_url + "/chat/completions", json=body, timeout=10)
        second = httpx.post(server.base_url + "/chat/completions", json=body, timeout=10)
        assert first.status_code == 503
        answer = second.json()
        assert (
            answer["choices"][0]["finish_reason"] == "length"
            and len(answer["choices"][0]["message"]["content"].split()) == 3
        )
        assert server.stats() == {"requests": 2, "status_503": 1, "completed": 1}
    assert server.process.poll() is not None


def test_rpm_limit_spaces_requests(server, small_selection, mini_mimic, tmp_path):
    start = time.monotonic()
    stats = generate(_options(small_selection, mini_mimic, tmp_path, [server.base_url], rpm=600, samples=2))
    assert stats.done == 20
    # 10 per second with a burst of one second's worth: the 10 requests after the burst need >= 1 s.
    assert time.monotonic() - start >= 0.9


def test_duplicate_sample_ids_in_the_selection_are_refused(server, small_selection, mini_mimic, tmp_path):
    import pyarrow as pa

    table = pq.read_table(small_selection)
    doubled = tmp_path / "doubled.parquet"
    pq.write_table(pa.concat_tables([table, table.slice(3, 1)]), doubled)
    with pytest.raises(CxrmaxError, match=r"doubled.parquet row 11 field 'sample_id'.*duplicate"):
        generate(_options(doubled, mini_mimic, tmp_path, [server.base_url]))
    assert server.stats["requests"] == 0


def test_sigterm_commits_what_was_answered(server, small_selection, mini_mimic, tmp_path):
    server.set_faults(delay_s=0.3)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "cxrmax", "generate", "--model", MODEL, "--selection", str(small_selection),
        "--mimic-root", str(mini_mimic), "--out", str(out), "--base-url", server.base_url, "--samples", "3",
        "--max-tokens", "4", "--concurrency", "2", "--quiet",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    folder = out / "trajectories" / MODEL
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        p.stat().st_size for p in (folder.glob("wal-*.jsonl") if folder.exists() else [])
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr  # 128 + SIGTERM, as a shell reports a terminated job
    assert "interrupted" in stderr
    assert not list(folder.glob("wal-*.jsonl"))  # the journal became a shard on the way out
    kept = read_trajectories(out).num_rows
    assert 1 <= kept < 30


def test_a_server_that_never_answered_stops_the_run_after_a_few_attempts(
    server, small_selection, mini_mimic, tmp_path
):
    """Every request answered 500 at concurrency 1: before, each of 5 requests used all 6 attempts
    with growing waits (94 s with the default backoff); now the run stops after 2 x fail_fast_after
    attempts in all, whichever requests they belong to, and records nothing."""
    server.set_faults(error_rate=1.0, error_status=500)
    options = _options(
        small_selection, mini_mimic, tmp_path, [server.base_url], concurrency=1, backoff_max=60.0
    )
    with pytest.raises(GenerationAborted, match=r"no request has succeeded and the first 10 attempts"):
        generate(options)
    assert server.stats["requests"] == 2 * options.fail_fast_after
    [status] = generation_status(tmp_path)
    assert status.failed == 0 and status.distinct_keys == 0


def test_transformers_backend_on_a_lora_adapter_folder(tiny_vlm_path, small_selection, mini_mimic, tmp_path):
    """`generate --model ADAPTER` (train-apo's output) loads the adapter onto its base, as training does."""
    from peft import LoraConfig, get_peft_model

    from cxrmax.core.hf import load_model

    adapter = tmp_path / "adapter"
    get_peft_model(load_model(tiny_vlm_path), LoraConfig(r=2, target_modules="all-linear")).save_pretrained(
        adapter
    )
    options = _options(
        small_selection,
        mini_mimic,
        tmp_path / "out",
        [],
        backend="transformers",
        model=resolve_model(str(adapter)),
    )
    options.model_path = str(adapter)
    assert generate(options).done == 10
