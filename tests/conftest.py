"""Shared pytest fixtures. Session-scoped fixtures build small real data once (a mini MIMIC-CXR,
tiny models) so the suite stays fast."""

from __future__ import annotations

import signal

import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """The interruption tests send Ctrl-C (SIGINT) to the commands they start, as a terminal would to a
    foreground command. A shell starts a background job with SIGINT ignored and every child inherits
    that, so under `bash .ci/run &` those commands would never see it: give this process Python's own
    handler back, and the commands it starts begin with the default disposition again."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_vlm_path(tmp_path_factory):
    """A tiny Qwen2-VL (model + processor) saved to disk once per session (cxrmax.toy.tinyvlm)."""
    from cxrmax.toy.tinyvlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), seed=0)


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory):
    """A tiny text-only Qwen2 causal LM with the same tokenizer, saved once per session."""
    from cxrmax.toy.tinyvlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-lm"), seed=0, text_only=True)


@pytest.fixture(scope="session")
def mini_mimic(tmp_path_factory):
    """A mini MIMIC-CXR-JPG (40 studies, seed 0; cxrmax.testing.mini_mimic.make_mini_mimic), built once per
    session. Treat it as read-only: copy it before corrupting anything."""
    from cxrmax.testing.mini_mimic import make_mini_mimic

    return make_mini_mimic(tmp_path_factory.mktemp("mini-mimic") / "mimic", studies=40, seed=0)


@pytest.fixture(scope="session")
def mini_mimic_dicom(tmp_path_factory):
    """A mini MIMIC-CXR in the DICOM layout (12 studies, seed 1; some films MONOCHROME1), read-only."""
    from cxrmax.testing.mini_mimic import make_mini_mimic

    return make_mini_mimic(
        tmp_path_factory.mktemp("mini-mimic-dicom") / "mimic", studies=12, seed=1, dicom=True
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core box they only contend."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
