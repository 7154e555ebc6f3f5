"""`cxrmax inspect`: one sample of a real build of the mini MIMIC-CXR, whole: drift marks where the
annotations say the source drifted, the positive, the ranked negatives, the film and the report;
an unknown id lists valid ones; the HTML page escapes every text and renders in a real headless
Chromium (Debian's package; installed by .ci/run)."""

from __future__ import annotations

import dataclasses
import html.parser
import shutil
import subprocess
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from cxrmax.cli import app
from cxrmax.core.errors import InputError
from cxrmax.mimic.reader import MimicCXR
from cxrmax.preferences.build import BuildOptions, build_preferences
from cxrmax.preferences.inspect import Mark, SampleView, inspect_sample
from cxrmax.preferences.inspect_html import render_html, write_html
from tests.helpers.preference_runs import ANSWERS, MODELS, generate_row, write_model

QWEN, NANO, GLM, MOONSHOT, GROK = (
    "Qwen/Qwen2.5-VL-7B-Instruct",
    "gpt-5 nano",
    "glm-4.5v",
    "moonshot-v1",
    "grok-4",
)


@pytest.fixture(scope="module")
def view(mini_build) -> SampleView:
    out, samples = mini_build
    return inspect_sample(out, samples[0]["sample_id"])


def marked(view: SampleView, name: str, kind: str) -> dict[str, list[str]]:
    """observation -> the marked texts of one kind in one source's answer."""
    answer = next(a for a in view.sources if a.name == name)
    found: dict[str, list[str]] = {}
    for mark in answer.marks:
        if mark.kind == kind:
            found.setdefault(mark.observation or "", []).append(answer.text[mark.start : mark.end].lower())
    return found


def test_inspect_marks_each_source_drift_where_the_annotations_put_it(view):
    assert sorted(a.name for a in view.sources) == sorted(MODELS)
    qwen = next(a for a in view.sources if a.name == QWEN)
    assert qwen.hallucinated == ["Consolidation", "Pneumonia"] and qwen.omitted == ["Pleural Effusion"]
    assert "consolidation" in marked(view, QWEN, "hallucinated")["Consolidation"]
    # "The heart size is normal. No pleural effusion": negations of what the consensus claims.
    nano = next(a for a in view.sources if a.name == NANO)
    assert {"Cardiomegaly", "Pleural Effusion"} <= set(nano.contradicted)
    assert "pleural effusion" in marked(view, NANO, "contradicted")["Pleural Effusion"]
    # "Small right pleural effusion" against the consensus's left one.
    assert next(a for a in view.sources if a.name == GLM).side_swapped == ["Pleural Effusion"]
    assert marked(view, GLM, "side-swapped")["Pleural Effusion"] == ["pleural effusion"]
    assert "edema" in " ".join(marked(view, GROK, "hallucinated")["Edema"])
    moonshot = next(a for a in view.sources if a.name == MOONSHOT)
    assert moonshot.refusal and moonshot.drift == 1.0 and marked(view, MOONSHOT, "refusal")
    for answer in view.sources:  # marks cut the text exactly: segments rebuild it
        assert "".join(piece for piece, _ in answer.segments()) == answer.text


def test_inspect_shows_the_positive_ranked_negatives_film_and_report(view, mini_build, mini_mimic):
    out, samples = mini_build
    sample = samples[0]
    row = next(
        r
        for r in datasets.load_from_disk(str(out / "preferences"))[sample["split"]]
        if r["sample_id"] == sample["sample_id"]
    )
    assert view.consensus == row["chosen"] and view.consensus_source == "consensus-vote"
    assert [n.name for n in view.negatives] == row["rejected_models"]
    assert [n.drift for n in view.negatives] == pytest.approx(row["rejected_drift"])
    assert [n.rank for n in view.negatives] == list(range(len(row["rejected"])))
    drifts = [n.drift for n in view.negatives]
    assert drifts == sorted(drifts, reverse=True)
    assert {a.name: a.negative_rank for a in view.sources} == {n.name: n.rank for n in view.negatives}
    # The film and the report come from the --mimic-root the build recorded.
    assert view.film.resolved == str(Path(mini_mimic).resolve() / sample["image_path"])
    assert view.film.data_url().startswith("data:image/jpeg;base64,")
    assert view.report == MimicCXR(mini_mimic).report(sample["subject_id"], sample["study_id"]).best()
    assert view.ground_truth == sample["labels"]


def test_an_unknown_sample_is_an_error_listing_valid_ids(mini_build):
    out, samples = mini_build
    with pytest.raises(InputError) as info:
        inspect_sample(out, samples[0]["sample_id"][:-1] + "x")
    message = str(info.value)
    assert "no sample" in message and samples[0]["sample_id"] in message
    assert sum(s["sample_id"] in message for s in samples) >= 3


