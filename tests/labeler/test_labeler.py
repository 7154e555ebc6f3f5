"""Behaviour of the rule-based labeler: the API, the documented rules, bad input, batches, and the
labels read from a mini MIMIC-CXR's reports against the fixture's chexpert CSV."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.labeler import LABEL_TABLE_SCHEMA, iter_label_tables, label_text, label_texts, laterality_column
from cxrmax.labeler.core import UNCERTAIN_POLICIES


def status(text: str, name: str) -> tuple[str, str | None]:
    label = label_text(text).observations[name]
    return label.status, label.laterality


# --- the API -----------------------------------------------------------------------------------


def test_label_text_api_shape():
    result = label_text(
        "## Findings\n- Small left pleural effusion.\n- No pneumothorax.\n\nPlease consult a radiologist."
    )
    assert list(result.observations) == list(OBSERVATIONS)
    assert result.labels()["Pleural Effusion"] == 1
    assert result.labels()["Pneumothorax"] == 0
    assert result.labels()["Edema"] is None
    effusion = result.observations["Pleural Effusion"]
    assert (effusion.status, effusion.laterality) == ("positive", "left")
    assert result.observations["Cardiomegaly"].laterality is None  # no side for the heart
    [evidence] = effusion.evidence
    assert result.text[evidence.start : evidence.end].lower() == "pleural effusion"
    assert result.steps[evidence.step].text == "Small left pleural effusion."
    kinds = [step.kind for step in result.steps]
    assert kinds == ["heading", "bullet", "bullet", "sentence"]
    assert result.n_steps == 3
    assert result.steps[1].heading == "Findings"
    assert result.steps[1].statuses == {"Pleural Effusion": "positive"}
    assert result.steps[1].lateralities == {"Pleural Effusion": "left"}
    assert result.steps[2].statuses == {"Pneumothorax": "negative"}
    assert [span.text.lower() for span in result.hedging] == ["please consult"]
    assert not result.is_refusal and result.error is None


GRADED = [
    ("Bibasilar atelectasis versus scarring.", "Atelectasis", "probable"),
    ("Minimal left basilar atelectasis or scarring.", "Atelectasis", "probable"),
    ("Findings likely represent atelectasis.", "Atelectasis", "probable"),
    ("Probable small right pleural effusion.", "Pleural Effusion", "probable"),
    ("Borderline cardiomegaly.", "Cardiomegaly", "probable"),
    ("This may represent early pneumonia.", "Pneumonia", "possible"),
    ("A small effusion cannot be excluded.", "Pleural Effusion", "possible"),
    ("Opacity concerning for pneumonia.", "Pneumonia", "possible"),
    ("Possible left lower lobe nodule.", "Lung Lesion", "possible"),
    ("Differential diagnosis: pneumonia or atelectasis.", "Pneumonia", "possible"),
    ("Small left pleural effusion.", "Pleural Effusion", None),
    ("No pneumothorax.", "Pneumothorax", None),
]


@pytest.mark.parametrize(("text", "name", "certainty"), GRADED)
def test_uncertain_observations_are_graded_probable_or_possible(text, name, certainty):
    observation = label_text(text).observations[name]
    assert observation.certainty == certainty, (text, observation)
    # The grade never changes CheXpert's status: every graded observation stays uncertain (-1).
    assert (observation.value == -1) == (certainty is not None)


def test_uncertain_policies_of_the_batch_path_follow_the_grade():
    texts = [text for text, _, _ in GRADED] + [" ".join(text for text, _, _ in GRADED)]
    expected = {"keep": -1, "positive": 1, "negative": 0}
    tables = {policy: label_texts(texts, processes=1, uncertain=policy) for policy in UNCERTAIN_POLICIES}
    for row, text in enumerate(texts):
        for name, label in label_text(text).observations.items():
            for policy, table in tables.items():
                value = table.column(name)[row].as_py()
                if label.status != "uncertain":
                    assert value == label.value, (policy, text, name)
                elif policy == "graded":
                    assert value == int(label.certainty == "probable"), (text, name)
                else:
                    assert value == expected[policy], (policy, text, name)
    # The same through the worker pool, and the last text mixes both grades.
    many = texts * 160  # above PARALLEL_THRESHOLD: the pool runs
    pooled = label_texts(many, processes=2, uncertain="graded")
    assert pooled.equals(label_texts(many, processes=1, uncertain="graded"))
    assert {tables["graded"].column(n)[len(texts) - 1].as_py() for n in ("Atelectasis", "Pneumonia")} == {
        0,
        1,
    }
    with pytest.raises(ValueError, match="graded"):
        label_texts(texts, uncertain="sometimes")


def test_steps_offsets_cover_the_text_exactly():
    text = (
        "**Basis for the diagnosis:**\n\n1. **Cardiomegaly**: the heart is enlarged. The CTR is 0.6.\n"
        "2. Small bilateral effusions, e.g. at both\n   bases, layering dependently.\n\nIMPRESSION: Cardiomegaly."
    )
    result = label_text(text)
    for step in result.steps:
        assert text[step.start : step.end] == step.text
        assert step.text == step.text.strip()
    assert [s.kind for s in result.steps] == ["heading", "numbered", "sentence", "numbered", "sentence"]
    # the wrapped continuation line belongs to the numbered item; "e.g." does not end a sentence
    assert result.steps[3].text == "Small bilateral effusions, e.g. at both\n   bases, layering dependently."
    assert result.steps[1].heading == "Basis for the diagnosis"
    assert result.steps[4].heading == "IMPRESSION"


def test_hard_wrapped_report_lines_are_joined():
    text = " FINDINGS:\n \n There is a small left pleural effusion with\n adjacent atelectasis. No\n pneumothorax.\n"
    result = label_text(text)
    assert [s.text for s in result.steps if s.kind != "heading"] == [
        "There is a small left pleural effusion with\n adjacent atelectasis.",
        "No\n pneumothorax.",
    ]
    assert status(text, "Pneumothorax") == ("negative", "unspecified")
    assert status(text, "Atelectasis") == ("positive", "left")


def test_windows_line_ends():
    result = label_text(
        "FINDINGS:\r\n\r\nSmall left pleural effusion.\r\nNo pneumothorax.\r\n- Cardiomegaly\r\n"
    )
    assert [(s.kind, s.text) for s in result.steps] == [
        ("heading", "FINDINGS:"),
        ("sentence", "Small left pleural effusion."),
        ("sentence", "No pneumothorax."),
        ("bullet", "Cardiomegaly"),
    ]
    assert (result.labels()["Pleural Effusion"], result.labels()["Pneumothorax"]) == (1, 0)


# --- the rules named in the issue --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name", "expected"),
    [
        ("No change in the small left effusion.", "Pleural Effusion", ("positive", "left")),
        ("Resolved pneumothorax.", "Pneumothorax", ("negative", "unspecified")),
        ("The lungs are clear.", "Lung Opacity", ("negative", "unspecified")),
        ("The lungs are clear.", "Consolidation", ("negative", "unspecified")),
        ("Heart size is normal.", "Cardiomegaly", ("negative", None)),
        ("The costophrenic angles are sharp.", "Pleural Effusion", ("negative", "unspecified")),
        ("ET tube 4 cm above the carina.", "Support Devices", ("positive", None)),
        ("Right PICC line in the SVC.", "Support Devices", ("positive", None)),
        ("Pacer leads in the right ventricle.", "Support Devices", ("positive", None)),
        ("Left lower lobe volume loss.", "Atelectasis", ("absent", None)),  # CheXpert: not atelectasis
        ("Collapse of the right upper lobe.", "Atelectasis", ("positive", "right")),
        ("Patchy air-space disease at the right base.", "Lung Opacity", ("positive", "right")),
        ("Acute left rib fracture.", "Fracture", ("positive", "left")),
        ("A 1 cm nodule in the right upper lobe.", "Lung Lesion", ("positive", "right")),
        ("Right hilar mass.", "Lung Lesion", ("positive", "right")),
        (
            "Blunting of the costophrenic angle.",
            "Pleural Effusion",
            ("absent", None),
        ),  # CheXpert: a sign only
        ("Enlarged cardiac silhouette.", "Cardiomegaly", ("positive", None)),
        ("Pneumonia cannot be excluded.", "Pneumonia", ("uncertain", "unspecified")),
        ("Possible small right effusion.", "Pleural Effusion", ("uncertain", "right")),
        ("Atelectasis versus pneumonia at the left base.", "Pneumonia", ("uncertain", "left")),
        ("Findings may represent early edema.", "Edema", ("uncertain", None)),
        ("Questionable left apical pneumothorax.", "Pneumothorax", ("uncertain", "left")),
        ("Findings are suggestive of pneumonia.", "Pneumonia", ("uncertain", "unspecified")),
        ("This supports the diagnosis of pneumonia.", "Pneumonia", ("positive", "unspecified")),
        ("The opacity is consistent with pneumonia.", "Pneumonia", ("positive", "unspecified")),
        ("Free of effusion.", "Pleural Effusion", ("negative", "unspecified")),
        ("Negative for pneumothorax.", "Pneumothorax", ("negative", "unspecified")),
        ("Pneumothorax is not seen.", "Pneumothorax", ("negative", "unspecified")),
        ("No evidence of consolidation.", "Consolidation", ("negative", "unspecified")),
        ("Left effusion and right effusion.", "Pleural Effusion", ("positive", "bilateral")),
        ("Small pericardial effusion.", "Pleural Effusion", ("absent", None)),
    ],
)
def test_rules(text, name, expected):
    assert status(text, name) == expected


def test_negation_scope_ends_at_but_however_although_and_clause_end():
    assert status("No effusion, but a small left pneumothorax.", "Pneumothorax") == ("positive", "left")
    assert status("No effusion; however, left lower lobe atelectasis.", "Atelectasis") == ("positive", "left")
    assert status("No pneumothorax although a right effusion is seen.", "Pleural Effusion") == (
        "positive",
        "right",
    )
    assert status("No pneumothorax; small right effusion.", "Pleural Effusion") == ("positive", "right")
    text = "No pneumothorax, pleural effusion, or focal consolidation."
    for name in ("Pneumothorax", "Pleural Effusion", "Consolidation"):
        assert status(text, name)[0] == "negative"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "No effusion, possible atelectasis.",
            {"Pleural Effusion": ("negative", "unspecified"), "Atelectasis": ("uncertain", "unspecified")},
        ),
        (
            "No pneumothorax, likely atelectasis at the left base.",
            {"Pneumothorax": ("negative", "unspecified"), "Atelectasis": ("uncertain", "left")},
        ),
        (
            "Small left effusion, no pneumothorax, mild right basilar atelectasis.",
            {
                "Pleural Effusion": ("positive", "left"),
                "Pneumothorax": ("negative", "unspecified"),
                "Atelectasis": ("positive", "right"),
            },
        ),
        ("Pneumothorax, if present, is very small.", {"Pneumothorax": ("uncertain", "unspecified")}),
        (
            "Atelectasis versus consolidation at the left base.",
            {"Atelectasis": ("uncertain", "left"), "Consolidation": ("uncertain", "left")},
        ),
        (
            "Right lower lobe opacity, consistent with pneumonia or atelectasis.",
            {
                "Lung Opacity": ("positive", "right"),
                "Pneumonia": ("uncertain", "right"),
                "Atelectasis": ("uncertain", "right"),
            },
        ),
        ("Pneumothorax: there is no pneumothorax.", {"Pneumothorax": ("negative", "unspecified")}),
        ("Edema: not present.", {"Edema": ("negative", None)}),
        ("History of pneumonia. Lungs are clear.", {"Pneumonia": ("negative", "unspecified")}),
        (
            "Pneumonia typically appears as consolidation.",
            {"Pneumonia": ("absent", None), "Consolidation": ("absent", None)},
        ),
        (
            "Cardiomegaly: yes. Pleural effusion: yes (left). Pneumothorax: no. Pneumonia: possible.",
            {
                "Cardiomegaly": ("positive", None),
                "Pleural Effusion": ("positive", "left"),
                "Pneumothorax": ("negative", "unspecified"),
                "Pneumonia": ("uncertain", "unspecified"),
            },
        ),
        ("Pneumonia cannot be confirmed or excluded.", {"Pneumonia": ("uncertain", "unspecified")}),
        (
            "If there is clinical concern for rib fracture, a rib series could be obtained.",
            {"Fracture": ("absent", None)},
        ),
        ("The patient has been extubated.", {"Support Devices": ("negative", None)}),
    ],
)
def test_list_and_clause_boundaries(text, expected):
    for name, want in expected.items():
        assert status(text, name) == want, name


def test_double_negatives():
    assert status("A small effusion cannot be excluded.", "Pleural Effusion")[0] == "uncertain"
    assert status("Cannot rule out pneumonia.", "Pneumonia")[0] == "uncertain"
    assert status("Pneumothorax is not excluded.", "Pneumothorax")[0] == "uncertain"
    assert status("No focal consolidation to suggest pneumonia.", "Pneumonia")[0] == "negative"
    assert status("There is no doubt that the heart is enlarged.", "Cardiomegaly")[0] == "positive"


def test_conflict_rule_positive_beats_uncertain_beats_negative():
    text = "No right pleural effusion. Possible left pleural effusion. Small left effusion."
    assert status(text, "Pleural Effusion") == ("positive", "left")
    text = "No pleural effusion. A pleural effusion cannot be excluded."
    assert status(text, "Pleural Effusion") == ("uncertain", "unspecified")
    result = label_text("No right pleural effusion. Small left pleural effusion.")
    assert [e.status for e in result.observations["Pleural Effusion"].evidence] == ["positive"]
    assert [s.statuses.get("Pleural Effusion") for s in result.steps] == ["negative", "positive"]


def test_no_finding_follows_the_chexpert_rule():
    assert label_text("No acute cardiopulmonary process.").labels()["No Finding"] == 1
    assert (
        label_text("ET tube in place. Lungs are clear.").labels()["No Finding"] == 1
    )  # devices do not count
    assert label_text("Possible small effusion.").labels()["No Finding"] is None  # uncertain counts
    assert label_text("Old healed rib fracture.").labels()["No Finding"] is None
    assert label_text("As an AI, I cannot interpret X-rays.").labels()["No Finding"] is None  # a refusal


def test_refusal_and_hedging_spans():
    text = "As an AI, I'm not capable of providing medical diagnoses. Please consult a qualified radiologist."
    result = label_text(text)
    assert result.is_refusal
    assert [text[s.start : s.end] for s in result.refusal][0] == "As an AI"
    assert [s.text for s in result.hedging] == ["Please consult", "qualified radiologist"]
    assert all(label.status == "absent" for label in result.observations.values())
    # mentions inside the refusal clause assert nothing; a later interpretation still counts
    text = "I cannot diagnose pneumonia. However, the image shows a large right pleural effusion."
    assert status(text, "Pneumonia")[0] == "absent"
    assert status(text, "Pleural Effusion") == ("positive", "right")
    assert not label_text("Small effusion. Clinical correlation is recommended.").is_refusal
    assert label_text("Small effusion. Clinical correlation is recommended.").hedging


def test_markdown_styles():
    text = (
        "### 1. Pleural Effusion\n"
        "* **Left side:** blunting of the left costophrenic angle\n"
        "* Meniscus sign on the left\n\n"
        "#### Differential diagnosis\n- Pneumonia\n- Atelectasis\n"
    )
    result = label_text(text)
    assert (
        result.observations["Pleural Effusion"].status,
        result.observations["Pleural Effusion"].laterality,
    ) == (
        "positive",
        "left",
    )
    assert result.observations["Pneumonia"].status == "uncertain"  # under a "Differential" heading
    assert result.observations["Atelectasis"].status == "uncertain"


def test_tables_symbol_bullets_and_sub_items():
    table = "| Finding | Present? |\n|---|---|\n| Pleural effusion | Yes (right) |\n| Pneumothorax | No |\n"
    assert status(table, "Pleural Effusion") == ("positive", "right")
    assert status(table, "Pneumothorax") == ("negative", "unspecified")
    assert label_text(table).n_steps == 3  # the |---| separator row is not a step
    symbols = "✅ **Atelectasis** – left lower lobe\n❌ **Pneumothorax** – not seen"
    assert status(symbols, "Atelectasis") == ("positive", "left")
    assert status(symbols, "Pneumothorax") == ("negative", "unspecified")
    nested = "1. Atelectasis\n   - Left lower lobe\n   - Volume loss present\n2. Pleural effusion\n   - None"
    assert status(nested, "Atelectasis") == ("positive", "left")
    assert status(nested, "Pleural Effusion") == ("negative", "unspecified")


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (None, "text is None"),
        ("", "empty text"),
        ("   \n\t ", "empty text"),
        (b"\xff\xfe\x00\x01binary", "binary data (not UTF-8 text)"),
        ("\x00\x01\x02\x03\x04\x05\x06\x07" * 20, "binary or control characters (not text)"),
        (12345, "not a text: int"),
        ("Без патологии. Лёгкие чистые.", "no English text recognised"),
        ("肺部清晰，无胸腔积液。", "no English text recognised"),
    ],
)
def test_bad_input_gives_absent_labels_and_an_error(value, error):
    result = label_text(value)
    assert result.error == error
    assert all(label.status == "absent" for label in result.observations.values())
    assert result.labels()["No Finding"] is None


def test_nonsense_and_tiny_texts_are_not_called_normal():
    for text in ("a" * 100_000, "ok", "." * 1000):
        result = label_text(text)
        assert result.labels()["No Finding"] is None
        assert all(label.status == "absent" for label in result.observations.values())
    assert label_text("Degenerative changes of the thoracic spine.").labels()["No Finding"] == 1


def test_very_long_text_is_labelled():
    sentence = "Stable mild cardiomegaly without pulmonary edema. "
    text = sentence * (100_000 // len(sentence) + 1) + "Small left pleural effusion."
    assert len(text) > 100_000
    result = label_text(text)
    assert result.error is None
    assert status(text, "Pleural Effusion") == ("positive", "left")
    assert result.labels()["Cardiomegaly"] == 1 and result.labels()["Edema"] == 0
    assert result.n_steps == text.count(".")


def test_utf8_bytes_are_decoded_and_non_ascii_offsets_stay_exact():
    text = "İİ Small left pleural effusion — stable."
    result = label_text(text.encode("utf-8"))
    assert result.labels()["Pleural Effusion"] == 1
    [evidence] = label_text(text).observations["Pleural Effusion"].evidence
    assert text[evidence.start : evidence.end] == "pleural effusion"


# --- batches -----------------------------------------------------------------------------------


def _mixed_texts(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    pool = [
        "Small left pleural effusion. No pneumothorax.",
        "## Findings\n- **Cardiomegaly**\n- Possible right lower lobe pneumonia",
        "As an AI, I cannot interpret medical images.",
        None,
        "",
        b"\xff\x00junk",
        "Lungs are clear. Heart size is normal.",
        "Bibasilar atelectasis versus consolidation.",
    ]
    return [rng.choice(pool) for _ in range(n)]


def test_label_texts_schema_and_bad_rows():
    texts = ["Small left pleural effusion.", None, "", b"\xff\xfe", "As an AI, I cannot diagnose."]
    table = label_texts(texts)
    assert table.schema.equals(LABEL_TABLE_SCHEMA)
    rows = table.to_pylist()
    assert rows[0]["Pleural Effusion"] == 1 and rows[0][laterality_column("Pleural Effusion")] == "left"
    assert rows[0]["error"] is None and rows[0]["n_steps"] == 1
    assert [r["error"] for r in rows[1:4]] == ["text is None", "empty text", "binary data (not UTF-8 text)"]
    for row in rows[1:4]:
        assert all(row[name] is None for name in OBSERVATIONS)
    assert rows[4]["refusal"] is True and rows[4]["No Finding"] is None
    assert table.column("Pleural Effusion").type == pa.int8()


def test_label_texts_accepts_arrow_arrays_and_generators():
    texts = ["No effusion.", "Right pneumothorax."]
    from_list = label_texts(texts)
    assert label_texts(pa.array(texts)).equals(from_list)
    assert label_texts(t for t in texts).equals(from_list)
    assert label_texts([]).num_rows == 0


def test_label_texts_in_parallel_is_deterministic_and_matches_in_process():
    texts = _mixed_texts(2400)
    parallel = label_texts(texts, processes=2)
    serial = label_texts(texts, processes=1)
    assert parallel.num_rows == len(texts)
    assert parallel.equals(serial)
    assert parallel.equals(label_texts(texts, processes=2))


def test_iter_label_tables_streams_chunks_in_order_with_one_pool():
    texts = _mixed_texts(5000, seed=3)
    chunks = [
        texts[:2500],
        pa.array([t if not isinstance(t, bytes) else None for t in texts[2500:4500]]),
        texts[4500:],
    ]
    tables = list(iter_label_tables(iter(chunks), processes=2))
    assert [t.num_rows for t in tables] == [2500, 2000, 500]
    expected = label_texts(
        [t if not isinstance(t, bytes) or i < 2500 or i >= 4500 else None for i, t in enumerate(texts)],
        processes=1,
    )
    assert pa.concat_tables(tables).equals(expected)


# --- the mini MIMIC-CXR --------------------------------------------------------------------------


def test_labels_from_mini_mimic_reports_equal_the_fixture_csv(mini_mimic):
    from cxrmax.mimic.reader import MimicCXR
    from cxrmax.mimic.reports import parse_report

    mimic = MimicCXR(mini_mimic)
    expected = mimic.study_labels().to_pylist()
    assert len(expected) == 40
    sections_seen = set()
    for row in expected:
        sections = mimic.report(row["subject_id"], row["study_id"])
        assert sections is not None
        text = sections.best()
        sections_seen.add(
            "impression" if sections.impression else "findings" if sections.findings else "last"
        )
        got = label_text(text).labels()
        want = {name: (None if row[name] is None else int(row[name])) for name in OBSERVATIONS}
        assert got == want, (row["study_id"], text)
        # the whole report (header, indication "evaluate for acute process", addenda) reads the same
        whole = mimic.report_text(row["subject_id"], row["study_id"])
        assert label_text(whole).labels() == want, (row["study_id"], whole)
        assert parse_report(whole).best() == text
    assert len(sections_seen) >= 2


def test_labels_from_a_larger_mini_mimic_with_another_seed(tmp_path):
    """More studies and another seed reach every phrasing variant of the fixture's report writer."""
    from cxrmax.mimic.reader import MimicCXR
    from cxrmax.testing.mini_mimic import make_mini_mimic

    root = make_mini_mimic(tmp_path / "mimic", studies=120, seed=5, large_images=0, small_edge=(64, 96))
    mimic = MimicCXR(root)
    rows = mimic.study_labels().to_pylist()
    texts = [mimic.report(row["subject_id"], row["study_id"]).best() for row in rows]
    table = label_texts(texts, processes=1)
    for row, got in zip(rows, table.to_pylist(), strict=True):
        want = {name: (None if row[name] is None else int(row[name])) for name in OBSERVATIONS}
        assert {name: got[name] for name in OBSERVATIONS} == want, row["study_id"]
    positives = sum(1 for row in rows for name in OBSERVATIONS if row[name] == 1)
    uncertain = sum(1 for row in rows for name in OBSERVATIONS if row[name] == -1)
    assert positives > 50 and uncertain > 20  # the sweep exercised real findings, not only normals


