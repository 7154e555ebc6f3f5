"""`cxrmax generate`: source VLMs write reasoning trajectories about MIMIC-CXR images, exactly once.

Modules: roster (pipelines/models.toml), prompts (pipelines/prompts/), backends/ (one file per backend:
openai / transformers / vllm), ratelimit, orchestrator (the asyncio loop), store (request keys, journal,
Arrow shards, failure ledger), reader (read_trajectories), governance (where images may be sent),
progress, status.

Reading the output::

    from cxrmax.generate import read_trajectories
    table = read_trajectories("OUT")                 # every model, shards.TRAJECTORY_SCHEMA
    table = read_trajectories("OUT", model="qwen2-vl")

The shards are Arrow IPC streams, so ``datasets.Dataset.from_file(path)`` and
``datasets.load_dataset("arrow", data_files="OUT/trajectories/*/*.arrow")`` read them too.
"""

from cxrmax.generate.reader import model_dirs, read_trajectories, trajectory_files

__all__ = ["model_dirs", "read_trajectories", "trajectory_files"]
