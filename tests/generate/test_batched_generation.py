"""Batched generation in-process: the seeded per-row sampler, the engine's batches on the tiny Qwen2-VL,
and the orchestrator handing consecutive requests of its plan to a batching backend."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cxrmax.generate import read_trajectories
from cxrmax.generate.backends import Sampling
from cxrmax.generate.orchestrator import GenerateOptions, generate, plan_requests
from cxrmax.generate.prompts import load_prompt
from cxrmax.generate.responses import BackendError
from cxrmax.generate.roster import resolve_model

torch = pytest.importorskip("torch")

from cxrmax.generate.backends.transformers import (  # noqa: E402 - needs torch
    EngineRequest,
    SeededSampler,
    TransformersBackend,
    TransformersEngine,
)


def _draws(sampler: SeededSampler, scores: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([sampler(None, scores).argmax(dim=-1) for _ in range(n)])


def test_seeded_sampler_follows_the_distribution_and_cuts_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    scores = probs.log().repeat(3, 1)
    sampler = SeededSampler(
        [torch.Generator().manual_seed(s) for s in (1, 2, 3)],
        temperatures=[1.0, 1.0, 0.0],
        top_ps=[1.0, 0.8, 1.0],
    )
    draws = _draws(sampler, scores, 4000)
    full = torch.bincount(draws[:, 0], minlength=4) / 4000
    assert torch.allclose(full, probs, atol=0.03), full
    # top_p 0.8: the two likeliest tokens (0.5 + 0.3) are the nucleus, renormalised.
    nucleus = torch.bincount(draws[:, 1], minlength=4) / 4000
    assert nucleus[2:].sum() == 0 and abs(nucleus[0].item() - 0.625) < 0.03
    assert (draws[:, 2] == 0).all()  # temperature 0: greedy
    # The forced logits leave exactly one finite entry per row.
    forced = sampler(None, scores)
    assert (torch.isfinite(forced).sum(dim=-1) == 1).all()


def test_a_rows_draws_depend_on_its_own_seed_only():
    scores = torch.zeros(2, 50)
    alone = _draws(SeededSampler([torch.Generator().manual_seed(7)], [1.0], [1.0]), scores[:1], 50)[:, 0]
    for neighbour in (8, 9):
        sampler = SeededSampler(
            [torch.Generator().manual_seed(s) for s in (7, neighbour)], [1.0, 1.0], [1.0, 1.0]
        )
        assert torch.equal(_draws(sampler, scores, 50)[:, 0], alone)


@pytest.fixture(scope="module")
def engine(tiny_vlm_path, one_torch_thread):
    return TransformersEngine(tiny_vlm_path, device="cpu")


def _request(engine_images, prompt: str, seed: int, max_tokens: int = 12) -> EngineRequest:
    content = [{"type": "image"}, {"type": "text", "text": prompt}]
    return EngineRequest(
        [{"role": "user", "content": content}], engine_images, Sampling(1.0, 1.0, max_tokens, seed)
    )


@pytest.fixture(scope="module")
def films(mini_mimic):
    from PIL import Image

    paths = sorted(Path(mini_mimic).glob("files/*/*/*/*.jpg"))[:3]
    return [Image.open(p).convert("RGB").resize((56, 56)) for p in paths]


def test_engine_batch_answers_depend_on_their_own_request_only(engine, films):
    short, long = (
        "Describe the film.",
        "List every finding of this chest film, with its side, in one sentence.",
    )
    first = engine.generate_batch([_request([films[0]], short, 1), _request([films[1]], long, 2)])
    again = engine.generate_batch([_request([films[0]], short, 1), _request([films[1]], long, 2)])
    other = engine.generate_batch([_request([films[0]], short, 1), _request([films[1]], long, 3)])
    assert [c.text for c in first] == [c.text for c in again]  # deterministic
    assert other[0].text == first[0].text  # the neighbour's seed does not reach this row
    assert other[1].text != first[1].text
    # Left padding: each row reports its own prompt length, and the longer prompt is longer.
    assert first[1].prompt_tokens > first[0].prompt_tokens
    for completion in first:
        assert 1 <= completion.completion_tokens <= 12
        assert completion.finish_reason in ("stop", "length")


def test_engine_rows_stop_at_their_own_token_limit(engine, films):
    short, long = engine.generate_batch(
        [
            _request([films[2]], "Findings?", 5, max_tokens=3),
            _request([films[2]], "Findings?", 5, max_tokens=9),
        ]
    )
    # The untrained tiny model does not stop early: each row is cut at its own limit, not the batch's.
    assert (short.finish_reason, short.completion_tokens) == ("length", 3)
    assert 3 < long.completion_tokens <= 9


def test_generate_n_answers_differ_by_their_derived_seeds(engine, films):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Findings?"}]}]
    answers = engine.generate(messages, [films[0]], Sampling(1.0, 1.0, 12, 4), n=3)
    assert len(answers) == 3 and len({a.text for a in answers}) > 1
    assert engine.generate(messages, [films[0]], Sampling(1.0, 1.0, 12, 4), n=1)[0].text == answers[0].text


class RecordingBackend(TransformersBackend):
    """The real in-process backend, recording the seeds of every batch it is handed (and, when
    ``fail_batches``, refusing batches of more than one request as an overloaded engine would)."""

    def __init__(self, *args, fail_batches: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[list[int]] = []
        self.fail_batches = fail_batches

    async def complete_batch(self, requests):
        self.batches.append([sampling.seed for _, _, sampling in requests])
        if self.fail_batches and len(requests) > 1:
            raise BackendError("server", "out of memory for this batch", endpoint="transformers")
        return await super().complete_batch(requests)


@pytest.fixture(scope="module")
def ten_rows(mini_mimic, tmp_path_factory):
    from cxrmax.mimic import MimicCXR, write_selection

    path = tmp_path_factory.mktemp("batched") / "selection.parquet"
    write_selection(MimicCXR(mini_mimic).select().slice(0, 10), path)
    return path


def _options(selection, mimic_root, out, model_path, **overrides) -> GenerateOptions:
    settings = dict(
        model=resolve_model(str(model_path)),
        selection=Path(selection),
        mimic_root=Path(mimic_root),
        out=Path(out),
        prompt=load_prompt("rationale"),
        backend="transformers",
        model_path=str(model_path),
        samples=2,
        max_tokens=6,
        temperature=1.0,
        image_max_edge=56,
        backoff_base=0.01,
        backoff_max=0.02,
    )
    settings.update(overrides)
    return GenerateOptions(**settings)


def _answers(out) -> dict[str, str]:
    table = read_trajectories(out)
    return dict(zip(table["request_key"].to_pylist(), table["text"].to_pylist(), strict=True))


def test_orchestrator_batches_consecutive_requests_of_its_plan(tiny_vlm_path, ten_rows, mini_mimic, tmp_path):
    options = _options(ten_rows, mini_mimic, tmp_path / "a", tiny_vlm_path)
    backend = RecordingBackend(str(tiny_vlm_path), batch_size=4)
    stats = generate(options, backend=backend)
    assert stats.done == 20 and stats.failed == 0
    plan = [planned.seed for planned in plan_requests(options)]
    # Two workers take turns, so batches may reach the engine in either order, but each is 4 requests
    # in a row of the plan.
    assert sorted(backend.batches, key=lambda batch: plan.index(batch[0])) == [
        plan[start : start + 4] for start in range(0, 20, 4)
    ]
    first = _answers(tmp_path / "a")
    assert len(first) == 20
    # A second run from scratch batches the same requests together and writes the same answers.
    again = RecordingBackend(str(tiny_vlm_path), batch_size=4)
    generate(_options(ten_rows, mini_mimic, tmp_path / "b", tiny_vlm_path), backend=again)
    assert sorted(again.batches) == sorted(backend.batches) and _answers(tmp_path / "b") == first
    # Everything done: a rerun sends nothing.
    assert generate(options, backend=RecordingBackend(str(tiny_vlm_path), batch_size=4)).done == 0


def test_a_failing_batch_is_retried_one_request_at_a_time(tiny_vlm_path, ten_rows, mini_mimic, tmp_path):
    backend = RecordingBackend(str(tiny_vlm_path), batch_size=8, fail_batches=True)
    stats = generate(_options(ten_rows, mini_mimic, tmp_path, tiny_vlm_path, samples=1), backend=backend)
    assert stats.done == 10 and stats.failed == 0
    assert sorted(len(b) for b in backend.batches) == [1] * 10 + [2, 8]
    assert len(_answers(tmp_path)) == 10


def test_an_rpm_limit_holds_for_batched_requests_too(tiny_vlm_path, ten_rows, mini_mimic, tmp_path):
    import time

    backend = RecordingBackend(str(tiny_vlm_path), batch_size=10)
    started = time.monotonic()
    stats = generate(_options(ten_rows, mini_mimic, tmp_path, tiny_vlm_path, rpm=600), backend=backend)
    assert stats.done == 20
    # 10 per second with a burst of one second's worth: the second batch of 10 waits about a second.
    assert time.monotonic() - started >= 0.9


def test_a_missing_film_fails_its_request_not_its_batch(tiny_vlm_path, ten_rows, mini_mimic, tmp_path):
    table = pq.read_table(ten_rows)
    paths = table["image_path"].to_pylist()
    paths[2] = "files/p10/p10000000/s0/missing.jpg"
    broken = tmp_path / "broken.parquet"
    pq.write_table(
        table.set_column(table.schema.get_field_index("image_path"), "image_path", [paths]), broken
    )
    backend = RecordingBackend(str(tiny_vlm_path), batch_size=4)
    stats = generate(
        _options(broken, mini_mimic, tmp_path / "out", tiny_vlm_path, samples=1), backend=backend
    )
    assert stats.done == 9 and stats.failed == 1
    assert sorted(len(b) for b in backend.batches) == [2, 3, 4]


@pytest.mark.slow
def test_ctrl_c_in_a_batched_run_keeps_every_answer_and_a_rerun_finishes_exactly_once(
    tiny_vlm_path, mini_mimic, tmp_path
):
    import json
    import signal
    import subprocess
    import sys
    import time

    from cxrmax.generate.store import read_shard
    from cxrmax.mimic import MimicCXR, write_selection

    selection = write_selection(MimicCXR(mini_mimic).select(), tmp_path / "selection.parquet")
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "cxrmax", "generate", "--model", str(tiny_vlm_path), "--backend", "transformers",
        "--selection", str(selection), "--mimic-root", str(mini_mimic), "--out", str(out), "--samples", "6",
        "--max-tokens", "64", "--temperature", "1", "--image-max-edge", "64", "--batch-size", "4", "--quiet",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def received() -> dict[str, str]:
        answers = {}
        folders = list((out / "trajectories").glob("*")) if (out / "trajectories").is_dir() else []
        if not folders:
            return answers
        [folder] = folders
        for shard in folder.glob("part-*.arrow"):
            rows = read_shard(shard, ["request_key", "text"]).to_pylist()
            answers |= {row["request_key"]: row["text"] for row in rows}
        for journal in folder.glob("wal-*.jsonl"):
            for line in journal.read_text().splitlines(keepends=True):
                if line.endswith("\n"):
                    row = json.loads(line)
                    answers[row["request_key"]] = row["text"]
        return answers

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(received()) < 8:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert time.monotonic() - sent < 30  # the batch in flight finishes; nothing waits for the rest
    assert "Traceback" not in err
    before = received()
    total = 6 * pq.read_table(selection).num_rows
    assert 8 <= len(before) < total

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    table = read_trajectories(out)
    keys = table["request_key"].to_pylist()
    assert len(keys) == len(set(keys)) == total
    final = dict(zip(keys, table["text"].to_pylist(), strict=True))
    assert all(final[key] == text for key, text in before.items())  # kept, not asked again
    assert f"{total - len(before)} requests to do, {len(before)} already done" in rerun.stderr
