"""The labeler on realistic, unseen text: MIMIC-CXR-style reports (de-identification blanks, WET READ,
INDICATION/COMPARISON/TECHNIQUE sections, device positions, interval change) and VLM answers
(markdown, <think> blocks, JSON-ish and table answers, verdict lists, disclaimers, refusals, unicode).

Every case was labelled by hand before the labeler was run on it, in seven rounds; each round was
written after the previous round's failures were fixed, so it measured the labeler on unseen text
(first-run scores: round 1 176/201 cases fully right, round 2 85/98, round 3 54/60, round 4 25/30,
round 5 26/30, round 6 22/25, round 7 19/24). Six of my expectations contradicted documented conventions and were
corrected (the family side rule, the No Finding rule, "evaluate for" = uncertain, "perihilar
haziness" as an edema sign, "the right lung is clear" negating the family). Expected labels use the codes of
tests/test_labeler_eval.py: AT Atelectasis, CM Cardiomegaly, CO Consolidation, ED Edema, EC Enlarged
Cardiomediastinum, FR Fracture, LL Lung Lesion, LO Lung Opacity, NF No Finding, PE Pleural Effusion,
PO Pleural Other, PN Pneumonia, PX Pneumothorax, SD Support Devices; pos / neg / unc / abs with an
optional "/left", "/right", "/bilateral" (no side written = unspecified). An observation not listed
must be absent; "No Finding" is derived by the CheXpert rule unless the case lists it. Conventions are
the labeler's (ARCHITECTURE.md): "lungs are clear" negates the opacity family (LO CO PN AT ED);
"cardiomediastinal silhouette normal" negates CM and EC; positive > uncertain > negative per text.
"""

from __future__ import annotations

import pytest
from test_labeler_eval import expected_labels

from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.labeler import label_text, label_texts

CLEAR = "LO=neg CO=neg PN=neg AT=neg ED=neg"  # "the lungs are clear"

NORMAL_MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old woman with cough and fever  // eval for pneumonia

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 The lungs are clear without focal consolidation, pleural effusion or pneumothorax.  The
 cardiomediastinal silhouette is within normal limits.  No acute osseous abnormalities.

 IMPRESSION:

 No acute cardiopulmonary process.
"""

WET_READ_REPORT = """WET READ: ___ ___ ___ 10:42 PM
  Right IJ central line tip in the mid SVC.  No pneumothorax.
______________________________________________________________________________
                                 FINAL REPORT
 INDICATION:  ___ with new right IJ line placement, assess for pneumothorax.

 FINDINGS:  Right internal jugular central venous catheter terminates in the mid SVC.  There
 is no pneumothorax.  Heart size is normal.  Lungs are clear.

 IMPRESSION:  Right IJ line in appropriate position, no pneumothorax.
"""

HISTORY_REPORT = """ HISTORY:  ___M with CHF, now with cough, r/o pneumonia.

 FINDINGS:  Mild cardiomegaly.  No pulmonary edema.  No focal consolidation.
"""

COMPARISON_REPORT = """ INDICATION:  Follow-up pneumonia.

 COMPARISON:  Chest radiograph ___, which showed right lower lobe pneumonia and a small
 right pleural effusion.

 FINDINGS:  Right lower lobe pneumonia has resolved.  No pleural effusion.
"""

REASON_REPORT = """ REASON FOR EXAMINATION:  Evaluate for interval change in pleural effusion and
 pneumothorax.

 FINDINGS:  The left pleural effusion is smaller.  No pneumothorax.
"""

CLINICAL_INFO_CHAT = """Clinical history: fever and cough, question pneumonia.
Findings: No consolidation. No effusion."""

NUMBERED_IMPRESSION = """IMPRESSION:
1. Endotracheal tube 3.5 cm above the carina.
2. Increasing left lower lobe opacity, likely atelectasis, though superimposed pneumonia is not
excluded.
3. Small left pleural effusion.
"""

WET_READ_PTX = """WET READ: ___ ___ 3:15 AM
  New small right apical pneumothorax.  Dr. ___ paged.

 FINDINGS:  Small right apical pneumothorax is new.  Right chest tube in place.
"""

VERDICT_LIST = """**Findings:**
- **Atelectasis:** No
- **Cardiomegaly:** Yes
- **Effusion** - absent
- **Pneumothorax:** Not present
- **Edema:** Possible (mild)
"""

THINK_ANSWER = """<think>
The image shows... maybe pneumonia on the left? Let me look again. The left lower lobe has an
opacity.
</think>

Final answer: Left lower lobe pneumonia."""

THINK_CANT_SEE = """<think>
Okay, let me look. I can't see any obvious pneumothorax. The heart looks big.
</think>
Cardiomegaly without pneumothorax."""

STEP_ANSWER = """Step 1: Assess the heart size. The cardiac silhouette is enlarged.
Step 2: Look at the lungs. There is a hazy opacity in the right lower zone.
Step 3: Pleura. No effusion.
Final answer: Cardiomegaly and right lower zone opacity, possibly pneumonia."""

TABLE_ANSWER = """| Finding | Present? | Side |
|---|---|---|
| Atelectasis | Yes | Left |
| Pleural effusion | No | - |
| Pneumothorax | No | - |
| Cardiomegaly | Yes | - |
"""

DASH_LIST = """Atelectasis - present (right base)
Effusion - absent
Consolidation - absent"""

NUMBERED_MARKDOWN = """1. **Heart**: The cardiothoracic ratio is about 0.6, indicating cardiomegaly.
2. **Lungs**: Increased interstitial markings in both lungs, suggestive of interstitial edema.
3. **Pleura**: Small bilateral effusions.
4. **Devices**: None."""

COLON_LIST = """Cardiomegaly: Yes
Pleural Effusion: Yes (bilateral)
Pneumothorax: No
Fracture: No"""

STEP_DASHES = """Step 1: Look for pneumothorax — none.
Step 2: Heart size — normal.
Step 3: Lungs — there is right basal consolidation."""

BULLET_FINDINGS = """Findings:
• Left-sided pleural effusion
• Right lower lobe atelectasis
• No pneumothorax"""

LONG_FILLER = (
    "The trachea is midline. The osseous structures are intact for age. The soft tissues are "
    "unremarkable. The visualised upper abdomen shows a normal gas pattern. "
)
LONG_ANSWER = (
    "## Systematic review\n\n"
    + "\n\n".join(LONG_FILLER for _ in range(160))
    + "\n\n## Final diagnosis\n\nRight upper lobe pneumonia."
)

# Second round, written after the first round was fixed (held out from those fixes).
LIST14 = """Atelectasis: Present in the left lower lobe
Cardiomegaly: Absent
Consolidation: Absent
Edema: Absent
Enlarged Cardiomediastinum: Absent
Fracture: Absent
Lung Lesion: Absent
Lung Opacity: Present
Pleural Effusion: Absent
Pleural Other: Absent
Pneumonia: Absent
Pneumothorax: Absent
Support Devices: Absent
No Finding: Absent"""
OBS_MD = """**Observations:**

1. **Lung Fields:** The lung fields appear clear with no signs of consolidation or masses.
2. **Heart Size:** The heart appears to be within normal limits.
3. **Pleural Spaces:** No evidence of pleural effusion or pneumothorax.
4. **Bones:** No fractures are visible.

**Conclusion:** The chest X-ray appears normal."""
LLL = """Based on the chest X-ray, the most likely diagnosis is **left lower lobe pneumonia**. The key findings supporting this are:
- Increased opacity in the left lower zone
- Air bronchograms
- Silhouetting of the left hemidiaphragm"""
THINK2 = """<think>
The user wants a diagnosis. Looking at the costophrenic angles, the left one is blunted. The heart is normal size.
</think>

**Diagnosis:** Left pleural effusion."""
KEY = """Key findings:
  \u2022 Bilateral lower-lobe consolidation
  \u2022 Small right effusion

Impression: Bilateral pneumonia with right parapneumonic effusion."""
NUM_DASH = """1. Cardiomegaly - Yes
2. Edema - No
3. Pleural effusion - Yes, small on the left"""
NORMAL_MIMIC2 = """ FINDINGS:  PA and lateral views of the chest provided.  There is no focal consolidation,
 effusion, or pneumothorax.  The cardiomediastinal silhouette is normal.  Imaged osseous
 structures are intact.  No free air below the right hemidiaphragm is seen.

 IMPRESSION:  No acute intrathoracic process."""
ADDENDUM = """ADDENDUM:  The small left apical pneumothorax was not mentioned on the initial read and
 was communicated to Dr. ___ at 4:10 PM.

 FINDINGS:  Lungs are clear.  No effusion."""

# Third round, written after the second round was fixed.
EMOJI_VERDICTS = "Atelectasis \u2705\nCardiomegaly \u274c\nPleural effusion \u2705 (left)"
THINK_DASHES = "<think>Let me check each finding. Atelectasis - none. Effusion - small left.</think> Answer: small left pleural effusion, no atelectasis."

# Fourth round: long answers, self-correction, fenced JSON, negation/side corner cases.
ABCDE_ANSWER = """**Step-by-step analysis**

1. **Technical quality:** PA view, adequate inspiration, no significant rotation.
2. **Airway:** Trachea is midline.
3. **Breathing (lungs):** There is a patchy area of increased opacity in the right lower zone with air bronchograms. The left lung appears clear. No pneumothorax.
4. **Circulation (heart and mediastinum):** Heart size is within normal limits (CTR < 0.5). Mediastinum is not widened.
5. **Diaphragm:** The right costophrenic angle is slightly blunted, which may indicate a small parapneumonic effusion.
6. **Everything else:** No rib fractures. No free air under the diaphragm.

**Conclusion:** Findings are most consistent with right lower lobe pneumonia with a possible small right pleural effusion.

*Disclaimer: This is not a substitute for professional medical advice.*"""
NORMAL_LIST_ANSWER = """The chest radiograph demonstrates:
- Normal cardiac silhouette
- Clear lung fields bilaterally
- No pleural effusion
- No pneumothorax
- Intact bony structures

Impression: Normal chest X-ray. No acute cardiopulmonary abnormality."""
CHEST_TUBE_REPORT = """ FINAL REPORT
 EXAMINATION:  CHEST (PORTABLE AP)

 INDICATION:  ___ year old man s/p CABG, chest tube removal  // ?PTX

 COMPARISON:  ___ at 06:12

 FINDINGS:

 Since the prior exam, the left chest tube has been removed.  There is no pneumothorax.  Small
 left pleural effusion with adjacent atelectasis is unchanged.  Median sternotomy wires and
 mediastinal clips are again noted.  Mild cardiomegaly is stable.  There is no pulmonary edema.

 IMPRESSION:

 No pneumothorax after left chest tube removal.
"""
FENCED_JSON_ANSWER = """```json
{
  "Atelectasis": "uncertain",
  "Cardiomegaly": "positive",
  "Edema": "negative",
  "Pleural Effusion": "positive",
  "laterality": {"Pleural Effusion": "bilateral"}
}
```"""
SELF_CORRECTING_ANSWER = """Let me think about this carefully. At first glance the left apex looks a bit lucent, so I wondered about a pneumothorax, but on closer inspection the lung markings extend all the way to the chest wall, so there is no pneumothorax. The heart is enlarged. The lungs show mild vascular congestion.