def test_without_a_mimic_root_the_view_says_what_is_missing_and_skipped_ids_are_named(mini_build, tmp_path):
    _, samples = mini_build
    for model in MODELS[:3]:
        write_model(tmp_path / "run", model, [generate_row(s, model, ANSWERS[model]) for s in samples[:2]])
    lonely = samples[2]
    write_model(
        tmp_path / "run", MODELS[0], [generate_row(lonely, MODELS[0], "Cardiomegaly.")], name="part-2.arrow"
    )
    out = tmp_path / "data"
    build_preferences(
        [tmp_path / "run"], out, BuildOptions(processes=1, card=False, export_trl=False, export_swift=False)
    )
    # A trainer's cache beside the split's data (other columns) is not read as rows.
    split = samples[0]["split"]
    pa.ipc.new_stream(
        str(out / "preferences" / split / "cache-1.arrow"), pa.schema([("input_ids", pa.int32())])
    ).close()
    view = inspect_sample(out, samples[0]["sample_id"])
    assert view.consensus and view.negatives
    assert view.film.resolved is None and "--mimic-root" in view.film.problem
    assert view.film.data_url() is None and view.report is None and "--mimic-root" in view.report_note
    assert "--mimic-root" in render_html(view)
    with pytest.raises(InputError, match="skipped: fewer sources than --min-sources"):
        inspect_sample(out, lonely["sample_id"])


def test_cli_renders_the_sample_and_writes_the_page(mini_build, tmp_path):
    out, samples = mini_build
    page = tmp_path / "sample.html"
    result = CliRunner().invoke(
        app, ["inspect", str(out), "--sample", samples[0]["sample_id"], "--html", str(page)]
    )
    assert result.exit_code == 0, result.output
    for text in (
        *MODELS,
        "consensus positive",
        "ranked negatives",
        "reference report",
        "side-swapped: Pleural Effusion",
    ):
        assert text in result.output
    assert page.is_file() and "<!DOCTYPE html>" in page.read_text(encoding="utf-8")
    missing = CliRunner().invoke(app, ["inspect", str(out), "--sample", "nope"])
    assert missing.exit_code == 2 and samples[0]["sample_id"] in missing.output


#: An answer that would run script or draw an element if the page did not escape it.
HOSTILE = '<img src=x onerror="alert(1)"><script>alert(2)</script> & "quotes" right pleural effusion'


def hostile_view(view: SampleView) -> SampleView:
    """The view with one more source whose name and answer are HTML, a span of it marked."""
    start = HOSTILE.index("pleural effusion")
    answer = dataclasses.replace(
        view.sources[0],
        name="<b>evil</b>",
        text=HOSTILE,
        marks=[
            Mark(0, 5, "hallucinated", '"><i>x</i>'),
            Mark(start, start + 16, "side-swapped", "Pleural Effusion"),
        ],
    )
    return dataclasses.replace(view, sources=[*view.sources, answer], report="<u>report</u>")


def test_html_escapes_every_untrusted_text(view):
    page = render_html(hostile_view(view))
    assert (
        "<script>" not in page
        and "<img src=x" not in page
        and "<b>evil" not in page
        and "<u>report" not in page
    )
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in page and "&lt;b&gt;evil&lt;/b&gt;" in page
    assert 'data-observation="&quot;&gt;&lt;i&gt;x&lt;/i&gt;"' in page


class _DomReader(html.parser.HTMLParser):
    """The elements of a DOM dump: marks (kind, observation, text), images, scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[list[str]] = []
        self.images: list[dict] = []
        self.scripts = 0
        self._open_marks: list[list[str]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "mark" and "data-kind" in attrs:
            self._open_marks.append([attrs["data-kind"], attrs.get("data-observation") or "", ""])
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "mark" and self._open_marks:
            self.marks.append(self._open_marks.pop())

    def handle_data(self, data):
        for mark in self._open_marks:
            mark[2] += data


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium; .ci/run does)")
def test_the_page_renders_in_headless_chromium(view, tmp_path):
    page = write_html(hostile_view(view), tmp_path / "sample.html")
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--user-data-dir=" + str(tmp_path / "profile"),
    ]
    dom = subprocess.run(
        [*command, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    reader = _DomReader()
    reader.feed(dom)
    kinds = {(kind, observation) for kind, observation, _ in reader.marks}
    assert {
        ("hallucinated", "Consolidation"),
        ("contradicted", "Pleural Effusion"),
        ("side-swapped", "Pleural Effusion"),
        ("refusal", ""),
    } <= kinds
    assert ["side-swapped", "Pleural Effusion", "pleural effusion"] in reader.marks
    # The hostile answer stayed text: one image (the film, a data URL), no script element.
    assert reader.scripts == 0 and len(reader.images) == 1
    assert reader.images[0]["src"].startswith("data:image/jpeg;base64,")
    assert "<script>alert(2)</script>" in html.unescape(dom) and "<b>evil</b>" in html.unescape(dom)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*command, f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    from PIL import Image

    with Image.open(shot) as image:
        low, high = image.convert("L").getextrema()
    assert high - low > 100  # text, marks and the film drawn, not a blank page
