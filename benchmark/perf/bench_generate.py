"""Client overhead of `cxrmax generate` against a zero-latency OpenAI-compatible stub on loopback.

Measured in one run, side by side (each client is its own process; CPU and peak RSS from wait4):
- `cxrmax generate` (CLI, writing journal + Arrow shards) vs a bare `openai.AsyncOpenAI` + semaphore
  loop sending the same requests (same prompts, same images as data URLs): requests/s and CPU per
  request. Goal: at least 80% of the bare loop's rate.
- Peak RSS of `cxrmax generate` at 10,000 and 100,000 requests. Goal: growth under 50 MB.
- Curator's online processor on the same stub, when it is installed in /work/peer-venvs/curator.
  Goal: faster than Curator.

The stub is a raw asyncio HTTP/1.1 server in a separate process that answers every chat request with
a fixed completion at once, so the figures are client overhead, not model time.

    python benchmark/perf/bench_generate.py            # 10k-request throughput, RSS at 10k and 100k
    python benchmark/perf/bench_generate.py --quick    # 2k-request throughput, RSS at 2k and 10k
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CURATOR_PYTHON = Path("/work/peer-venvs/curator/bin/python")

# ----------------------------------------------------------------------------------- the stub
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": "stub-vlm",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "The right costophrenic angle is blunted, consistent with a small pleural effusion.",
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 120, "completion_tokens": 17, "total_tokens": 137},
    }
).encode()
MODELS = json.dumps(
    {"object": "list", "data": [{"id": "stub-vlm", "object": "model", "owned_by": "bench"}]}
).encode()
_LENGTH = re.compile(rb"content-length:\s*(\d+)")


class _StubProtocol(asyncio.Protocol):
    def connection_made(self, transport):  # noqa: ANN001
        self.transport = transport
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            match = _LENGTH.search(head)
            size = int(match.group(1)) if match else 0
            if len(self.buffer) < end + 4 + size:
                return
            first_line = head.split(b"\r\n", 1)[0]
            del self.buffer[: end + 4 + size]
            body = MODELS if b"/models" in first_line else COMPLETION
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
                + body
            )


def serve_stub(port: int) -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            _StubProtocol, "127.0.0.1", port, backlog=4096
        )
        print(f"stub listening on {server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()

    asyncio.run(main())


# ----------------------------------------------------------------------------------- bare loop
BARE_LOOP = r"""
import asyncio, json, sys, time
import pyarrow.parquet as pq
from pathlib import Path
from openai import AsyncOpenAI
from cxrmax.generate.prompts import load_prompt
from cxrmax.mimic.images import ImageCache, to_data_url

selection, mimic_root, cache_dir, base_url, concurrency, max_edge = sys.argv[1:7]
table = pq.read_table(selection, columns=["sample_id", "image_path", "labels", "view"])
prompt = load_prompt("rationale")
cache = ImageCache(cache_dir, max_edge=int(max_edge))
urls = {}
requests = []
for row in table.to_pylist():
    path = row["image_path"]
    if path not in urls:
        urls[path] = to_data_url(cache.jpeg(Path(mimic_root) / path))
    requests.append((prompt.render(row), urls[path]))

async def main():
    client = AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
    semaphore = asyncio.Semaphore(int(concurrency))
    async def one(text, url):
        async with semaphore:
            response = await client.chat.completions.create(
                model="stub-vlm",
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}],
                max_tokens=64, temperature=0.7, top_p=0.9, seed=1,
            )
            return response.choices[0].message.content
    start = time.perf_counter()
    answers = await asyncio.gather(*(one(t, u) for t, u in requests))
    elapsed = time.perf_counter() - start
    await client.close()
    print(json.dumps({"done": sum(a is not None for a in answers), "elapsed_s": elapsed}))

asyncio.run(main())
"""

CURATOR_SCRIPT = r"""
import base64, json, os, sys, time
os.environ.setdefault("OPENAI_API_KEY", "x")
os.environ["CURATOR_DISABLE_CACHE"] = "1"
os.environ["TELEMETRY_ENABLED"] = "false"  # no network here; the upload would only add failures
# Curator estimates tokens with tiktoken, whose encoding files are downloaded at first use; this machine
# has no internet, so a whitespace tokenizer stands in (it only feeds Curator's rate limiter, set huge).
import tiktoken
class _OfflineEncoding:
    name = "offline-whitespace"
    def encode(self, text, *args, **kwargs):
        return text.split()
tiktoken.get_encoding = lambda name: _OfflineEncoding()
tiktoken.encoding_for_model = lambda name: _OfflineEncoding()
from bespokelabs import curator

n, base_url, concurrency, image_file, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
os.environ["CURATOR_CACHE_DIR"] = work
url = "data:image/jpeg;base64," + base64.b64encode(open(image_file, "rb").read()).decode()