Final answer: cardiomegaly with mild pulmonary vascular congestion; no pneumothorax."""

# Fifth round.
FINDINGS_MD = "**Findings**\n- Lungs: No focal consolidation, no effusion.\n- Heart: Mildly enlarged.\n- Bones: Old healed fracture of the left 6th rib."

# Sixth round: CXR-MAX-style rationales.
RATIONALE_SUPPORTS = """To determine the diagnosis, let's analyze the image step by step.

1. The cardiac silhouette appears enlarged, with a cardiothoracic ratio above 0.5, which supports the diagnosis of cardiomegaly.
2. There is blunting of both costophrenic angles, suggesting bilateral pleural effusions.
3. The pulmonary vasculature appears prominent with perihilar haziness, consistent with pulmonary edema.
4. No pneumothorax is identified.

Therefore, the findings support the diagnosis of cardiomegaly, pleural effusion and edema."""
RATIONALE_RECHECK = """The image shows a frontal chest radiograph. Wait, let me re-check the left base. There is an area of increased density behind the heart, which could represent left lower lobe atelectasis or consolidation. However, the costophrenic angles remain sharp, so there is no significant effusion. The right lung is clear.

Conclusion: left lower lobe atelectasis versus consolidation; no effusion."""
RATIONALE_ICU = """Reasoning:
- Lines/tubes: an endotracheal tube is present, tip approximately 5 cm above the carina; a nasogastric tube courses below the diaphragm.
- Lungs: diffuse bilateral airspace opacities.
- Pleura: no large effusion.
- Heart: normal size.