def test_pool_workers_die_on_sigterm_whatever_the_parent_handler(monkeypatch):
    """A parent that turns SIGTERM into KeyboardInterrupt (the generate CLI does) must not leave a
    forked worker alive after Pool.terminate(): it once hung the test suite."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        texts = ["Small left pleural effusion."] * 3000
        for _ in range(3):
            table = label_texts(texts, processes=2)
            assert table.num_rows == 3000
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- issue 12: scope and definitions as real reports write them (sentences written for this test) ---
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a negated list closed by "or" keeps its size words inside the negation
        ("No consolidation, effusion or large pneumothorax.", {"Pleural Effusion": 0, "Pneumothorax": 0}),
        ("No pneumothorax, mild right atelectasis.", {"Pneumothorax": 0, "Atelectasis": 1}),
        (
            "The lungs are clear of consolidation, effusion or pneumothorax.",
            {"Pleural Effusion": 0, "Pneumothorax": 0},
        ),
        (
            "Lungs are free of infiltrate, large effusion, or pneumothorax.",
            {"Pleural Effusion": 0, "Pneumothorax": 0},
        ),
        (
            "No lucency to suggest pneumothorax or fluid to suggest an effusion.",
            {"Pleural Effusion": 0, "Pneumothorax": 0},
        ),
        # predicates of normality over what comes before them
        ("Heart size and vascular congestion are within normal limits.", {"Cardiomegaly": 0, "Edema": 0}),
        ("The hila and the pleural effusion are unremarkable.", {"Pleural Effusion": 0}),
        (
            "No significant effusion. No definite consolidation. No convincing pneumothorax.",
            {"Pleural Effusion": 0, "Consolidation": 0, "Pneumothorax": 0},
        ),
        ("No findings to suggest pneumonia.", {"Pneumonia": 0}),
        # the de-identification mask inside a cue or in place of a verb
        ("No XXXX of an effusion.", {"Pleural Effusion": 0}),
        ("The heart XXXX enlarged.", {"Cardiomegaly": 1}),
        ("Borderline heart size.", {"Cardiomegaly": -1}),
        ("Heart size is upper limits of normal or mildly enlarged.", {"Cardiomegaly": -1}),
        # resolved / removed / interval clearing, and what is not a negation
        ("Interval clearing of the right lower lobe consolidation.", {"Consolidation": 0}),
        ("The right chest tube has been removed.", {"Support Devices": 0}),
        ("Stable mild atelectasis without interval change.", {"Atelectasis": 1}),
        ("Small effusion suspected.", {"Pleural Effusion": -1}),
        # CheXpert's definitions
        ("Collapse of the right lung.", {"Atelectasis": 1, "Pneumothorax": None}),
        ("Calcified granuloma in the right lung.", {"Lung Lesion": None}),
        ("Two calcified nodules in the left lung.", {"Lung Lesion": None}),
        ("Sequela of granulomatous infection.", {"Pneumonia": None}),
        ("Blunting of the left costophrenic angle.", {"Pleural Effusion": None}),
        ("Mild pulmonary vascular congestion.", {"Edema": -1}),  # CheXpert's uncertainty rule
        ("No vascular congestion.", {"Edema": 0}),
        ("Thyroid mass displacing the trachea.", {"Lung Lesion": None}),
        ("Sclerotic lesion in a rib.", {"Lung Lesion": None}),
        ("A round lesion in the left upper lobe.", {"Lung Lesion": 1}),
        ("A 2 cm nodular opacity in the left lung.", {"Lung Lesion": 1, "Lung Opacity": 1}),
        ("Left lower lobe volume loss.", {"Atelectasis": None}),
        # a finding explained as a mimic
        ("The nodule is consistent with a nipple shadow.", {"Lung Lesion": None}),
        ("The nodule could represent a nipple shadow.", {"Lung Lesion": -1}),
        ("The small rounded nodule over the right breast represents the nipple.", {"Lung Lesion": None}),
        # the link to a mimic may be a terminator, and a mimic word in a place phrase is not the link
        ("A right midlung nodule, secondary to overlying soft tissues.", {"Lung Lesion": None}),
        (
            "A nodular opacity seen only on the frontal projection is thought to represent overlapping vessels.",
            {"Lung Lesion": None},
        ),
        # CheXpert's "mass" inside a word; a pleural mass is Pleural Other
        ("Mass-like consolidation in the left lower lobe.", {"Lung Lesion": 1, "Consolidation": 1}),
        ("Masslike opacity in the right upper lobe.", {"Lung Lesion": 1, "Lung Opacity": 1}),
        ("A pleural mass along the lateral chest wall.", {"Lung Lesion": None, "Pleural Other": 1}),
        # an ignored phrase is a list item inside a cue's scope
        (
            "The differential includes a thymic cyst, a pericardial mass, or a lung mass.",
            {"Lung Lesion": -1},
        ),
        # a finding introduced with "with" after a negated one is a new claim
        (
            "No pneumothorax with a moderate right pleural effusion.",
            {"Pneumothorax": 0, "Pleural Effusion": 1},
        ),
        ("No focal consolidation with air bronchograms.", {"Consolidation": 0}),
        ("Possible pneumonia with a small left effusion.", {"Pleural Effusion": -1}),
        ("Mild atelectasis, question a trace left effusion.", {"Atelectasis": 1, "Pleural Effusion": -1}),
        ("Cardiac silhouette XXXX is large.", {"Cardiomegaly": 1}),
        # history: an earlier study, an old or tuberculous pneumonia, a modality's general power
        ("On the prior radiograph, consolidation filled the lingula.", {"Consolidation": None}),
        ("The effusion is larger than on the prior study, with new atelectasis.", {"Atelectasis": 1}),
        ("The effusion on the prior study is no longer seen.", {"Pleural Effusion": 0}),
        ("Scarring from an old tuberculous pneumonia.", {"Pneumonia": None}),
        ("Changes of previous pneumonia in the left base.", {"Pneumonia": None}),
        ("Cross-sectional imaging is more sensitive for subtle masses.", {"Lung Lesion": None}),
        # a negated general phrase negates; it does not silence its clause
        (
            "Streaky left base atelectasis and low volumes without typical signs of edema.",
            {"Atelectasis": 1, "Edema": 0},
        ),
    ],
)
def test_real_report_scope_and_chexpert_definitions(text, expected):
    labels = label_text(text).labels()
    assert {name: labels[name] for name in expected} == expected


def _reference_scan(low: str, text: str) -> list:
    """The scan as one finditer of LEXICON.pattern (what core._scan must equal)."""
    from cxrmax.labeler import core

    lexicon = core.mt.LEXICON
    tokens, covered = [], -1
    for match in lexicon.pattern.finditer(low):
        start, end = match.span()
        if start < covered:
            continue
        kind, payload, flexible = lexicon.spelled.get(match.group()) or core._spelling(lexicon, match.group())
        if flexible:
            flex_pattern = lexicon.flex_by_char.get(low[start])
            statement = None if flex_pattern is None else flex_pattern.match(low, start)
            if statement is not None:
                covered = statement.end()
                tokens.append((start, covered, core.STATEMENT, lexicon.flex[int(statement.lastgroup[1:])]))
                continue
        if kind != core.TRIGGER and not (kind == core.LAT and end - start == 1 and not text[start].isupper()):
            tokens.append((start, end, kind, payload))
    return tokens


@pytest.mark.parametrize(
    "text",
    [
        "There is no pneumothorax.",
        "effusion;no pneumothorax:none|edema",
        "Heart size: normal. Lungs: clear; no effusion.",
        ";;: no",
        "(left) R > L effusion, l and r lower lobes",
        "patient's nipple shadow; pleural  effusion and air-space disease",
        "Pneumonia",
        "'no' pneumothorax",
        "é no effusion é",
    ],
)
def test_scan_finds_the_tokens_of_the_reference_pattern(text):
    from cxrmax.labeler import core

    low = core._lowered(text)
    assert core._scan(low, text) == _reference_scan(low, text)