class Rationale(curator.LLM):
    def prompt(self, row):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": row["text"]}]}]
    def parse(self, row, response):
        return {"answer": response}

llm = Rationale(model_name="stub-vlm", backend="openai",
                backend_params={"base_url": base_url, "api_key": "x", "max_requests_per_minute": 10_000_000,
                                "max_tokens_per_minute": 10_000_000_000, "max_retries": 0,
                                "require_all_responses": False},
                generation_params={"max_tokens": 64, "temperature": 0.7})
rows = [{"text": f"This is a patient's chest DR image. Case {i}. Please explain the basis for the diagnosis."} for i in range(int(n))]
start = time.perf_counter()
result = llm(rows)
elapsed = time.perf_counter() - start
try:
    done = len(result.dataset) if hasattr(result, "dataset") else len(result)
except Exception:
    done = -1
print(json.dumps({"done": done, "elapsed_s": elapsed}))
"""


# ----------------------------------------------------------------------------------- measuring
def run_measured(command: list[str], env: dict[str, str] | None = None, timeout: float = 1800) -> dict:
    """Run a client process; wall time, CPU seconds and peak RSS (MB) from wait4, plus its stdout."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stdout = process.stdout.read().decode()
    stderr = process.stderr.read().decode()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])}... failed ({process.returncode}):\n{stderr[-3000:]}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "stdout": stdout,
        "stderr": stderr,
    }