Diagnosis: Diffuse bilateral airspace disease, which in this context may represent pulmonary edema or ARDS."""

# (id, text, expected labels, refusal, hedging); hedging None = not checked.
CASES: list[tuple[str, str, str, bool, bool | None]] = [
    # --- MIMIC-CXR-style full reports --------------------------------------------------------
    ("normal_full_report", NORMAL_MIMIC_REPORT, f"{CLEAR} PE=neg PX=neg CM=neg EC=neg", False, None),
    ("wet_read_line", WET_READ_REPORT, f"SD=pos PX=neg CM=neg {CLEAR}", False, None),
    ("history_section", HISTORY_REPORT, "CM=pos ED=neg CO=neg", False, None),
    ("comparison_section", COMPARISON_REPORT, "PN=neg/right PE=neg", False, None),
    ("reason_for_exam", REASON_REPORT, "PE=pos/left PX=neg", False, None),
    ("clinical_history_line", CLINICAL_INFO_CHAT, "CO=neg PE=neg", False, None),
    (
        "numbered_impression",
        NUMBERED_IMPRESSION,
        "SD=pos LO=pos/left AT=unc/left PN=unc/left PE=pos/left",
        False,
        None,
    ),
    ("wet_read_ptx", WET_READ_PTX, "PX=pos/right SD=pos", False, None),
    # --- report sentences --------------------------------------------------------------------
    (
        "resolution_consolidation",
        "Interval resolution of the previously seen left lower lobe consolidation. No new focal opacity.",
        "CO=neg/left LO=neg",
        False,
        None,
    ),
    (
        "ptx_no_longer_seen",
        "The previously noted right pneumothorax is no longer seen. Right chest tube has been removed.",
        "PX=neg/right SD=neg",
        False,
        None,
    ),
    (
        "chf_triad",
        "Moderate cardiomegaly, unchanged. Mild pulmonary vascular congestion. Small bilateral pleural effusions, stable.",
        "CM=pos ED=unc PE=pos/bilateral",  # CheXpert: vascular congestion is uncertain edema
        False,
        None,
    ),
    (
        "cabg_top_normal",
        "s/p CABG with median sternotomy wires and mediastinal clips. Heart size is top-normal. No acute process.",
        "SD=pos CM=neg",
        False,
        None,
    ),
    (
        "et_ng_clear",
        "ET tube terminates 4 cm above the carina. NG tube courses below the diaphragm, tip not seen. Lungs are clear.",
        f"SD=pos {CLEAR}",
        False,
        None,
    ),
    ("picc_svc", "PICC line tip in the mid SVC.", "SD=pos", False, None),
    (
        "retrocardiac_though",
        "Retrocardiac opacity may reflect atelectasis, though infection cannot be excluded.",
        "LO=pos/left AT=unc/left PN=unc/left",
        False,
        None,
    ),
    (
        "cannot_exclude_pna",
        "Cannot exclude early pneumonia in the right lower lobe.",
        "PN=unc/right",
        False,
        None,
    ),
    ("possible_small_left", "Possible small left effusion.", "PE=unc/left", False, None),
    (
        "blunting_likely",
        "Blunting of the right costophrenic angle, likely a small effusion.",
        "PE=unc/right",
        False,
        None,
    ),
    ("bibasilar_atelectasis", "Bibasilar atelectasis.", "AT=pos/bilateral", False, None),
    (
        "rll_concerning",
        "Right lower lobe opacity concerning for pneumonia.",
        "LO=pos/right PN=unc/right",
        False,
        None,
    ),
    ("no_evidence_ptx", "No evidence of pneumothorax.", "PX=neg", False, None),
    ("low_volumes", "Low lung volumes. No focal consolidation.", "CO=neg", False, None),
    ("copd", "Hyperinflated lungs c/w COPD. No acute cardiopulmonary process.", "", False, None),
    ("old_rib_fractures", "Osteopenia. Old healed left rib fractures.", "FR=pos/left", False, None),
    ("free_air", "Free air under the right hemidiaphragm, concerning for perforation.", "", False, None),
    ("vs_at_base", "Atelectasis vs pneumonia at the left base.", "AT=unc/left PN=unc/left", False, None),
    (
        "which_may_represent",
        "Right lower lobe opacity, which may represent atelectasis or pneumonia.",
        "LO=pos/right AT=unc/right PN=unc/right",
        False,
        None,
    ),
    ("and_or", "Mild pulmonary edema and/or atypical infection.", "ED=unc PN=unc", False, None),
    (
        "compared_to_prior",
        "Compared to prior, there is increased opacity in the right upper lobe.",
        "LO=pos/right",
        False,
        None,
    ),
    ("no_change_effusion", "No change in the small left pleural effusion.", "PE=pos/left", False, None),
    ("clear_without", "Lungs are clear without consolidation or effusion.", f"{CLEAR} PE=neg", False, None),
    ("negative_for", "Negative for pneumothorax.", "PX=neg", False, None),
    ("free_of_airspace", "The lungs are free of focal airspace disease.", CLEAR, False, None),
    (
        "rather_than",
        "Findings are more suggestive of atelectasis rather than pneumonia.",
        "AT=unc PN=neg",
        False,
        None,
    ),
    ("probable_right", "Probable small right pleural effusion.", "PE=unc/right", False, None),
    ("suggestive_edema", "Findings suggestive of mild interstitial edema.", "ED=unc", False, None),
    (
        "aspiration",
        "Patchy left basilar opacity may represent aspiration.",
        "LO=pos/left PN=unc/left",
        False,
        None,
    ),
    (
        "nodule_suspicious",
        "A 1.2 cm nodule in the right upper lobe is suspicious for malignancy. Recommend CT for further evaluation.",
        "LL=pos/right",
        False,
        True,
    ),
    ("pacer_leads", "Pacemaker with leads in the right atrium and right ventricle.", "SD=pos", False, None),
    (
        "trach_subclavian",
        "Tracheostomy tube in place. Left subclavian line tip at the cavoatrial junction.",
        "SD=pos",
        False,
        None,
    ),
    ("widened_mediastinum", "Widened mediastinum, concerning for aortic pathology.", "EC=pos", False, None),
    ("upper_limits_normal", "Heart size is at the upper limits of normal.", "CM=neg", False, None),
    ("enlarged_silhouette", "Enlarged cardiac silhouette.", "CM=pos", False, None),
    ("no_longer_edema", "There is no longer evidence of pulmonary edema.", "ED=neg", False, None),
    ("edema_resolved", "Pulmonary edema has resolved.", "ED=neg", False, None),
    (
        "apical_ptx_unchanged",
        "Small left apical pneumothorax, unchanged from prior.",
        "PX=pos/left",
        False,
        None,
    ),
    ("pleural_thickening", "Stable right pleural thickening.", "PO=pos/right", False, None),
    (
        "could_reflect",
        "Subtle opacity at the right base could reflect early pneumonia.",
        "LO=pos/right PN=unc/right",
        False,
        None,
    ),
    ("lobe_collapse", "Left lower lobe collapse.", "AT=pos/left", False, None),
    (
        "compression_deformity",
        "Compression deformity of a mid thoracic vertebral body, age indeterminate.",
        "FR=pos",
        False,
        None,
    ),
    ("no_displaced_fracture", "No displaced rib fracture identified.", "FR=neg", False, None),
    (
        "heart_size_normal_short",
        "Mild bibasilar atelectasis. No pleural effusion or pneumothorax. Heart size normal.",
        "AT=pos/bilateral PE=neg PX=neg CM=neg",
        False,
        None,
    ),
    ("lines_unchanged", "Support lines and tubes are unchanged in position.", "SD=pos", False, None),
    ("ett_removal", "Interval removal of the endotracheal tube.", "SD=neg", False, None),
    (
        "ett_removed_ng_stays",
        "Endotracheal tube has been removed. Nasogastric tube remains in place.",
        "SD=pos",
        False,
        None,
    ),
    (
        "chest_tube_residual",
        "Left-sided chest tube in place. Tiny residual left apical pneumothorax.",
        "SD=pos PX=pos/left",
        False,
        None,
    ),
    (
        "right_gt_left",
        "Right greater than left bilateral pleural effusions.",
        "PE=pos/bilateral",
        False,
        None,
    ),
    (
        "no_definite_though",
        "No definite focal consolidation, though there may be minimal atelectasis at the left base.",
        "CO=neg AT=unc/left",
        False,
        None,
    ),
    ("hyperexpanded_clear", "Lungs are hyperexpanded but clear.", CLEAR, False, None),
    (
        "edema_versus_infection",
        "Mild interstitial prominence which could represent mild edema versus atypical infection.",
        "ED=unc PN=unc",
        False,
        None,
    ),
    (
        "layering_effusion",
        "Hazy opacity over the right hemithorax likely reflects layering effusion.",
        "LO=pos/right PE=unc/right",
        False,
        None,
    ),
    (
        "cardiac_mediastinal_silhouettes",
        "No pleural effusion, pneumothorax, or focal consolidation. Cardiac and mediastinal silhouettes are unremarkable.",
        "PE=neg PX=neg CO=neg CM=neg EC=neg",
        False,
        None,
    ),
    ("cms_and_hilar", "The cardiomediastinal and hilar contours are normal.", "CM=neg EC=neg", False, None),
    (
        "moderate_right_small_left",
        "Moderate right and small left pleural effusions.",
        "PE=pos/bilateral",
        False,
        None,
    ),
    ("picc_lower_svc", "Right PICC terminates in the lower SVC.", "SD=pos", False, None),
    ("feeding_tube", "Feeding tube tip in the stomach.", "SD=pos", False, None),
    (
        "dobhoff_esophagus",
        "Dobhoff tube has been withdrawn and now terminates in the distal esophagus; recommend advancement.",
        "SD=pos",
        False,
        None,
    ),
    ("no_evidence_acute", "No evidence of acute cardiopulmonary process.", "", False, None),
    ("chf_consistent", "Findings consistent with congestive heart failure.", "ED=pos", False, None),
    (
        "kerley",
        "Severe cardiomegaly with pulmonary vascular redistribution and Kerley B lines, consistent with CHF.",
        "CM=pos ED=pos",
        False,
        None,
    ),
    (
        "lung_bases_plural",
        "Linear opacities at the lung bases most likely reflect subsegmental atelectasis.",
        "LO=pos/bilateral AT=unc/bilateral",
        False,
        None,
    ),
    ("granuloma", "Calcified granuloma in the left upper lobe.", "", False, None),  # CheXpert: no lesion
    ("no_nodules", "No suspicious pulmonary nodules or masses.", "LL=neg", False, None),
    ("unchanged_appearance", "Unchanged appearance of the chest.", "", False, None),
    (
        "blunting_or_thickening",
        "There is mild blunting of the left costophrenic angle which could be due to a small effusion or pleural thickening.",
        "PE=unc/left PO=unc/left",
        False,
        None,
    ),
    (
        "mediastinum_technique",
        "Apparent widening of the mediastinum is likely due to AP technique.",
        "EC=unc",
        False,
        None,
    ),
    ("heart_mildly_enlarged", "The heart is mildly enlarged.", "CM=pos", False, None),
    ("heart_difficult", "Heart size is difficult to assess given the AP technique.", "", False, None),
    ("port_a_cath", "Right-sided Port-A-Cath with tip in the right atrium.", "SD=pos", False, None),
    ("nearly_resolved", "Left basilar opacity has nearly resolved.", "LO=pos/left", False, None),
    ("pna_improved", "Right upper lobe pneumonia has improved.", "PN=pos/right", False, None),
    ("after_removal", "No pneumothorax is seen after chest tube removal.", "PX=neg SD=neg", False, None),
    (
        "right_chest_tube_resolved",
        "There is a right-sided chest tube; the previously seen right pneumothorax has resolved.",
        "SD=pos PX=neg/right",
        False,
        None,
    ),
    ("increased_effusion", "Left pleural effusion has increased.", "PE=pos/left", False, None),
    ("decreased_persists", "Left pleural effusion has decreased but persists.", "PE=pos/left", False, None),
    ("decreased_right", "Decreased right pleural effusion.", "PE=pos/right", False, None),
    ("right_lung_base", "Mild atelectasis at the right lung base.", "AT=pos/right", False, None),
    (
        "lingula_streaky",
        "Streaky opacities in the lingula and left lower lobe, likely atelectasis.",
        "LO=pos/left AT=unc/left",
        False,
        None,
    ),
    (
        "overlying_atelectasis",
        "Small bilateral effusions, left more than right, with overlying atelectasis.",
        "PE=pos/bilateral AT=pos/bilateral",
        False,
        None,
    ),
    ("hilar_mass", "Stable appearance of the left hilar mass.", "LL=pos/left", False, None),
    ("rll_mass", "There is a 2 cm mass in the right lower lobe.", "LL=pos/right", False, None),
    ("to_suggest", "No focal consolidation to suggest pneumonia.", "CO=neg PN=neg", False, None),
    ("overt_edema", "Prominence of the pulmonary vasculature without overt edema.", "ED=neg", False, None),
    ("fluid_overload", "Findings compatible with mild fluid overload.", "ED=pos", False, None),
    ("hiatal_hernia", "Moderate-sized hiatal hernia.", "", False, None),
    ("stimulator_leads", "Spinal stimulator leads project over the thoracic spine.", "SD=pos", False, None),
    ("chronic_cm", "No acute cardiopulmonary process. Chronic mild cardiomegaly.", "CM=pos", False, None),
    ("no_radiographic", "No radiographic evidence of pneumonia.", "PN=neg", False, None),
    ("no_congestion", "No pulmonary vascular congestion or edema.", "ED=neg", False, None),
    (
        "trace_vs_thickening",
        "Possible trace left pleural effusion versus pleural thickening.",
        "PE=unc/left PO=unc/left",
        False,
        None,
    ),
    ("if_present", "Right pleural effusion is small, if present.", "PE=unc/right", False, None),
    ("free_intraperitoneal", "No evidence of free intraperitoneal air.", "", False, None),
    (
        "otherwise_clear",
        "Mildly enlarged heart with a small right effusion; otherwise the lungs are clear.",
        f"CM=pos PE=pos/right {CLEAR}",
        False,
        None,
    ),
    ("edema_improved", "Moderate pulmonary edema, improved from prior.", "ED=pos", False, None),
    ("not_resolved", "Pulmonary edema has improved but not resolved.", "ED=pos", False, None),
    (
        "not_significantly_changed",
        "Small left effusion is not significantly changed.",
        "PE=pos/left",
        False,
        None,
    ),
    (
        "nodule_not_seen",
        "The previously seen nodule is not seen on the current study.",
        "LL=neg",
        False,
        None,
    ),
    ("no_significant_change", "Compared to ___, no significant change.", "", False, None),
    ("swan_ganz", "Swan-Ganz catheter tip in the right pulmonary artery.", "SD=pos", False, None),
    ("cordis", "Right IJ Cordis terminates in the SVC.", "SD=pos", False, None),
    ("chest_wall_pacer", "Left chest wall pacer with leads in standard position.", "SD=pos", False, None),
    ("sternotomy_intact", "Median sternotomy wires are intact.", "SD=pos", False, None),
    ("aortic_knob", "Aortic knob calcification. Tortuous aorta.", "", False, None),
    (
        "hemidiaphragm_atelectasis",
        "Elevation of the right hemidiaphragm with adjacent atelectasis.",
        "AT=pos/right",
        False,
        None,
    ),
    (
        "bibasilar_three_way",
        "Bibasilar opacities, left greater than right, may reflect atelectasis, aspiration, or pneumonia.",
        "LO=pos/bilateral AT=unc/bilateral PN=unc/bilateral",
        False,
        None,
    ),
    (
        "four_sentences",
        "There is mild pulmonary edema. No large pleural effusion. No pneumothorax. Mild cardiomegaly.",
        "ED=pos PE=neg PX=neg CM=pos",
        False,
        None,
    ),
    ("vascular_congestion_short", "Mild pulmonary vascular congestion", "ED=unc", False, None),  # CheXpert
    ("markings_accentuated", "Low lung volumes accentuate the bronchovascular markings.", "", False, None),
    (
        "top_normal_in_size",
        "Lungs are clear without consolidation. No effusion. The cardiac silhouette is top-normal in size.",
        f"{CLEAR} PE=neg CM=neg",
        False,
        None,
    ),
    ("borderline_enlarged", "Heart size is borderline enlarged.", "CM=unc", False, None),
    ("fracture_not_excluded", "Rib fractures cannot be excluded.", "FR=unc", False, None),
    (
        "fracture_if_pain",
        "No evidence of rib fracture; however, if there is persistent pain, dedicated rib views may be obtained.",
        "FR=neg",
        False,
        None,
    ),
    ("without_edema", "Stable cardiomegaly without pulmonary edema.", "CM=pos ED=neg", False, None),
    ("ptx_not_excluded", "A small pneumothorax is not excluded.", "PX=unc", False, None),
    ("cannot_rule_out_effusion", "Cannot rule out small effusion.", "PE=unc", False, None),
    ("angles_free", "The costophrenic angles are free of fluid.", "PE=neg", False, None),
    # --- VLM answers ---------------------------------------------------------------------------
    ("verdict_list", VERDICT_LIST, "AT=neg CM=pos PE=neg PX=neg ED=unc", False, None),
    ("think_block", THINK_ANSWER, "PN=pos/left LO=pos/left", False, None),
    ("think_cant_see", THINK_CANT_SEE, "CM=pos PX=neg", False, None),
    (
        "json_statuses",
        '{"Atelectasis": "negative", "Cardiomegaly": "positive", "Pleural Effusion": "uncertain", "Pneumothorax": "absent"}',
        "AT=neg CM=pos PE=unc PX=neg",
        False,
        None,
    ),
    (
        "json_booleans",
        '{"findings": {"cardiomegaly": true, "pleural_effusion": false, "pneumothorax": false}}',
        "CM=pos PE=neg PX=neg",
        False,
        None,
    ),
    ("json_list", '{"diagnosis": ["Cardiomegaly", "Pleural Effusion"]}', "CM=pos PE=pos", False, None),
    ("step_answer", STEP_ANSWER, "CM=pos LO=pos/right PE=neg PN=unc/right", False, None),
    (
        "refusal_plain",
        "I'm not able to provide a medical diagnosis from this image. Please consult a radiologist.",
        "NF=abs",
        True,
        True,
    ),
    (
        "refusal_then_reading",
        "As an AI, I can't provide medical diagnoses, but I can describe what I see: the heart appears enlarged and there is blunting of the left costophrenic angle, which could suggest a small pleural effusion. Please consult a radiologist for a definitive interpretation.",
        "CM=pos PE=unc/left",
        True,
        True,
    ),
    (
        "disclaimer_after_answer",
        "The chest X-ray shows bilateral patchy opacities, most prominent in the lower zones, consistent with pneumonia. There is no pleural effusion or pneumothorax.\n\n*Note: This interpretation is for educational purposes only; consult a radiologist.*",
        "LO=pos/bilateral PN=pos/bilateral PE=neg PX=neg",
        False,
        True,
    ),
    (
        "upper_case",
        "THE HEART IS ENLARGED. NO PNEUMOTHORAX. SMALL RIGHT PLEURAL EFFUSION.",
        "CM=pos PX=neg PE=pos/right",
        False,
        None,
    ),
    (
        "nbsp_en_dash",
        "Small left\u00a0pleural effusion \u2013 no pneumothorax.",
        "PE=pos/left PX=neg",
        False,
        None,
    ),
    (
        "curly_quotes_mimic",
        "The \u201cmass\u201d in the right upper lobe is likely a nipple shadow.",
        "LL=unc/right",
        False,
        None,
    ),
    (
        "curly_apostrophe_refusal",
        "I\u2019m sorry, but I can\u2019t help with interpreting medical images.",
        "NF=abs",
        True,
        None,
    ),
    (
        "bullet_dots",
        "\u2022 Cardiomegaly: present\n\u2022 Pleural effusion: absent\n\u2022 Pneumothorax: absent",
        "CM=pos PE=neg PX=neg",
        False,
        None,
    ),
    ("markdown_table", TABLE_ANSWER, "AT=pos/left PE=neg PX=neg CM=pos", False, None),
    ("dash_list", DASH_LIST, "AT=pos/right PE=neg CO=neg", False, None),
    ("right_gt_left_symbol", "Bilateral pleural effusions, right > left.", "PE=pos/bilateral", False, None),
    (
        "left_sided_ptx",
        "There is a left-sided pneumothorax with a visible pleural line.",
        "PX=pos/left",
        False,
        None,
    ),
    ("both_lungs", "Opacity in both lungs suggests pulmonary edema.", "LO=pos/bilateral ED=unc", False, None),
    ("single_letter_l", "Small L pleural effusion, no PTX.", "PE=pos/left PX=neg", False, None),
    ("single_letter_r", "R lower lobe consolidation.", "CO=pos/right", False, None),
    ("left_hemithorax", "The left hemithorax is completely opacified.", "LO=pos/left", False, None),
    ("long_answer", LONG_ANSWER, "PN=pos/right", False, None),
    (
        "numbered_markdown",
        NUMBERED_MARKDOWN,
        "CM=pos LO=pos/bilateral ED=unc PE=pos/bilateral SD=neg",
        False,
        None,
    ),
    (
        "normal_with_disclaimer",
        "No acute findings. The lungs are clear, heart size normal, no effusion.\n\nDisclaimer: I am not a doctor; please have a healthcare professional review.",
        f"{CLEAR} CM=neg PE=neg",
        False,
        True,
    ),
    (
        "answer_parenthesis",
        "Answer: Pneumonia (right lower lobe). Confidence: moderate.",
        "PN=pos/right",
        False,
        None,
    ),
    (
        "rather_than_bold",
        "The findings are most consistent with **pulmonary edema** rather than pneumonia.",
        "ED=pos PN=neg",
        False,
        None,
    ),
    (
        "diagnosis_semicolon",
        "Diagnosis: Cardiomegaly with mild pulmonary vascular congestion; no focal consolidation.",
        "CM=pos ED=unc CO=neg",  # CheXpert: vascular congestion is uncertain edema
        False,
        None,
    ),
    ("cannot_see_any", "I cannot see any evidence of pneumothorax.", "PX=neg", False, None),
    ("dont_see", "I don't see any signs of pneumonia or effusion.", "PN=neg PE=neg", False, None),
    (
        "no_signs_list",
        "There are no signs of cardiomegaly, edema, or effusion.",
        "CM=neg ED=neg PE=neg",
        False,
        None,
    ),
    (
        "angles_blunted_bilaterally",
        "The costophrenic angles are blunted bilaterally, suggesting small effusions.",
        "PE=unc/bilateral",
        False,
        None,
    ),
    (
        "organ_colon_lines",
        "Heart: normal size. Lungs: clear. Pleura: no effusion or pneumothorax. Bones: no fracture.",
        f"CM=neg {CLEAR} PE=neg PX=neg FR=neg",
        False,
        None,
    ),
    (
        "lingula_versus",
        "Impression: Findings could represent early pneumonia versus atelectasis in the lingula.",
        "PN=unc/left AT=unc/left",
        False,
        None,
    ),
    (
        "mediastinum_not_widened",
        "Mild cardiomegaly is present. There is no edema. The mediastinum is not widened.",
        "CM=pos ED=neg EC=neg",
        False,
        None,
    ),
    (
        "et_ng_tilde",
        "The ET tube is appropriately positioned, ~5 cm above the carina, and the NG tube tip is in the stomach.",
        "SD=pos",
        False,
        None,
    ),
    ("no_lines_tubes", "No lines or tubes are seen.", "SD=neg", False, None),
    ("ground_glass_both", "Both lungs show diffuse ground-glass opacities.", "LO=pos/bilateral", False, None),
    (
        "possible_infiltrate_correlation",
        "Possible right middle lobe infiltrate; clinical correlation recommended.",
        "LO=unc/right",
        False,
        True,
    ),
    ("elevated_hemidiaphragm", "The right hemidiaphragm is elevated.", "", False, None),
    (
        "negative_positive_labels",
        "Negative: no effusion, no pneumothorax. Positive: mild cardiomegaly.",
        "PE=neg PX=neg CM=pos",
        False,
        None,
    ),
    (
        "assessment_en_dash",
        "Assessment \u2014 Left lower lobe pneumonia with a small parapneumonic effusion.",
        "PN=pos/left PE=pos/left",
        False,
        None,
    ),
    ("quoted_no_finding", 'Final Answer: "No Finding"', "", False, None),
    ("normal_xray", "Final answer: Normal chest X-ray.", "", False, None),
    ("ptx_left_paren", "Diagnosis: Pneumothorax (left), no mediastinal shift.", "PX=pos/left", False, None),
    ("fifth_rib", "Fracture of the left 5th rib is noted.", "FR=pos/left", False, None),
    ("clavicle", "Old healed fracture of the right clavicle.", "FR=pos/right", False, None),
    (
        "combination",
        "Findings likely represent a combination of atelectasis and effusion.",
        "AT=unc PE=unc",
        False,
        None,
    ),
    (
        "persistent_effusion",
        "No new consolidation. Persistent small left effusion.",
        "CO=neg PE=pos/left",
        False,
        None,
    ),
    (
        "lung_fields_clear",
        "The lung fields are clear, no evidence of consolidation, effusion or pneumothorax, no cardiomegaly.",
        f"{CLEAR} PE=neg PX=neg CM=neg",
        False,
        None,
    ),
    (
        "normal_review",
        "This chest X-ray appears normal, with no evidence of active disease. However, please have it reviewed by a board-certified radiologist.",
        "",
        False,
        True,
    ),
    (
        "ai_if_concerns",
        "As an AI language model, I cannot diagnose medical conditions. If you have concerns about pneumonia, please see a doctor.",
        "NF=abs",
        True,
        None,
    ),
    (
        "organ_verdicts_slash",
        "Cardiomegaly: Yes / Atelectasis: No / Edema: No",
        "CM=pos AT=neg ED=neg",
        False,
        None,
    ),
    (
        "impression_h3",
        "### Impression\n1. Right upper lobe consolidation, concerning for pneumonia.\n2. No pneumothorax.",
        "CO=pos/right PN=unc/right PX=neg",
        False,
        None,
    ),
    ("edema_label_mild", "Edema: mild, bilateral perihilar.", "ED=pos", False, None),
    ("consolidation_present_in", "Consolidation: present in the left lower lobe", "CO=pos/left", False, None),
    ("effusion_small_right", "Pleural effusion: small, right-sided", "PE=pos/right", False, None),
    ("ptx_none", "Pneumothorax: none", "PX=neg", False, None),
    (
        "differential_includes",
        "The findings are nonspecific; differential includes pneumonia, aspiration, or atelectasis.",
        "PN=unc AT=unc",
        False,
        None,
    ),
    ("clear_stable_cm", "Lungs are clear. Cardiomegaly is stable.", f"{CLEAR} CM=pos", False, None),
    (
        "ptx_fracture_right",
        "There is no evidence of pneumothorax or rib fracture on the right.",
        "PX=neg/right FR=neg/right",
        False,
        None,
    ),
    (
        "ptx_rightward_shift",
        "There is a moderate left pneumothorax with slight rightward mediastinal shift.",
        "PX=pos/left",
        False,
        None,
    ),
    ("step_dashes", STEP_DASHES, "PX=neg CM=neg CO=pos/right", False, None),
    ("bullet_findings", BULLET_FINDINGS, "PE=pos/left AT=pos/right PX=neg", False, None),
    ("colon_list", COLON_LIST, "CM=pos PE=pos/bilateral PX=neg FR=neg", False, None),
    (
        "bold_final",
        "Final diagnosis: **Cardiomegaly** and **left pleural effusion**.",
        "CM=pos PE=pos/left",
        False,
        None,
    ),
    (
        "no_acute_disclaimer",
        "**Answer:** No acute abnormality. *Disclaimer: Always consult a qualified radiologist.*",
        "",
        False,
        True,
    ),
    ("em_dash_absent", "Pneumothorax \u2014 absent.", "PX=neg", False, None),
    ("en_dash_left_small", "Pleural effusion \u2013 left, small.", "PE=pos/left", False, None),
    ("opacification_hemithorax", "Opacification of the left hemithorax.", "LO=pos/left", False, None),
    ("both_lung_bases", "Air-space opacity in both lung bases.", "LO=pos/bilateral", False, None),
    (
        "lucency_without_markings",
        "There is a subtle lucency at the right apex without visible lung markings, which might indicate a small pneumothorax.",
        "PX=unc/right",
        False,
        None,
    ),
    (
        "clear_bilaterally_normal_heart",
        "The image demonstrates clear lungs bilaterally without effusion or pneumothorax. Normal heart size.",
        f"{CLEAR} PE=neg PX=neg CM=neg",
        False,
        None,
    ),
    ("surgical_clips", "There are surgical clips in the right upper quadrant.", "SD=pos", False, None),
    # --- second round (held out from the first round's fixes) ---------------------------------
    ("r2_normal_mimic", NORMAL_MIMIC2, "CO=neg PE=neg PX=neg CM=neg EC=neg", False, None),
    (
        "r2_chf_compressive",
        "Heart size is mildly enlarged. There is mild pulmonary edema with small bilateral pleural effusions. Bibasilar opacities likely reflect compressive atelectasis, though superimposed infection cannot be excluded.",
        "CM=pos ED=pos PE=pos/bilateral LO=pos/bilateral AT=unc/bilateral PN=unc/bilateral",
        False,
        None,
    ),
    (
        "r2_picc_cavoatrial",
        "Left PICC line tip terminates in the region of the cavoatrial junction. Otherwise, no change.",
        "SD=pos",
        False,
        None,
    ),
    (
        "r2_chest_tube_ptx",
        "There has been interval placement of a right-sided chest tube with decrease in size of the right pneumothorax, now small.",
        "SD=pos PX=pos/right",
        False,
        None,
    ),
    ("r2_ptx_larger", "Small right pneumothorax is slightly larger.", "PX=pos/right", False, None),
    (
        "r2_well_expanded",
        "Lungs are well expanded and clear. Hilar and mediastinal contours are normal. No pleural effusion.",
        f"{CLEAR} EC=neg PE=neg",
        False,
        None,
    ),
    (
        "r2_otherwise_unremarkable",
        "Mild left basilar atelectasis. Otherwise unremarkable.",
        "AT=pos/left",
        False,
        None,
    ),
    (
        "r2_ett_withdrawal",
        "Endotracheal tube tip is 2 cm above the carina; recommend withdrawal by 2 cm.",
        "SD=pos",
        False,
        None,
    ),
    ("r2_ng_coiled", "The nasogastric tube is coiled in the esophagus.", "SD=pos", False, None),
    (
        "r2_scarring",
        "Opacity at the right lung base is unchanged and likely represents scarring.",
        "LO=pos/right",
        False,
        None,
    ),
    ("r2_multifocal_worse", "Interval worsening of multifocal pneumonia.", "PN=pos", False, None),
    (
        "r2_thoracentesis",
        "No pneumothorax following thoracentesis. Small residual left pleural effusion.",
        "PX=neg PE=pos/left",
        False,
        None,
    ),
    (
        "r2_ild_or_infection",
        "Diffuse interstitial opacities are again seen, which may reflect chronic interstitial lung disease or atypical infection.",
        "LO=pos PN=unc",
        False,
        None,
    ),
    ("r2_hernia_no_pna", "Moderate hiatal hernia. No evidence of pneumonia.", "PN=neg", False, None),
    (
        "r2_post_obstructive",
        "Right upper lobe mass with post-obstructive atelectasis.",
        "LL=pos/right AT=pos/right",
        False,
        None,
    ),
    (
        "r2_elevated_left",
        "Elevated left hemidiaphragm with left basilar atelectasis.",
        "AT=pos/left",
        False,
        None,
    ),
    ("r2_dense_retrocardiac", "Dense retrocardiac consolidation.", "CO=pos/left", False, None),
    (
        "r2_aspiration_or_pna",
        "There is a new left retrocardiac opacity, which is concerning for aspiration or pneumonia.",
        "LO=pos/left PN=unc/left",
        False,
        None,
    ),
    (
        "r2_not_clearly_seen",
        "Possible small right apical pneumothorax, not clearly seen on the lateral view.",
        "PX=unc/right",
        False,
        None,
    ),
    (
        "r2_supine_difficult",
        "No pneumothorax is identified on this supine radiograph, although a small anterior pneumothorax would be difficult to exclude.",
        "PX=unc",
        False,
        None,
    ),
    ("r2_standard_position", "Lines and tubes are in standard position.", "SD=pos", False, None),
    ("r2_extubation_ng", "Interval extubation. NG tube remains in place.", "SD=pos", False, None),
    ("r2_extubated", "The patient has been extubated.", "SD=neg", False, None),
    (
        "r2_lobectomy",
        "Status post left upper lobectomy with volume loss in the left hemithorax.",
        "",  # CheXpert: volume loss is not atelectasis
        False,
        None,
    ),
    ("r2_hemidiaphragm", "Marked elevation of the right hemidiaphragm.", "", False, None),
    ("r2_degenerative", "Mild degenerative changes of the thoracic spine.", "", False, None),
    ("r2_scoliosis", "Severe scoliosis limits evaluation.", "", False, None),
    (
        "r2_possible_fracture",
        "Possible nondisplaced fracture of the left seventh rib.",
        "FR=unc/left",
        False,
        None,
    ),
    (
        "r2_multiple_fractures",
        "Multiple bilateral rib fractures, some of which are healing.",
        "FR=pos/bilateral",
        False,
        None,
    ),
    ("r2_no_acute_fracture", "There is no acute fracture.", "FR=neg", False, None),
    (
        "r2_decreased_size",
        "Right pleural effusion has decreased in size, now small to moderate.",
        "PE=pos/right",
        False,
        None,
    ),
    (
        "r2_blunting_thickening",
        "Blunting of the left costophrenic angle is unchanged, likely due to pleural thickening.",
        "PO=unc/left",
        False,
        None,
    ),
    (
        "r2_present_with_adjacent",
        "Small bilateral pleural effusions are present with adjacent atelectasis.",
        "PE=pos/bilateral AT=pos/bilateral",
        False,
        None,
    ),
    ("r2_no_edema", "There is no pulmonary edema.", "ED=neg", False, None),
    ("r2_addendum", ADDENDUM, f"PX=pos/left {CLEAR} PE=neg", False, None),
    ("r2_observations_md", OBS_MD, f"{CLEAR} LL=neg CM=neg PE=neg PX=neg FR=neg", False, None),
    ("r2_most_likely_lll", LLL, "PN=unc/left LO=pos/left CO=pos/left", False, None),
    (
        "r2_ctr",
        "The image shows an enlarged heart (cardiomegaly) with a cardiothoracic ratio greater than 0.5.",
        "CM=pos",
        False,
        None,
    ),
    (
        "r2_appears_right_side",
        "There appears to be a small pleural effusion on the right side.",
        "PE=pos/right",
        False,
        None,
    ),
    ("r2_no_comma_answer", "No, there is no pneumothorax visible on this image.", "PX=neg", False, None),
    (
        "r2_yes_comma_answer",
        "Yes, there is evidence of pleural effusion on the left.",
        "PE=pos/left",
        False,
        None,
    ),
    ("r2_multiple_choice", "The answer is B) Pneumothorax.", "PX=pos", False, None),
    (
        "r2_difficult_to_say",
        "It's difficult to say definitively, but there may be some mild pulmonary edema.",
        "ED=unc",
        False,
        None,
    ),
    (
        "r2_followup_ct",
        "I would recommend a follow-up CT scan to further evaluate the nodule in the right upper lobe.",
        "LL=pos/right",
        False,
        None,
    ),
    (
        "r2_chf_signs",
        "Final Answer: The chest X-ray shows signs of congestive heart failure, including cardiomegaly, pulmonary vascular congestion, and bilateral pleural effusions.",
        "ED=pos CM=pos PE=pos/bilateral",
        False,
        None,
    ),
    (
        "r2_ctr_less",
        "There is no evidence of cardiomegaly; the cardiothoracic ratio is less than 50%.",
        "CM=neg",
        False,
        None,
    ),
    (
        "r2_trachea_deviated",
        "The trachea is deviated to the right, which could suggest volume loss in the right lung.",
        "",  # CheXpert: volume loss is not atelectasis
        False,
        None,
    ),
    (
        "r2_list14",
        LIST14,
        "AT=pos/left CM=neg CO=neg ED=neg EC=neg FR=neg LL=neg LO=pos/left PE=neg PO=neg PN=neg PX=neg SD=neg",
        False,
        None,
    ),
    (
        "r2_json_numbers",
        '{"Atelectasis": 0, "Cardiomegaly": 1, "Pleural Effusion": -1, "Pneumothorax": 0}',
        "AT=neg CM=pos PE=unc PX=neg",
        False,
        None,
    ),
    ("r2_num_dash", NUM_DASH, "CM=pos ED=neg PE=pos/left", False, None),
    ("r2_think2", THINK2, "PE=pos/left CM=neg", False, None),
    (
        "r2_cannot_determine_whether",
        "The X-ray is of poor quality, so I cannot determine whether there is a pneumothorax.",
        "PX=unc",
        False,
        None,
    ),
    (
        "r2_sorry_cant_determine",
        "Sorry, I can't determine that from the image provided.",
        "NF=abs",
        True,
        None,
    ),
    (
        "r2_unable_determine",
        "I'm unable to determine the presence of pneumonia without clinical information.",
        "NF=abs",
        True,
        None,
    ),
    (
        "r2_unfortunately",
        "Unfortunately, I cannot provide a diagnosis based on this image alone. However, I can note that there appears to be an opacity in the right lower lobe.",
        "LO=pos/right",
        True,
        None,
    ),
    (
        "r2_not_present_seen",
        "Cardiomegaly is not present. Effusion is not seen. No pneumothorax.",
        "CM=neg PE=neg PX=neg",
        False,
        None,
    ),
    (
        "r2_perihilar_dash",
        "There's a subtle haziness in the left perihilar region \u2014 possibly early edema or infection.",
        "LO=pos/left ED=unc PN=unc/left",
        False,
        None,
    ),
    ("r2_key_findings", KEY, "CO=pos/bilateral PE=pos/right PN=pos/bilateral", False, None),
    (
        "r2_no_infiltrates_masses",
        "The lungs show no infiltrates, masses, or nodules.",
        "LO=neg LL=neg",
        False,
        None,
    ),
    (
        "r2_heart_mediastinum_colon",
        "Heart: enlarged. Mediastinum: normal width.",
        "CM=pos EC=neg",
        False,
        None,
    ),
    (
        "r2_impression_mild_cm",
        "IMPRESSION: Mild cardiomegaly. No acute cardiopulmonary process.",
        "CM=pos",
        False,
        None,
    ),
    ("r2_picc_good", "No acute cardiopulmonary process. Right PICC in good position.", "SD=pos", False, None),
    (
        "r2_organs_colon2",
        "Lungs: Clear bilaterally. Heart: Normal size. Pleura: Sharp costophrenic angles.",
        f"{CLEAR} CM=neg PE=neg",
        False,
        None,
    ),
    (
        "r2_long_sentence",
        "Lungs are clear, no pleural effusion or pneumothorax is seen; heart size is within normal limits, and there are no acute osseous abnormalities.",
        f"{CLEAR} PE=neg PX=neg CM=neg",
        False,
        None,
    ),
    (
        "r2_nipple_or_nodule",
        "There is a rounded opacity in the left mid lung, which could represent a nodule or a nipple shadow; recommend repeat with nipple markers.",
        "LO=pos/left LL=unc/left",
        False,
        None,
    ),
    ("r2_qa_ptx", "Q: Is there a pneumothorax?\nA: No.", "PX=neg", False, None),
    ("r2_question_yes", "Is there cardiomegaly? Yes, the heart is enlarged.", "CM=pos", False, None),
    (
        "r2_question_possibly",
        "Could this be pneumonia? Possibly, given the right lower lobe opacity.",
        "PN=unc/right LO=pos/right",
        False,
        None,
    ),
    ("r2_question_no", "Are there any signs of pneumothorax? No.", "PX=neg", False, None),
    (
        "r2_white_lung",
        "The left lung is completely white, consistent with a large left pleural effusion or complete collapse.",
        "PE=unc/left AT=unc/left",
        False,
        None,
    ),
    (
        "r2_cp_angle_blunted",
        "The right costophrenic angle is blunted.",
        "",
        False,
        None,
    ),  # CheXpert: a sign only
    ("r2_moderate_in_size", "Left-sided pleural effusion, moderate in size.", "PE=pos/left", False, None),
    ("r2_r_ptx_l_eff", "R pneumothorax, L effusion.", "PX=pos/right PE=pos/left", False, None),
    ("r2_l_gt_r", "Effusion: L > R", "PE=pos/bilateral", False, None),
    ("r2_ptx_pna_abbrev", "No PTX. No PNA.", "PX=neg PN=neg", False, None),
    (
        "r2_abbrev_devices",
        "ETT 4 cm above carina. OGT in stomach. R IJ CVL tip in SVC.",
        "SD=pos",
        False,
        None,
    ),
    ("r2_no_chf", "Mild cardiomegaly; no CHF.", "CM=pos ED=neg", False, None),
    ("r2_upper_normal", "Cardiac silhouette is upper normal in size.", "CM=neg", False, None),
    ("r2_normal_to_mild", "Heart size is normal to mildly enlarged.", "CM=unc", False, None),
    (
        "r2_atelectasis_vs_scarring",
        "Minimal atelectasis versus scarring at the left base.",
        "AT=unc/left LO=unc/left",
        False,
        None,
    ),
    ("r2_post_surgical", "Stable post-surgical changes in the right hemithorax.", "", False, None),
    ("r2_chronic_blunting", "Chronic blunting of the right costophrenic angle.", "", False, None),  # CheXpert
    (
        "r2_however_small",
        "No evidence of pneumonia. There is, however, a small left effusion.",
        "PN=neg PE=pos/left",
        False,
        None,
    ),
    ("r2_heart_not_enlarged", "The heart is not enlarged.", "CM=neg", False, None),
    (
        "r2_enlarged_but",
        "The heart is enlarged, but there is no pulmonary edema.",
        "CM=pos ED=neg",
        False,
        None,
    ),
    (
        "r2_left_no_right_yes",
        "There is no pleural effusion on the left; a small effusion is present on the right.",
        "PE=pos/right",
        False,
        None,
    ),
    (
        "r2_no_longer_visualized",
        "Right-sided pleural effusion is no longer visualized.",
        "PE=neg/right",
        False,
        None,
    ),
    ("r2_pleural_other_name", "Pleural Other: Yes (right apical cap)", "PO=pos/right", False, None),
    ("r2_support_devices_present", "Support Devices: Present\nNo Finding: No", "SD=pos", False, None),
    ("r2_heart_size_colon_mild", "Heart size: mildly enlarged.", "CM=pos", False, None),
    ("r2_effusion_trace", "Trace left pleural effusion.", "PE=pos/left", False, None),
    ("r2_loculated", "Loculated right pleural fluid collection.", "PE=pos/right", False, None),
    ("r2_hydropneumothorax", "Left hydropneumothorax.", "PX=pos/left PE=pos/left", False, None),
    ("r2_no_focal_airspace", "No focal airspace consolidation.", "CO=neg", False, None),
    (
        "r2_emphysema_bullae",
        "Emphysematous changes with apical bullae. No pneumothorax.",
        "PX=neg",
        False,
        None,
    ),
    (
        "r2_mass_vs_consolidation",
        "Right hilar mass versus consolidation.",
        "LL=unc/right CO=unc/right",
        False,
        None,
    ),
    ("r2_nodule_in_lingula", "8 mm nodule projecting over the lingula.", "LL=pos/left", False, None),
    (
        "r2_consistent_with",
        "Right lower lobe consolidation consistent with pneumonia.",
        "CO=pos/right PN=pos/right",
        False,
        None,
    ),
    # --- third round (held out from the second round's fixes) ----------------------------------
    (
        "r3_ekg_leads_normal",
        "AP portable upright view of the chest. Overlying EKG leads are present. Lungs are clear. Heart size is normal. Mediastinal contour is normal. No pleural effusion or pneumothorax.",
        f"SD=pos {CLEAR} CM=neg EC=neg PE=neg PX=neg",
        False,
        None,
    ),
    (
        "r3_crowding_bases",
        "Lung volumes are low. There is crowding of the bronchovascular markings. Patchy opacities at the bases likely represent atelectasis.",
        "LO=pos/bilateral AT=unc/bilateral",
        False,
        None,
    ),
    (
        "r3_compressive",
        "Moderate to large right pleural effusion with associated compressive atelectasis, increased from prior.",
        "PE=pos/right AT=pos/right",
        False,
        None,
    ),
    ("r3_thoracic_inlet", "The endotracheal tube tip is at the thoracic inlet.", "SD=pos", False, None),
    (
        "r3_ij_catheter",
        "There is a right internal jugular catheter with tip in the proximal right atrium.",
        "SD=pos",
        False,
        None,
    ),
    (
        "r3_silhouettes_stable",
        "No focal consolidation is seen. There is no pleural effusion or pneumothorax. The cardiac and mediastinal silhouettes are stable.",
        "CO=neg PE=neg PX=neg",
        False,
        None,
    ),
    (
        "r3_retrocardiac_not_excluded",
        "Retrocardiac opacity is again seen, likely atelectasis; pneumonia is not excluded.",
        "LO=pos/left AT=unc/left PN=unc/left",
        False,
        None,
    ),
    ("r3_engorgement", "Pulmonary vascular engorgement with mild interstitial edema.", "ED=pos", False, None),
    ("r3_angle_not_visualized", "The left costophrenic angle is not well visualized.", "", False, None),
    (
        "r3_ards",
        "Severe bilateral airspace opacities, compatible with ARDS.",
        "LO=pos/bilateral",
        False,
        None,
    ),
    (
        "r3_clinical_setting",
        "Right basilar opacity, which could be atelectasis, aspiration, or pneumonia in the appropriate clinical setting.",
        "LO=pos/right AT=unc/right PN=unc/right",
        False,
        None,
    ),
    (
        "r3_pneumomediastinum",
        "Lucency along the left heart border may represent pneumomediastinum.",
        "",
        False,
        None,
    ),
    ("r3_subdiaphragmatic", "No subdiaphragmatic free air.", "", False, None),
    (
        "r3_pacer_leads_cm",
        "Cardiomegaly is moderate and unchanged. Left-sided pacemaker leads terminate in the right atrium and right ventricle.",
        "CM=pos SD=pos",
        False,
        None,
    ),
    (
        "r3_interval_increase",
        "Interval increase in moderate bilateral pleural effusions and bibasilar atelectasis.",
        "PE=pos/bilateral AT=pos/bilateral",
        False,
        None,
    ),
    ("r3_edema_improved", "Mild pulmonary edema has improved.", "ED=pos", False, None),
    ("r3_edema_nearly", "Pulmonary edema has nearly resolved.", "ED=pos", False, None),
    ("r3_no_definite_ptx", "No definite pneumothorax.", "PX=neg", False, None),
    ("r3_skin_fold", "Apparent left apical pneumothorax is likely a skin fold.", "PX=unc/left", False, None),
    ("r3_picc_not_well_seen", "Tip of the left-sided PICC is not well seen.", "SD=pos", False, None),
    (
        "r3_not_present_prior",
        "There is a small right apical pneumothorax, which was not present on the prior study.",
        "PX=pos/right",
        False,
        None,
    ),
    ("r3_decreased_bilaterally", "Effusions have decreased bilaterally.", "PE=pos/bilateral", False, None),
    (
        "r3_consult_not_doctor",
        "Based on my analysis, this chest X-ray shows signs consistent with pneumonia in the right lower lobe. However, I'm not a doctor, and you should consult a healthcare professional.",
        "PN=pos/right",
        False,
        True,
    ),
    ("r3_emoji", EMOJI_VERDICTS, "AT=pos CM=neg PE=pos/left", False, None),
    (
        "r3_bold_yes",
        "- Atelectasis: **Yes** (bibasilar)\n- Cardiomegaly: **No**",
        "AT=pos/bilateral CM=neg",
        False,
        None,
    ),
    ("r3_cross_not_seen", "**Pneumothorax**: \u274c Not seen", "PX=neg", False, None),
    (
        "r3_normal_impression",
        "The heart is of normal size and the lungs are clear. There is no evidence of pleural effusion, pneumothorax, or fracture. **Impression:** Normal chest radiograph.",
        f"CM=neg {CLEAR} PE=neg PX=neg FR=neg",
        False,
        None,
    ),
    ("r3_likely_confidence", "Likely diagnosis: Pneumonia (80% confidence).", "PN=unc", False, None),
    (
        "r3_differential_list",
        "Differential diagnosis:\n1. Pneumonia\n2. Atelectasis\n3. Pulmonary edema",
        "PN=unc AT=unc ED=unc",
        False,
        None,
    ),
    ("r3_caps_no", "There is NO pneumothorax.", "PX=neg", False, None),
    ("r3_bare_question", "Pneumothorax? No.", "PX=neg", False, None),
    (
        "r3_answer_yes_dash",
        "**Answer: Yes** \u2014 there is a left-sided pleural effusion.",
        "PE=pos/left",
        False,
        None,
    ),
    (
        "r3_not_certain",
        "I think there might be a small nodule in the right upper lobe, but I'm not certain.",
        "LL=unc/right",
        False,
        None,
    ),
    (
        "r3_does_not_show",
        "The X-ray does not show any signs of pneumonia, edema or effusion.",
        "PN=neg ED=neg PE=neg",
        False,
        None,
    ),
    ("r3_no_obvious", "No obvious abnormality detected.", "", False, None),
    ("r3_looks_normal", "Everything looks normal on this film.", "", False, None),
    (
        "r3_suspicious_mass",
        "There is an opacity in the right lung which is suspicious for a mass.",
        "LO=pos/right LL=unc/right",
        False,
        None,
    ),
    (
        "r3_covid",
        "Findings are consistent with COVID-19 pneumonia: bilateral peripheral ground-glass opacities.",
        "PN=pos/bilateral LO=pos/bilateral",
        False,
        None,
    ),
    ("r3_copd_no_acute", "Signs of hyperinflation suggest COPD; no acute findings.", "", False, None),
    (
        "r3_obscured_hemidiaphragm",
        "The right hemidiaphragm is obscured, suggesting right lower lobe consolidation or effusion.",
        "CO=unc/right PE=unc/right",
        False,
        None,
    ),
    (
        "r3_final_no_finding",
        "The lungs are clear and there is no pneumothorax.\n\n**Final answer: No Finding**",
        f"{CLEAR} PX=neg",
        False,
        None,
    ),
    (
        "r3_chf_paren",
        "Chest X-ray: cardiomegaly (CTR ~0.62), bilateral pleural effusions (R>L), and interstitial edema \u2014 consistent with congestive heart failure.",
        "CM=pos PE=pos/bilateral ED=pos",
        False,
        None,
    ),
    (
        "r3_healed_clavicle",
        "There is a fracture of the right clavicle (healed).",
        "FR=pos/right",
        False,
        None,
    ),
    ("r3_question_unlikely", "Possible fracture? Unlikely.", "FR=neg", False, None),
    ("r3_think_dashes", THINK_DASHES, "PE=pos/left AT=neg", False, None),
    (
        "r3_paren_numbered",
        "1) Lungs: clear.\n2) Heart: enlarged.\n3) Pleura: small right effusion.",
        f"{CLEAR} CM=pos PE=pos/right",
        False,
        None,
    ),
    (
        "r3_quality_then_findings",
        "Image quality: adequate. Rotation: minimal. Findings: a right-sided chest tube is present; no residual pneumothorax.",
        "SD=pos PX=neg",
        False,
        None,
    ),
    ("r3_l_gt_r_effusions", "Small L>R bilateral effusions.", "PE=pos/bilateral", False, None),
    ("r3_paren_r", "(R) lower lobe pneumonia.", "PN=pos/right", False, None),
    ("r3_rml", "Pneumonia in the right middle lobe (RML).", "PN=pos/right", False, None),
    ("r3_lll_abbrev", "LLL atelectasis.", "AT=pos/left", False, None),
    ("r3_rll_abbrev", "RLL consolidation, no effusion.", "CO=pos/right PE=neg", False, None),
    (
        "r3_two_sides",
        "Left lower lobe consolidation and right upper lobe nodule.",
        "CO=pos/left LL=pos/right",
        False,
        None,
    ),
    (
        "r3_no_residual_left",
        "Left-sided chest tube with no residual pneumothorax on the left.",
        "SD=pos PX=neg/left",
        False,
        None,
    ),
    (
        "r3_small_bilateral_trace",
        "Trace bilateral pleural effusions, unchanged.",
        "PE=pos/bilateral",
        False,
        None,
    ),
    (
        "r3_no_new_focal",
        "No new focal consolidation to suggest pneumonia. Chronic blunting of the left costophrenic angle.",
        "CO=neg PN=neg",  # CheXpert: blunting alone is not an effusion
        False,
        None,
    ),
    (
        "r3_lines_removed",
        "Interval removal of the right IJ line and nasogastric tube.",
        "SD=neg",
        False,
        None,
    ),
    ("r3_cm_borderline", "Borderline cardiomegaly.", "CM=unc", False, None),
    ("r3_heart_upper_limits", "The heart is at the upper limits of normal in size.", "CM=neg", False, None),
    (
        "r3_mild_edema_or_atypical",
        "Mild interstitial edema versus atypical infection.",
        "ED=unc PN=unc",
        False,
        None,
    ),
    # --- fourth round (held out from the third round's fixes) ----------------------------------
    (
        "r4_abcde",
        ABCDE_ANSWER,
        "LO=pos/right CO=pos/right AT=neg/left ED=neg PN=pos/right PX=neg CM=neg EC=neg PE=unc/right FR=neg",
        False,
        True,
    ),
    ("r4_normal_list", NORMAL_LIST_ANSWER, f"CM=neg {CLEAR} PE=neg PX=neg", False, None),
    ("r4_mimic_long", CHEST_TUBE_REPORT, "SD=pos PX=neg PE=pos/left AT=pos/left CM=pos ED=neg", False, None),
    ("r4_jsonish", FENCED_JSON_ANSWER, "AT=unc CM=pos ED=neg PE=pos/bilateral", False, None),
    ("r4_wandering", SELF_CORRECTING_ANSWER, "PX=neg CM=pos ED=unc", False, None),  # CheXpert: congestion
    (
        "r4_without_change",
        "Small bilateral pleural effusions without change.",
        "PE=pos/bilateral",
        False,
        None,
    ),
    ("r4_without_evidence", "Without evidence of pneumothorax or effusion.", "PX=neg PE=neg", False, None),
    ("r4_free_of_effusion", "The pleural spaces are free of effusion.", "PE=neg", False, None),
    ("r4_no_longer_tube", "The nasogastric tube is no longer present.", "SD=neg", False, None),
    (
        "r4_no_change_in_ptx",
        "No significant change in the small left apical pneumothorax.",
        "PX=pos/left",
        False,
        None,
    ),
    ("r4_neither_nor", "There is neither pleural effusion nor pneumothorax.", "PE=neg PX=neg", False, None),
    (
        "r4_rather_than_effusion",
        "The opacity likely represents pleural thickening rather than effusion.",
        "LO=pos PO=unc PE=neg",
        False,
        None,
    ),
    ("r4_excluded", "Pneumothorax has been excluded.", "PX=neg", False, None),
    (
        "r4_cannot_exclude_small",
        "A small left pleural effusion cannot be excluded.",
        "PE=unc/left",
        False,
        None,
    ),
    (
        "r4_suspicious_for",
        "Right upper lobe cavitary lesion, suspicious for tuberculosis.",
        "LL=pos/right",
        False,
        None,
    ),
    (
        "r4_right_heart_not_side",
        "Right heart border is obscured by a right middle lobe opacity.",
        "LO=pos/right",
        False,
        None,
    ),
    (
        "r4_right_sided_pacer",
        "Right-sided pacemaker with leads in the right ventricle. No effusion.",
        "SD=pos PE=neg",
        False,
        None,
    ),
    ("r4_both_costophrenic", "Both costophrenic angles are sharp.", "PE=neg/bilateral", False, None),
    (
        "r4_left_cp_blunted",
        "Left costophrenic angle blunting, likely small effusion.",
        "PE=unc/left",
        False,
        None,
    ),
    (
        "r4_mixed_case_json",
        "atelectasis: NO; CARDIOMEGALY: yes; effusion: No",
        "AT=neg CM=pos PE=neg",
        False,
        None,
    ),
    ("r4_curly_dont", "I don\u2019t see any pneumothorax or pleural effusion.", "PX=neg PE=neg", False, None),
    (
        "r4_nbsp_table",
        "|\u00a0Pneumothorax\u00a0|\u00a0Absent\u00a0|\n|\u00a0Cardiomegaly\u00a0|\u00a0Present\u00a0|",
        "PX=neg CM=pos",
        False,
        None,
    ),
    (
        "r4_hemithorax_white",
        "Complete opacification of the right hemithorax with tracheal deviation to the left.",
        "LO=pos/right",
        False,
        None,
    ),
    (
        "r4_not_excluded_fracture",
        "A nondisplaced rib fracture on the left is not excluded.",
        "FR=unc/left",
        False,
        None,
    ),
    (
        "r4_stable_nodule",
        "Stable 6 mm right lower lobe nodule, unchanged since ___.",
        "LL=pos/right",
        False,
        None,
    ),
    ("r4_evaluate_ptx", "Evaluate for pneumothorax.", "PX=unc", False, None),
    ("r4_bilateral_negative", "No bilateral pleural effusions.", "PE=neg/bilateral", False, None),
    (
        "r4_new_right_effusion",
        "New small right pleural effusion. Left effusion has resolved.",
        "PE=pos/right",
        False,
        None,
    ),
    ("r4_heart_big", "The heart looks big.", "CM=pos", False, None),
    ("r4_heart_normal_size_looks", "The heart looks normal in size.", "CM=neg", False, None),
    # --- request sections and findings on one line (found after the context-section change) ------
    (
        "one_line_sections",
        "INDICATION: Cough. FINDINGS: Small left pleural effusion. IMPRESSION: Small left effusion.",
        "PE=pos/left",
        False,
        None,
    ),
    (
        "one_line_technique",
        "Technique: PA and lateral. Findings: No pneumothorax. Cardiomegaly.",
        "PX=neg CM=pos",
        False,
        None,
    ),
    (
        "one_line_comparison",
        "Comparison: none. Impression: right lower lobe pneumonia.",
        "PN=pos/right",
        False,
        None,
    ),
    (
        "one_line_history",
        "History: fever, r/o pneumonia.  Findings: the lungs are clear.",
        CLEAR,
        False,
        None,
    ),
    (
        "indication_two_lines",
        "INDICATION: Cough.\nEvaluate for pneumonia.\n\nNo consolidation.",
        "CO=neg",
        False,
        None,
    ),
    ("question_heart_no", "Is the heart enlarged? No.", "CM=neg", False, None),
    ("question_heart_yes", "Is the heart enlarged? Yes.", "CM=pos", False, None),
    (
        "question_answer_no_then_finding",
        "Are the lungs clear? No, there is a right lower lobe opacity.",
        "LO=pos/right",
        False,
        None,
    ),
    ("question_possibly", "Is there a pneumothorax? Possibly.", "PX=unc", False, None),
    # --- fifth round (held out from the fourth round's fixes) -----------------------------------
    (
        "r5_no_left_sided_ptx",
        "There is no evidence of a left-sided pneumothorax.",
        "PX=neg/left",
        False,
        None,
    ),
    ("r5_hyperinflated_otherwise_clear", "Lungs: hyperinflated, otherwise clear.", CLEAR, False, None),
    (
        "r5_no_list_mild_cm",
        "No consolidation, effusion, or edema. Mild cardiomegaly.",
        "CO=neg PE=neg ED=neg CM=pos",
        False,
        None,
    ),
    (
        "r5_technique_related",
        "Possible mild interstitial edema, though this may be technique-related.",
        "ED=unc",
        False,
        None,
    ),
    (
        "r5_two_lobes",
        "Opacities in the right upper lobe and left lower lobe.",
        "LO=pos/bilateral",
        False,
        None,
    ),
    (
        "r5_ptx_decreased_tube",
        "Small right pneumothorax, decreased from prior, with right chest tube in place.",
        "PX=pos/right SD=pos",
        False,
        None,
    ),
    ("r5_picc_unchanged", "Unchanged position of the right PICC.", "SD=pos", False, None),
    ("r5_cvc_removed", "A right-sided central venous catheter has been removed.", "SD=neg", False, None),
    (
        "r5_interstitium",
        "There is mild prominence of the pulmonary interstitium, which could reflect mild edema.",
        "ED=unc",
        False,
        None,
    ),
    ("r5_enlarged_stable", "The cardiac silhouette is enlarged but stable.", "CM=pos", False, None),
    (
        "r5_less_likely",
        "Mild bibasilar opacities, likely atelectasis, less likely pneumonia.",
        "LO=pos/bilateral AT=unc/bilateral PN=unc/bilateral",
        False,
        None,
    ),
    ("r5_old_left_ribs", "Multiple old left rib fractures are again seen.", "FR=pos/left", False, None),
    ("r5_dobhoff_duodenum", "There is a Dobhoff tube with tip in the duodenum.", "SD=pos", False, None),
    (
        "r5_ett_advance",
        "The tip of the endotracheal tube is 6 cm above the carina. Consider advancing by 2 cm.",
        "SD=pos",
        False,
        None,
    ),
    ("r5_early_chf", "Findings concerning for early CHF.", "ED=unc", False, None),
    ("r5_no_chf", "No evidence of CHF.", "ED=neg", False, None),
    ("r5_biapical", "There is biapical pleural thickening.", "PO=pos/bilateral", False, None),
    (
        "r5_posterior_sulci",
        "Slight blunting of the posterior costophrenic sulci on the lateral view, which may represent small effusions.",
        "PE=unc",
        False,
        None,
    ),
    ("r5_diagnosis_normal", "Diagnosis: Normal. No abnormalities detected.", "", False, None),
    ("r5_findings_md", FINDINGS_MD, "CO=neg PE=neg CM=pos FR=pos/left", False, None),
    (
        "r5_mediastinal_shift",
        "The most striking finding is a large right-sided pleural effusion causing a mediastinal shift to the left.",
        "PE=pos/right",
        False,
        None,
    ),
    (
        "r5_no_sign_but",
        "There's no sign of pneumonia, but there is a small area of atelectasis at the right base.",
        "PN=neg AT=pos/right",
        False,
        None,
    ),
    ("r5_choice_c", "Answer: C. Pleural effusion", "PE=pos", False, None),
    (
        "r5_key_observations",
        "Key observations: (1) cardiomegaly; (2) bilateral pleural effusions; (3) no pneumothorax.",
        "CM=pos PE=pos/bilateral PX=neg",
        False,
        None,
    ),
    (
        "r5_cardiogenic",
        "Overall impression: mild pulmonary edema, likely cardiogenic.",
        "ED=pos",
        False,
        None,
    ),
    (
        "r5_i_can_see",
        "I can see the lungs are clear and the heart is normal.",
        f"{CLEAR} CM=neg",
        False,
        None,
    ),
    (
        "r5_definitive_diagnosis",
        "I cannot provide a definitive diagnosis, but the findings suggest pneumonia in the left lower lobe.",
        "PN=unc/left",
        False,
        True,
    ),
    (
        "r5_telegraphic",
        "No pneumothorax. No pleural effusion. Lungs clear. Heart normal. Impression: normal.",
        f"PX=neg PE=neg {CLEAR} CM=neg",
        False,
        None,
    ),
    ("r5_lungs_clear_short", "Lungs clear bilaterally.", CLEAR, False, None),
    (
        "r5_clear_lungs_no_ptx",
        "Heart size normal. Lungs clear. No effusion or pneumothorax.",
        f"CM=neg {CLEAR} PE=neg PX=neg",
        False,
        None,
    ),
    # --- qualified double negatives ("cannot be entirely excluded") --------------------------------
    (
        "entirely_excluded",
        "No evidence of pneumothorax; however, a small left apical pneumothorax cannot be entirely excluded.",
        "PX=unc/left",
        False,
        None,
    ),
    (
        "completely_exclude",
        "We cannot completely exclude a small right effusion.",
        "PE=unc/right",
        False,
        None,
    ),
    ("not_entirely_ruled_out", "Pneumonia is not entirely ruled out.", "PN=unc", False, None),
    ("definitively_exclude", "Cannot definitively exclude early pneumonia.", "PN=unc", False, None),
    ("osteopenia_semicolon", "Osteopenia; old healed rib fractures.", "FR=pos", False, None),
    # --- sixth round (held out from the fifth round's fixes) -------------------------------------
    ("r6_rationale_support", RATIONALE_SUPPORTS, "CM=pos PE=pos/bilateral ED=pos PX=neg", False, None),
    (
        "r6_rationale_wait",
        RATIONALE_RECHECK,
        "LO=pos/left AT=unc/left CO=unc/left PE=neg PN=neg/right ED=neg",
        False,
        None,
    ),
    ("r6_rationale_icu", RATIONALE_ICU, "SD=pos LO=pos/bilateral PE=neg CM=neg ED=unc", False, None),
    (
        "r6_supports_diagnosis",
        "The findings support the diagnosis of pneumonia in the right lower lobe.",
        "PN=pos/right",
        False,
        None,
    ),
    ("r6_ruled_out_ptx", "A pneumothorax has been ruled out.", "PX=neg", False, None),
    ("r6_no_evidence_any", "There is no evidence of any acute cardiopulmonary abnormality.", "", False, None),
    (
        "r6_mild_cm_likely_ap",
        "The heart appears mildly enlarged, although this may be exaggerated by the AP projection.",
        "CM=unc",
        False,
        None,
    ),
    (
        "r6_right_upper_zone",
        "A 2 cm rounded opacity is seen in the right upper zone, likely a nodule.",
        "LO=pos/right LL=unc/right",
        False,
        None,
    ),
    ("r6_wedge", "Wedge-shaped opacity in the left lower zone.", "LO=pos/left", False, None),
    (
        "r6_collapse_rul",
        "Right upper lobe collapse with elevation of the horizontal fissure.",
        "AT=pos/right",
        False,
        None,
    ),
    (
        "r6_no_fracture_visible",
        "No rib fractures are visible, although rib detail is limited.",
        "FR=neg",
        False,
        None,
    ),
    (
        "r6_mediastinal_widening_q",
        "Is there mediastinal widening? No, the mediastinum is normal in width.",
        "EC=neg",
        False,
        None,
    ),
    (
        "r6_effusion_answer_yes_right",
        "Is there a pleural effusion? Yes, on the right.",
        "PE=pos/right",
        False,
        None,
    ),
    (
        "r6_mixed_bullets",
        "\u2022 No pneumothorax\n\u2022 Small right effusion\n\u2022 Mild cardiomegaly",
        "PX=neg PE=pos/right CM=pos",
        False,
        None,
    ),
    ("r6_final_answer_list", "Final answer: Atelectasis, Pleural Effusion", "AT=pos PE=pos", False, None),
    ("r6_final_answer_none", "Final answer: None of the listed findings.", "", False, None),
    (
        "r6_json_bool_string",
        '{"pneumothorax": "no", "pneumonia": "yes", "side": "left"}',
        "PX=neg PN=pos/left",
        False,
        None,
    ),
    (
        "r6_edema_cephalization",
        "There is cephalization of the pulmonary vessels, suggesting early edema.",
        "ED=unc",
        False,
        None,
    ),
    ("r6_kerley_only", "Kerley B lines are present.", "ED=pos", False, None),
    (
        "r6_pleural_line_left",
        "A visceral pleural line is visible at the left apex.",
        "PX=pos/left",
        False,
        None,
    ),
    (
        "r6_deep_sulcus",
        "Deep sulcus sign on the right, concerning for pneumothorax on this supine film.",
        "PX=unc/right",
        False,
        None,
    ),
    ("r6_tubes_none", "Lines and tubes: none.", "SD=neg", False, None),
    ("r6_pacemaker_absent", "No pacemaker or other devices are seen.", "SD=neg", False, None),
    ("r6_scarring_apices", "Biapical scarring.", "LO=pos/bilateral", False, None),
    (
        "r6_granulomatous",
        "Calcified granulomas consistent with prior granulomatous disease.",
        "",  # CheXpert: granulomas are not Lung Lesion
        False,
        None,
    ),
    ("comparison_then_finding", "Comparison: none.\nThe heart is enlarged.", "CM=pos", False, None),
    ("history_then_bullet", "Clinical history: fever, r/o pneumonia.\n- Cardiomegaly", "CM=pos", False, None),
    (
        "indication_two_sentences",
        "INDICATION: ___ year old man with cough.\n Evaluate for pneumonia.\n\n FINDINGS: No consolidation.",
        "CO=neg",
        False,
        None,
    ),
    (
        "history_wrapped",
        "Clinical history: fever and cough,\nquestion pneumonia.\nFindings: No consolidation.",
        "CO=neg",
        False,
        None,
    ),
    # --- seventh round: one-word answers, "I don't think", negated normal statements ------------
    ("r7_yes_alone", "Yes.", "NF=abs", False, None),
    ("r7_no_alone", "No.", "NF=abs", False, None),
    ("r7_pneumonia_alone", "Pneumonia.", "PN=pos", False, None),
    ("r7_normal_alone", "Normal.", "", False, None),
    ("r7_answer_no_finding", "The answer is no finding.", "", False, None),
    ("r7_no_findings", "There are no findings.", "", False, None),
    ("r7_findings_none", "Findings: none.", "", False, None),
    ("r7_unremarkable", "Impression: Unremarkable chest radiograph.", "", False, None),
    ("r7_bilateral_infiltrates", "bilateral infiltrates", "LO=pos/bilateral", False, None),
    ("r7_percent_ptx", "Small left-sided pneumothorax (approximately 10%).", "PX=pos/left", False, None),
    (
        "r7_tension",
        "Right-sided tension pneumothorax with mediastinal shift to the left \u2014 this is a medical emergency.",
        "PX=pos/right",
        False,
        None,
    ),
    ("r7_mastectomy", "Evidence of prior left mastectomy.", "", False, None),
    (
        "r7_paren_grades",
        "Cardiomegaly (mild). Pulmonary edema (moderate). Effusions: small, bilateral.",
        "CM=pos ED=pos PE=pos/bilateral",
        False,
        None,
    ),
    (
        "r7_incidental_nodule",
        "No acute disease. Incidentally noted is a 5 mm nodule in the left lower lobe.",
        "LL=pos/left",
        False,
        None,
    ),
    (
        "r7_withdrawn",
        "There is an endotracheal tube, which terminates 1 cm above the carina and should be withdrawn.",
        "SD=pos",
        False,
        None,
    ),
    (
        "r7_lingula_rml",
        "Consolidation in the lingula and right middle lobe.",
        "CO=pos/bilateral",
        False,
        None,
    ),
    ("r7_ptx_small_paren", "Pneumothorax: small (left apical)", "PX=pos/left", False, None),
    (
        "r7_edema_none_effusion_trace",
        "Edema: none; effusion: trace on the right.",
        "ED=neg PE=pos/right",
        False,
        None,
    ),
    (
        "r7_lungs_not_clear",
        "The lungs are not clear; there is a left lower lobe opacity.",
        "LO=pos/left",
        False,
        None,
    ),
    ("r7_do_not_think", "I do not think there is a pneumothorax.", "PX=neg", False, None),
    ("r7_dont_think", "I don't think this is pneumonia.", "PN=neg", False, None),
    ("r7_i_think", "I think this is pneumonia.", "PN=pos", False, None),
    ("r7_no_clear_evidence", "There is no clear evidence of pneumonia.", "PN=neg", False, None),
    (
        "r7_however_widened",
        "Heart size is within normal limits; however, the mediastinum appears widened.",
        "CM=neg EC=pos",
        False,
        None,
    ),
]


def expected_labels_of(spec: str) -> dict[str, tuple[str, str | None]]:
    """Parse "PE=pos/left PX=neg" into observation -> (status, laterality), every observation filled."""
    return expected_labels(dict(item.partition("=")[::2] for item in spec.split()))


def test_the_table_is_big_and_ids_are_unique():
    assert len(CASES) >= 120
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("text", "spec", "refusal", "hedging"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_realistic_text(text, spec, refusal, hedging):
    result = label_text(text)
    got = {name: (label.status, label.laterality) for name, label in result.observations.items()}
    want = expected_labels_of(spec)
    wrong = {name: (got[name], want[name]) for name in OBSERVATIONS if got[name] != want[name]}
    assert not wrong, "observation: (got, expected)\n" + "\n".join(f"{k}: {v}" for k, v in wrong.items())
    assert result.is_refusal == refusal, [span.text for span in result.refusal]
    if hedging is not None:
        assert bool(result.hedging) == hedging, [span.text for span in result.hedging]
    assert result.error is None


def test_batch_labels_agree_with_label_text_on_the_table():
    texts = [case[1] for case in CASES]
    rows = label_texts(texts, processes=1).to_pylist()
    for case, row in zip(CASES, rows, strict=True):
        want = expected_labels_of(case[2])
        for name in OBSERVATIONS:
            assert (
                row[name] == {"positive": 1, "negative": 0, "uncertain": -1, "absent": None}[want[name][0]]
            ), (
                case[0],
                name,
            )
            assert row[f"{name} laterality"] == want[name][1], (case[0], name)


@pytest.mark.parametrize("value", [None, "", "   \n\t  ", "\u00a0\u00a0\n", b"", 42])
def test_empty_and_missing_inputs_are_absent_with_an_error(value):
    result = label_text(value)
    assert all(label.status == "absent" for label in result.observations.values())
    assert result.error


# Degenerate model output (a VLM stuck in a loop, a JSON dump, runs of quotes) in one long step. Each
# used to take quadratic time in the step's length (10-30 s at this size); now every walk from a
# mention is bounded, so each takes well under a second.
DEGENERATE = {
    "repeated_mention": ("effusion" + " " * 50) * 5200,
    "quote_runs": ('"effusion"' + '"' * 100) * 2700,
    "json_dump": "{" + ", ".join(f'"pleural_effusion_{i}": true' for i in range(9500)) + "}",
    "no_punctuation": "left lower lobe opacity possibly pneumonia versus atelectasis and " * 6000,
}


@pytest.mark.parametrize("name", sorted(DEGENERATE))
def test_degenerate_long_steps_are_labelled_in_linear_time(name):
    import time

    text = DEGENERATE[name]
    assert len(text) > 250_000
    started = time.process_time()
    result = label_text(text)
    elapsed = time.process_time() - started
    assert result.error is None
    assert result.observations["Pleural Effusion"].status != "absent" or name == "no_punctuation"
    assert elapsed < 5.0, f"{name}: {elapsed:.1f} s of CPU for {len(text)} characters"


@pytest.mark.parametrize(
    "text",
    [
        "Pneumonie im rechten Unterlappen.",
        "Les poumons sont clairs, pas d'anomalie.",
        "Neumonía en el lóbulo inferior derecho.",
        "诊断：右下肺炎。",
    ],
)
def test_answers_in_another_language_are_not_called_normal(text):
    result = label_text(text)
    assert all(label.status == "absent" for label in result.observations.values())
    assert result.error == "no English text recognised"
    [row] = label_texts([text], processes=1).to_pylist()
    assert row["No Finding"] is None and row["error"] == "no English text recognised"


def test_flexible_statements_dispatched_by_first_character_match_as_the_full_pattern():
    """The scan tries only the flexible statements that can start with the trigger's first character
    (matcher.Lexicon.flex_by_char); on every trigger of the table it finds what the full pattern finds."""
    from cxrmax.labeler import matcher
    from cxrmax.labeler.core import _DROP_SPACES, _lowered

    lexicon = matcher.LEXICON
    checked = 0
    for _id, text, *_rest in CASES:
        low = _lowered(text)
        for match in lexicon.pattern.finditer(low):
            word = match.group()
            key = word if word in lexicon.table else word.translate(_DROP_SPACES)
            if key not in lexicon.flex_keys:
                continue
            full = lexicon.flex_pattern.match(low, match.start())
            pattern = lexicon.flex_by_char.get(low[match.start()])
            split = pattern.match(low, match.start()) if pattern is not None else None
            assert (full and (full.span(), full.lastgroup)) == (split and (split.span(), split.lastgroup))
            checked += 1
    assert checked > 300