def make_selection(mimic_root: Path, n: int, path: Path) -> Path:
    """n selection rows cycling over the mini MIMIC-CXR's images, each with its own sample_id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxrmax.mimic import MimicCXR

    base = MimicCXR(mimic_root).select()
    repeats = -(-n // base.num_rows)
    table = pa.concat_tables([base] * repeats).slice(0, n)
    ids = pa.array([f"{sid}-{i}" for i, sid in enumerate(table["sample_id"].to_pylist())])
    table = table.set_column(table.schema.get_field_index("sample_id"), "sample_id", ids)
    pq.write_table(table, path)
    return path


def cxrmax_command(
    selection: Path, mimic_root: Path, out: Path, url: str, concurrency: int, max_edge: int, summary: Path
) -> list[str]:
    return [
        sys.executable, "-m", "cxrmax", "generate", "--model", "stub-vlm", "--selection", str(selection),
        "--mimic-root", str(mimic_root), "--out", str(out), "--base-url", url, "--concurrency", str(concurrency),
        "--image-max-edge", str(max_edge), "--max-tokens", "64", "--quiet", "--json", str(summary),
    ]  # fmt: skip


def bench_cxrmax(
    work: Path, selection: Path, mimic_root: Path, url: str, concurrency: int, max_edge: int, tag: str
) -> dict:
    out = work / f"out-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    # Reuse one warmed image cache so that every client sends the same bytes and none decodes JPEGs.
    (out / "cache").mkdir(parents=True)
    os.symlink(work / "image-cache", out / "cache" / "images")
    summary = work / f"summary-{tag}.json"
    result = run_measured(cxrmax_command(selection, mimic_root, out, url, concurrency, max_edge, summary))
    stats = json.loads(summary.read_text())
    result.update(done=stats["done"], loop_s=stats["elapsed_s"])
    return result


def bench_bare(
    work: Path, selection: Path, mimic_root: Path, url: str, concurrency: int, max_edge: int
) -> dict:
    command = [sys.executable, "-c", BARE_LOOP, str(selection), str(mimic_root), str(work / "image-cache"), url,
               str(concurrency), str(max_edge)]  # fmt: skip
    result = run_measured(command)
    stats = json.loads(result["stdout"].strip().splitlines()[-1])
    result.update(done=stats["done"], loop_s=stats["elapsed_s"])
    return result


def bench_curator(work: Path, n: int, url: str, concurrency: int, image: Path) -> dict | None:
    if not CURATOR_PYTHON.exists():
        return None
    curator_work = work / "curator"
    shutil.rmtree(curator_work, ignore_errors=True)
    curator_work.mkdir()
    env = {**os.environ, "CURATOR_CACHE_DIR": str(curator_work), "HOME": str(curator_work)}
    try:
        result = run_measured(
            [
                str(CURATOR_PYTHON),
                "-c",
                CURATOR_SCRIPT,
                str(n),
                url,
                str(concurrency),
                str(image),
                str(curator_work),
            ],
            env=env,
        )
    except RuntimeError as exc:
        print(f"curator: failed to run ({str(exc).splitlines()[0]})", file=sys.stderr)
        print(str(exc)[-1500:], file=sys.stderr)
        return None
    stats = json.loads(result["stdout"].strip().splitlines()[-1])
    result.update(done=stats["done"], loop_s=stats["elapsed_s"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (2k throughput, RSS at 2k and 10k)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--image-max-edge", type=int, default=256, help="image size sent (both clients)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternating runs per client; the best is kept"
    )
    parser.add_argument("--no-curator", action="store_true")
    parser.add_argument("--serve-stub", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_stub is not None:
        serve_stub(args.serve_stub)
        return

    n_rate = 2_000 if args.quick else 10_000
    rss_sizes = (2_000, 10_000) if args.quick else (10_000, 100_000)
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    stub = subprocess.Popen(
        [sys.executable, __file__, "--serve-stub", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(stub.stdout.readline().split()[-1])
        url = f"http://127.0.0.1:{port}/v1"
        from cxrmax.mimic.images import ImageCache
        from cxrmax.testing.mini_mimic import make_mini_mimic

        mimic_root = make_mini_mimic(work / "mimic", studies=64, seed=0, large_images=0)
        cache = ImageCache(work / "image-cache", max_edge=args.image_max_edge)
        images = sorted(mimic_root.glob("files/*/*/*/*.jpg"))
        sizes = [len(cache.jpeg(p)) for p in images]
        print(f"stub on {url}; {len(images)} distinct images, {sum(sizes) / len(sizes) / 1024:.1f} KiB each after "
              f"--image-max-edge {args.image_max_edge}; concurrency {args.concurrency}; {os.cpu_count()} CPUs")  # fmt: skip

        selection = make_selection(mimic_root, n_rate, work / f"selection-{n_rate}.parquet")
        # Alternate the clients so that a change in machine load hits all of them alike; keep each one's best.
        runs = {"cxrmax": [], "bare": [], "curator": []}
        for i in range(args.repeats):
            runs["bare"].append(
                bench_bare(work, selection, mimic_root, url, args.concurrency, args.image_max_edge)
            )
            runs["cxrmax"].append(
                bench_cxrmax(
                    work, selection, mimic_root, url, args.concurrency, args.image_max_edge, f"rate{i}"
                )
            )
            if not args.no_curator:
                result = bench_curator(work, n_rate, url, args.concurrency, cache.path_for(images[0]))
                if result is not None:
                    runs["curator"].append(result)
        curator = min(runs["curator"], key=lambda r: r["loop_s"]) if runs["curator"] else None

        def best(results):
            return min(results, key=lambda r: r["loop_s"])

        rows = [("cxrmax generate", best(runs["cxrmax"])), ("bare AsyncOpenAI+semaphore", best(runs["bare"]))]
        if curator is not None:
            rows.append(("curator online (openai backend)", curator))
        print(f"\nthroughput, {n_rate:,} requests (best of {args.repeats})")
        print(
            f"{'client':34} {'done':>7} {'req/s loop':>11} {'req/s e2e':>10} {'CPU ms/req':>11} {'peak RSS MB':>12}"
        )
        for name, r in rows:
            print(
                f"{name:34} {r['done']:>7} {r['done'] / r['loop_s']:>11.0f} {r['done'] / r['wall_s']:>10.0f} "
                f"{1000 * r['cpu_s'] / max(1, r['done']):>11.3f} {r['peak_rss_mb']:>12.1f}"
            )
        ours, bare = best(runs["cxrmax"]), best(runs["bare"])
        ratio = (ours["done"] / ours["loop_s"]) / (bare["done"] / bare["loop_s"])
        ratio_e2e = (ours["done"] / ours["wall_s"]) / (bare["done"] / bare["wall_s"])
        print(f"cxrmax / bare loop rate: {ratio:.0%} in the loop, {ratio_e2e:.0%} end to end (goal >= 80%)")
        if curator is not None and curator["done"] > 0:
            print(f"cxrmax / curator rate: {(ours['done'] / ours['loop_s']) / (curator['done'] / curator['loop_s']):.2f}x "
                  f"in the loop, {(ours['done'] / ours['wall_s']) / (curator['done'] / curator['wall_s']):.2f}x end to end")  # fmt: skip
        elif not args.no_curator:
            print("curator: not measured (not installed in /work/peer-venvs/curator or failed; see above)")

        print("\npeak RSS of cxrmax generate vs number of requests")
        rss = {}
        for n in rss_sizes:
            path = work / f"selection-{n}.parquet"
            if not path.exists():
                make_selection(mimic_root, n, path)
            r = bench_cxrmax(work, path, mimic_root, url, args.concurrency, args.image_max_edge, f"rss{n}")
            rss[n] = r["peak_rss_mb"]
            print(f"{n:>9,} requests: peak RSS {r['peak_rss_mb']:.1f} MB, {r['done'] / r['loop_s']:.0f} req/s, "
                  f"{1000 * r['cpu_s'] / r['done']:.3f} CPU ms/req")  # fmt: skip
        small, large = rss_sizes
        print(f"growth {small:,} -> {large:,}: {rss[large] - rss[small]:+.1f} MB (goal < 50 MB)")
    finally:
        stub.terminate()
        stub.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
