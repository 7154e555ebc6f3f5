"""Mention phrases per observation, written for both radiology reports and chatbot-style answers.

Phrases are literal word sequences, matched case-insensitively on word boundaries. Inside a phrase a
space matches any run of spaces/hyphens/newlines and a hyphen matches an optional space or hyphen, so
"air-space disease" also finds "airspace disease" and "air space disease". A trailing "(s)" or "(es)"
adds the plural. The longest phrase wins at a position, which is how "pericardial effusion" (ignored)
beats "effusion" and "left ventricular enlargement" (Cardiomegaly) beats "left".

Definitions: each observation's vocabulary follows the CheXpert labeler's published mention and
unmention phrase lists (github.com/stanfordmlgroup/chexpert-labeler, MIT; see NOTICE), written here
as our own lists. Every deliberate deviation is in the one table of docs/labeler.md. In short:

- "collapse", "collapsed lung" -> Atelectasis ("volume loss" is not atelectasis).
- Lung Lesion: nodule, mass, nodular opacity/density, neoplasm, tumor, carcinoma, lump, lesion; not
  granuloma, "calcified nodule", nor lesions and masses of other organs (bone, thyroid, mediastinal ...).
- "air-space disease", "infiltrate", "density", "haziness" -> Lung Opacity only (Consolidation needs
  the word consolidation / consolidative / air bronchograms).
- "heart failure", "CHF" -> Edema; "vascular congestion", "pulmonary congestion", "vascular prominence",
  "indistinctness" -> Edema, uncertain unless a cue says more (UNCERTAIN_MENTIONS).
- Pleural Effusion: "effusion", "pleural fluid" (not "pericardial effusion"); costophrenic blunting
  alone asserts nothing (it only lends its side, SIDE_ONLY_SIGNS).
- Pneumonia: pneumonia, infection, infectious process; not granulomatous (TB, histoplasmosis) or prior
  infection.
- "hydropneumothorax" -> Pneumothorax and Pleural Effusion.
- tubes, lines, catheters, pacers and their leads, sternotomy wires, valves, stents -> Support Devices.
"""

from __future__ import annotations

import re

#: Literal mention phrases per observation ("No Finding" is derived, see core.py).
MENTIONS: dict[str, tuple[str, ...]] = {
    "Atelectasis": (
        "atelectasis",
        "atelectases",
        "atelectatic",
        "atelectatic change(s)",
        "collapse",
        "collapsed lobe",
        "lobar collapse",
        "lobe collapse",
        "lobe is collapsed",
        "lobe was collapsed",
        "lobe appears collapsed",
        "lobe remains collapsed",
        "lobe collapsed",
        "collapsed lung",
        "collapse of the lung",
        "segmental collapse",
        "subsegmental collapse",
        "plate-like atelectasis",
        "platelike atelectasis",
    ),
    "Cardiomegaly": (
        "cardiomegaly",
        "cardiac enlargement",
        "cardiac silhouette enlargement",
        "enlarged heart",
        "enlargement of the heart",
        "enlarged cardiac silhouette",
        "enlargement of the cardiac silhouette",
        "enlarged heart size",
        "enlarged cardiac size",
        "enlarged cardiac shadow",
        "increased heart size",
        "increased cardiac size",
        "increase in heart size",
        "increase in the heart size",
        "increase in cardiac size",
        "increase in size of the cardiac silhouette",
        "interval increase in heart size",
        "interval increase in the heart size",
        "interval increase in cardiac size",
        "interval increase in size of the cardiac silhouette",
        "large heart",
        "large cardiac silhouette",
        "prominent heart",
        "prominent cardiac silhouette",
        "heart enlargement",
        "left ventricular enlargement",
        "right ventricular enlargement",
        "biventricular enlargement",
        "ventricular enlargement",
        "cardiomegalic",
        "globular heart",
    ),
    "Consolidation": (
        "consolidation(s)",
        "consolidative",
        "consolidated",
        "consolidative opacity",
        "consolidative opacities",
        "mass-like consolidation",
        "air bronchogram(s)",
    ),
    "Edema": (
        "edema",
        "oedema",
        "pulmonary edema",
        "interstitial edema",
        "alveolar edema",
        "vascular congestion",
        "pulmonary vascular congestion",
        "pulmonary venous congestion",
        "venous congestion",
        "pulmonary congestion",
        "chf",
        "congestive heart failure",
        "heart failure",
        "vascular prominence",
        "pulmonary vascular prominence",
        "indistinctness",
        "fluid overload",
        "fluid in the lungs",
        "fluid in the lung",
        "vascular engorgement",
        "pulmonary vascular engorgement",
        "volume overload",
    ),
    "Enlarged Cardiomediastinum": (
        "enlarged cardiomediastinum",
        "enlarged cardiomediastinal silhouette",
        "enlargement of the cardiomediastinal silhouette",
        "cardiomediastinal enlargement",
        "widened mediastinum",
        "widening of the mediastinum",
        "mediastinal widening",
        "mediastinal enlargement",
        "enlarged mediastinum",
        "widened cardiomediastinal silhouette",
        "prominent mediastinum",
        "widened superior mediastinum",
    ),
    "Fracture": (
        "fracture(s)",
        "fractured",
        "rib fracture(s)",
        "compression fracture(s)",
        "compression deformity",
        "compression deformities",
        "broken rib(s)",
        "fracture deformity",
    ),
    "Lung Lesion": (
        "nodule(s)",
        "nodular opacity",
        "nodular opacities",
        "nodular density",
        "nodular densities",
        "nodular opacification",
        "mass(es)",
        "lung mass(es)",
        "pulmonary mass(es)",
        "lesion(s)",
        "lung lesion(s)",
        "pulmonary lesion(s)",
        "cavitary lesion(s)",
        "neoplasm(s)",
        "tumor(s)",
        "tumour(s)",
        "carcinoma",
        "lump",
        # CheXpert matches "mass" inside words: "masslike", "mass-like opacity"
        "mass-like",
        "mass-like opacity",
        "mass-like opacities",
        "mass-like opacification",
        "mass-like density",
        "mass-like densities",
        "mass-like consolidation",
        "mass-like lesion(s)",
    ),
    "Lung Opacity": (
        # CheXpert's "opaci" also makes these Lung Opacity (they are Lung Lesion too)
        "nodular opacity",
        "nodular opacities",
        "nodular opacification",
        "opacity",
        "opacities",
        "opacification(s)",
        "opacified",
        "airspace opacity",
        "airspace opacities",
        "air-space opacity",
        "air-space opacities",
        "air-space disease",
        "airspace disease",
        "air-space process",
        "airspace process",
        "infiltrate(s)",
        "infiltration",
        "infiltrative",
        "density",
        "densities",
        "increased density",
        "haziness",
        "hazy opacity",
        "hazy opacities",
        "ground-glass",
        "ground glass opacity",
        "ground glass opacities",
        "reticular opacities",
        "reticulonodular opacities",
        "interstitial opacities",
        "interstitial markings",
        "increased interstitial markings",
        "increased lung markings",
        "increased markings",
        "patchy opacity",
        "mass-like opacity",
        "mass-like opacities",
        "masslike opacity",
        "mass-like opacification",
        "mass-like density",
        "mass-like densities",
        "nodular-like opacity",
        "patchy opacities",
        "shadowing",
        "airspace shadowing",
        "scarring",
        "fibrosis",
        "fibrotic changes",
        # CheXpert's airspace-opacity list
        "decreased translucency",
        "reticulation",
        "reticular pattern",
        "reticular marking(s)",
        "interstitial pattern",
        "peribronchial thickening",
        "bronchial wall thickening",
        "parenchymal scarring",
        "scar(s)",
    ),
    "Pleural Effusion": (
        "effusion(s)",
        "pleural effusion(s)",
        "pleural fluid",
        "fluid in the pleural space",
        "loculated fluid",
        "loculated pleural fluid",
        "parapneumonic effusion(s)",
        "hydrothorax",
        "layering fluid",
        "pleural collection",
        "hemothorax",
        "empyema",
        "fluid layering",
    ),
    "Pleural Other": (
        "pleural thickening",
        "thickening of the pleura",
        "pleural plaque(s)",
        "pleural scarring",
        "pleural scar(s)",
        "pleuro-parenchymal scar(s)",
        "pleuroparenchymal scar(s)",
        "pleuroparenchymal scarring",
        "pleuro-pericardial scar(s)",
        "pleural calcification(s)",
        "calcified pleural plaque(s)",
        "fibrothorax",
        "pleural-parenchymal scarring",
        "apical pleural thickening",
        "apical cap",
        "pleural based mass",
        "pleural mass(es)",
        "mesothelioma",
        "pleural other",  # the CheXpert label name, as models echo it ("Pleural Other: absent")
    ),
    "Pneumonia": (
        "pneumonia(s)",
        "pneumonic",
        "bronchopneumonia",
        "pneumonitis",
        "infection",
        "infectious process",
        "infectious etiology",
        "infectious consolidation",
        "lung infection",
        "pulmonary infection",
        "aspiration",
        "pna",
        "aspiration pneumonia",
        "lobar pneumonia",
        "multifocal pneumonia",
    ),
    "Pneumothorax": (
        "pneumothorax",
        "pneumothoraces",
        "pneumothoraxes",
        "ptx",
        "apical pneumothorax",
        "tension pneumothorax",
        "air in the pleural space",
    ),
    "Support Devices": (
        "tube(s)",
        "et tube",
        "ett",
        "endotracheal tube",
        "endotracheal tubes",
        "tracheostomy",
        "tracheostomy tube",
        "trach",
        "trach tube",
        "ng tube",
        "nasogastric tube",
        "og tube",
        "orogastric tube",
        "feeding tube",
        "dobhoff",
        "dobhoff tube",
        "enteric tube",
        "gastric tube",
        "chest tube(s)",
        "thoracostomy tube",
        "pigtail catheter",
        "pleural catheter",
        "catheter(s)",
        "central line(s)",
        "central venous line",
        "central venous catheter",
        "cvc",
        "picc",
        "picc line",
        "picc lines",
        "ij line",
        "internal jugular line",
        "subclavian line",
        "arterial line",
        "hickman line",
        "dialysis catheter",
        "hemodialysis catheter",
        "swan-ganz",
        "swan-ganz catheter",
        "pulmonary artery catheter",
        "port",
        "port-a-cath",
        "portacath",
        "mediport",
        "pacemaker(s)",
        "pacer(s)",
        "pacer lead(s)",
        "pacemaker lead(s)",
        "pacing lead(s)",
        "pacing wire(s)",
        "lead(s)",
        "icd",
        "aicd",
        "defibrillator",
        "cardiac device",
        "cardiac devices",
        "loop recorder",
        "sternotomy wire(s)",
        "sternal wire(s)",
        "median sternotomy wire(s)",
        "stent(s)",
        "valve replacement",
        "prosthetic valve",
        "prosthetic aortic valve",
        "prosthetic mitral valve",
        "aortic valve replacement",
        "mitral valve replacement",
        "valve prosthesis",
        "mechanical valve",
        "lvad",
        "iabp",
        "intra-aortic balloon pump",
        "balloon pump",
        "drain(s)",
        "monitoring device(s)",
        "support device(s)",
        "lines and tubes",
        "tubes and lines",
        "medical device(s)",
        "vp shunt",
        "surgical clips",
        "cordis",
        "introducer",
        "introducer sheath",
        "vascular sheath",
        "impella",
        "ecmo cannula(s)",
        "embolization coil(s)",
        "surgical clip",
        "device(s)",
        "lines/tubes",
        "tubes/lines",
        "lines/tubes/devices",
        "ecg leads",
        "ekg leads",
        "monitoring leads",
        "electrode(s)",
    ),
}

#: Mentions that CheXpert's uncertainty rules make uncertain when nothing else qualifies them:
#: "mild pulmonary vascular congestion" is Edema, uncertain ("no vascular congestion" stays negative).
UNCERTAIN_MENTIONS: frozenset[str] = frozenset(
    {
        "vascularcongestion",
        "pulmonaryvascularcongestion",
        "pulmonaryvenouscongestion",
        "venouscongestion",
        "pulmonarycongestion",
        "indistinctness",
        "vascularprominence",
        "pulmonaryvascularprominence",
    }
)

#: Radiographic signs: they count as a mention of their observation only when the same step says
#: nothing else about it ("deep sulcus sign" alone -> pneumothorax positive; "blunting ... may reflect
#: effusion or pleural thickening" -> the interpretation decides); see SIDE_ONLY_SIGNS.
SIGNS: dict[str, tuple[str, ...]] = {
    "Pleural Effusion": (
        "blunting of the costophrenic angle(s)",
        "blunting of the left costophrenic angle",
        "blunting of the right costophrenic angle",
        "blunting of both costophrenic angles",
        "blunting of the costophrenic sulcus",
        "blunting of the costophrenic sulci",
        "blunted costophrenic angle(s)",
        "blunted costophrenic sulcus",
        "costophrenic angle blunting",
        "costophrenic blunting",
        "blunting",
        "meniscus sign",
        "blunted left costophrenic angle(s)",
        "blunted right costophrenic angle(s)",
        "blunted bilateral costophrenic angles",
        "blunting of the left costophrenic sulcus",
        "blunting of the right costophrenic sulcus",
        "blunting of the bilateral costophrenic angles",
        "blunting of the left and right costophrenic angles",
        "meniscus",
        "obscured costophrenic angle(s)",
        "obliteration of the costophrenic angle(s)",
        "obliteration of the left costophrenic angle",
        "obliteration of the right costophrenic angle",
        "obliteration of both costophrenic angles",
        "obliterated costophrenic angle(s)",
        "obliterated left costophrenic angle",
        "obliterated right costophrenic angle",
        "fluid tracking",
    ),
    "Edema": (
        "cephalization",
        "vascular redistribution",
        "kerley b line(s)",
        "kerley line(s)",
        "perihilar haziness",
        "bat wing",
        "batwing",
        "peribronchial cuffing",
    ),
    "Pneumothorax": (
        "visceral pleural line",
        "pleural line",
        "deep sulcus sign",
        "pleural edge",
        "absent lung markings",
        "absence of lung markings",
    ),
}
#: A sign of the first observation is also explained away by a mention of these in its step.
SIGN_ALTERNATIVES: dict[str, tuple[str, ...]] = {"Pleural Effusion": ("Pleural Other",)}
#: Signs that never assert their observation by themselves: CheXpert's Pleural Effusion is the words
#: "effusion" and "pleural fluid" only, so "blunting of the right costophrenic angle" alone says
#: nothing about effusion. They still lend their side to an effusion the text asserts without one
#: ("### Pleural Effusion / * blunting of the left costophrenic angle" -> left).
SIDE_ONLY_SIGNS: frozenset[str] = frozenset({"Pleural Effusion"})

#: Phrases that must not count as mentions although they contain a mention word; matching them
#: (longest match wins) hides the shorter mention inside.
IGNORED: tuple[str, ...] = (
    # history, not a finding of this image
    "prior infection",
    "previous infection",
    "old infection",
    "prior granulomatous infection",
    "prior granulomatous disease",
    "prior pneumonia",
    "previous pneumonia",
    "old pneumonia",
    # healed granulomatous disease is neither a lesion nor a pneumonia (CheXpert: granuloma and
    # "calcified nodul..." are not Lung Lesion)
    "granulomatous infection",
    "tuberculous infection",
    "tuberculosis infection",
    "histoplasmosis infection",
    "tuberculous pneumonia",
    "tuberculosis pneumonia",
    "granulomatous disease",
    "granulomatous process",
    "calcified nodule(s)",
    "calcified nodular density",
    "calcified nodular densities",
    "calcified nodular opacity",
    "calcified nodular opacities",
    # adjectives that look like negation cues but keep the finding ("resolving pneumonia")
    "resolving",
    "partially resolved",
    "nearly resolved",
    "incompletely resolved",
    "improving",
    "pericardial effusion(s)",
    "joint effusion(s)",
    "pericardial fluid",
    "mass effect",
    # lesions and masses of other organs are not Lung Lesion
    "bone lesion(s)",
    "bony lesion(s)",
    "rib lesion(s)",
    "osseous lesion(s)",
    "skeletal lesion(s)",
    "lytic lesion(s)",
    "blastic lesion(s)",
    "sclerotic lesion(s)",
    "expansile lesion(s)",
    "lucent lesion(s)",
    "skin lesion(s)",
    "cutaneous lesion(s)",
    "liver lesion(s)",
    "hepatic lesion(s)",
    "renal lesion(s)",
    "thyroid mass(es)",
    "mediastinal mass(es)",
    "anterior mediastinal mass(es)",
    "pericardial mass(es)",
    "breast mass(es)",
    "soft tissue mass(es)",
    "abdominal mass(es)",
    "neck mass(es)",
    "soft tissue density",
    "soft tissue densities",
    "bone density",
    "bone mass",
    "body mass",
    "lead to",
    "leads to",
    "leading to",
    "port of entry",
    "rule out infection",
    "support the diagnosis",
    "supports the diagnosis",
    "supporting the diagnosis",
    "chest tube placement",
    "mediastinal lymph node(s)",
    "portable",
    "report",
    "reported",
    "left ventricle",
    "right ventricle",
    "left atrium",
    "right atrium",
    "left atrial",
    "right atrial",
    "left ventricular",
    "right ventricular",
    "right heart",
    "left heart",
    "left-sided heart",
    "right-sided heart",
    "right internal jugular",
    "left internal jugular",
    "right upper quadrant",
    "left upper quadrant",
    "right arm",
    "left arm",
    "right-sided pacemaker",
    "left-sided pacemaker",
    "right chest wall",
    "left chest wall",
    "right hand",
    "left hand",
    "on the other hand",
    "right answer",
    "right away",
)

#: Phrases that by themselves say the whole study is normal (count as a statement for "No Finding").
NORMAL_STUDY: tuple[str, ...] = (
    "no acute cardiopulmonary process",
    "no acute cardiopulmonary abnormality",
    "no acute cardiopulmonary abnormalities",
    "no acute cardiopulmonary disease",
    "no acute cardiopulmonary findings",
    "no acute cardiopulmonary pathology",
    "no acute intrathoracic process",
    "no acute intrathoracic abnormality",
    "no acute process",
    "no acute abnormality",
    "no acute findings",
    "no acute disease",
    "no acute pulmonary process",
    "no acute pulmonary disease",
    "no acute chest disease",
    "no active disease",
    "no active lung disease",
    "no evidence of acute cardiopulmonary process",
    "no evidence of acute disease",
    "normal chest",
    "normal chest radiograph",
    "normal chest x-ray",
    "normal chest xray",
    "normal radiograph",
    "normal study",
    "normal examination",
    "unremarkable chest radiograph",
    "unremarkable study",
    "no finding",
    "no findings",
    "no abnormality",
    "no abnormalities",
    "no radiographic abnormality",
    "no significant abnormality",
    "within normal limits",
)

#: Observations that "the lungs are clear" declares negative (the opacity family).
OPACITY_FAMILY: tuple[str, ...] = ("Lung Opacity", "Consolidation", "Pneumonia", "Atelectasis", "Edema")

# Flexible statements that a literal list cannot express (verbs and adverbs between the words).
# Each is (regex on lower-cased text, {observation: status}); status "mention" means the statement is
# an ordinary mention (cues around it apply), "sign" a radiographic sign (see SIGNS), otherwise the
# status is what the statement says.
_HEART = r"(?:heart(?:\s+size|\s+itself|\s+borders?)?|cardiac\s+borders?|cardiac\s+(?:silhouette|size|contours?|shadow)(?:\s+size)?|size\s+of\s+the\s+heart)"
_CMS = (
    r"(?:cardio-?mediastinal\s+(?:silhouette|contours?|shadow)s?|"
    r"(?:cardiac|heart|cardio-?mediastinal)\s+and\s+(?:mediastinal|hilar)(?:\s+and\s+hilar)?\s+"
    r"(?:silhouettes?|contours?|shadows?))"
)
# Between a subject and what is said of it: "heart size normal", "heart size: normal", "heart size - normal".
_SEP = r"(?:\s*:|\s+[\u2013\u2014-])?\s+"
_MED = r"(?:mediastin(?:um|al\s+(?:silhouette|contours?|width))|hil(?:a|um|ar\s+contours?)|mediastinal\s+and\s+hilar\s+(?:contours?|silhouettes?)|hilar\s+and\s+mediastinal\s+(?:contours?|silhouettes?))"
# "xxxx": the OpenI collection's de-identification mask, which often hides the verb ("the heart
# XXXX enlarged").
_BE = r"(?:(?:xxxx\s+)?(?:is|are|was|were|appears?|remains?|seems?|looks?|being|may\s+be|might\s+be|could\s+be|appears?\s+to\s+be|seems?\s+to\s+be|xxxx)(?:\s+also)?)"
# Any "-ly" adverb ("markedly enlarged", "mildly enlarged") plus a few others.
_ADV = r"(?:(?:[a-z]+ly|again|still|now|borderline|top|at\s+least|also|overall|xxxx)\s+)"
_NORMAL = (
    r"(?:normal(?:\s+in\s+size)?|within\s+(?:the\s+)?normal\s+limits|within\s+(?:the\s+)?limits\s+of\s+normal|unremarkable|stable\s+and\s+normal|"
    r"(?:top|upper|high)(?:\s+|-)normal|(?:at\s+the\s+)?upper\s+limits?\s+of\s+(?:the\s+)?normal|not\s+widened|not\s+(?:\w+ly\s+)?enlarged|normal\s+size|"
    r"unchanged\s+and\s+normal|preserved|of\s+normal\s+(?:size|caliber|width)|midline\s+and\s+not\s+(?:\w+ly\s+)?(?:widened|enlarged))"
)

FLEX_STATEMENTS: tuple[tuple[str, dict[str, str]], ...] = (
    # heart size between normal and enlarged (first: the regex takes the first alternative that matches)
    (
        rf"{_HEART}{_SEP}(?:{_BE}\s+)?(?:(?:top|upper|high)[\s-]|(?:at\s+the\s+)?upper\s+limits?\s+(?:of\s+)?)?"
        r"normal\s+(?:to|or)\s+(?:\w+ly\s+)?(?:enlarged|large)",
        {"Cardiomegaly": "uncertain"},
    ),
    # borderline heart size: CheXpert's uncertain ("borderline cardiomegaly", "heart size is borderline")
    (
        rf"borderline\s+(?:(?:enlarged|enlargement\s+of\s+the|large|prominent)\s+)?(?:{_HEART}|cardiomegaly)",
        {"Cardiomegaly": "uncertain"},
    ),
    (
        rf"{_HEART}{_SEP}(?:{_BE}\s+)?(?:\w+ly\s+)?borderline(?:\s+(?:in\s+size|size|enlarged|large|prominent))?",
        {"Cardiomegaly": "uncertain"},
    ),
    # heart size normal / enlarged
    (rf"{_HEART}{_SEP}(?:{_BE}\s+)?{_NORMAL}", {"Cardiomegaly": "negative"}),
    (rf"normal(?:\s+|-)(?:sized?\s+)?{_HEART}", {"Cardiomegaly": "negative"}),
    # "Heart size and vascularity are within normal limits": a normality predicate over
    # a short coordination that starts with the heart. Only "heart size and" is consumed (lookahead),
    # so a finding named in the coordination is still read (and negated by cues.NORMAL_PREDICATES).
    (
        rf"{_HEART}\s+and\s+(?=(?:[a-z-]+\s+){{1,3}}?(?:{_BE}\s+)(?:{_ADV})?{_NORMAL})",
        {"Cardiomegaly": "negative"},
    ),
    (
        rf"heart\s+and\s+mediastinum\s+(?:{_BE}\s+)?{_NORMAL}",
        {"Cardiomegaly": "negative", "Enlarged Cardiomediastinum": "negative"},
    ),
    (
        r"no\s+(?:\w+\s+)?(?:enlargement\s+of\s+the\s+heart|cardiac\s+enlargement)",
        {"Cardiomegaly": "negative"},
    ),
    (
        rf"{_HEART}{_SEP}(?:{_BE}\s+)?{_ADV}{{0,2}}(?:enlarged|increased|large|prominent|big|dilated)",
        {"Cardiomegaly": "mention"},
    ),
    (
        rf"{_HEART}\s+[^.;:\n]{{0,40}}?\b(?:may|might|could)\s+be\s+{_ADV}{{0,2}}(?:enlarged|increased|large)",
        {"Cardiomegaly": "mention"},
    ),
    (
        r"cardiothoracic\s+ratio\s+(?:of\s+)?(?:is\s+)?(?:greater\s+than|more\s+than|over|above|exceeds|exceeding|>)\s*"
        r"(?:0?\.5|50\s*%)",
        {"Cardiomegaly": "mention"},
    ),
    (
        r"(?:normal\s+cardiothoracic\s+ratio|cardiothoracic\s+ratio\s+(?:"
        + _BE
        + r"\s+)?(?:normal|within\s+normal"
        r"\s+limits|less\s+than\s+(?:0?\.5|50\s*%)|below\s+(?:0?\.5|50\s*%)|<\s*(?:0?\.5|50\s*%)))",
        {"Cardiomegaly": "negative"},
    ),
    # cardiomediastinal silhouette / mediastinum
    (
        rf"{_CMS}\s+(?:{_BE}\s+)?{_NORMAL}",
        {"Cardiomegaly": "negative", "Enlarged Cardiomediastinum": "negative"},
    ),
    (rf"normal\s+{_CMS}", {"Cardiomegaly": "negative", "Enlarged Cardiomediastinum": "negative"}),
    (
        rf"{_CMS}\s+(?:{_BE}\s+)?{_ADV}{{0,2}}(?:enlarged|widened|increased|prominent)",
        {"Enlarged Cardiomediastinum": "mention"},
    ),
    (rf"{_MED}{_SEP}(?:{_BE}\s+)?{_NORMAL}", {"Enlarged Cardiomediastinum": "negative"}),
    (
        rf"{_MED}{_SEP}(?:{_BE}\s+)?{_ADV}{{0,2}}(?:widened|enlarged|wide|prominent)",
        {"Enlarged Cardiomediastinum": "mention"},
    ),
    (rf"normal\s+{_MED}", {"Enlarged Cardiomediastinum": "negative"}),
    (
        rf"mediastinum\s+(?:{_BE}\s+)?{_ADV}{{0,2}}(?:widened|enlarged|wide|prominent)",
        {"Enlarged Cardiomediastinum": "mention"},
    ),
    # costophrenic angles sharp -> no effusion
    (
        r"(?:costophrenic|cp)\s+(?:angles?|sulci|sulcus|recess(?:es)?)\s+(?:" + _BE + r"\s+)?(?:\w+ly\s+)?"
        r"(?:sharp(?:ly\s+defined)?|clear|preserved|well[\s-]defined|normal|crisp|free)",
        {"Pleural Effusion": "negative"},
    ),
    (
        r"(?:sharp|clear|preserved|normal|crisp)\s+(?:costophrenic|cp)\s+(?:angles?|sulci|sulcus)",
        {"Pleural Effusion": "negative"},
    ),
    # extubation: the endotracheal tube is gone
    (r"extubat(?:ed|ion)", {"Support Devices": "negative"}),
    # blunted costophrenic angles: a sign of effusion (see SIGNS)
    (
        r"(?:costophrenic|cp)\s+(?:angles?|sulci|sulcus|recess(?:es)?)\s+(?:" + _BE + r"\s+)?(?:\w+ly\s+)?"
        r"(?:blunted|obscured|obliterated)",
        {"Pleural Effusion": "sign"},
    ),
    # lungs clear -> opacity family negative
    (
        r"(?:both\s+)?lungs?(?:\s+fields?|\s+parenchyma)?\s+(?:"
        + _BE
        + r"\s+)(?:(?!not\b|no\b)\w+\s+(?:and\s+)?){0,3}?clear\b",
        dict.fromkeys(OPACITY_FAMILY, "negative"),
    ),
    (r"clear\s+lungs?(?:\s+fields?)?", dict.fromkeys(OPACITY_FAMILY, "negative")),
    (
        # "Lungs: clear", "Lungs - hyperinflated, otherwise clear"
        r"lungs?(?:\s+fields?)?\s*(?::|\s[\u2013\u2014-])\s*(?:\*\*\s*)?(?:(?!not\b|no\b)[\w-]+,?\s+(?:and\s+)?){0,3}?clear\b",
        dict.fromkeys(OPACITY_FAMILY, "negative"),
    ),
    # telegraphic "Lungs clear." (but not "lungs clear signs of ...")
    (
        r"(?:both\s+)?lungs?(?:\s+fields?)?\s+clear\b(?!\s+(?:signs?|evidence|features?)\b)",
        dict.fromkeys(OPACITY_FAMILY, "negative"),
    ),
    (
        r"(?:both\s+)?lungs?\s+(?:"
        + _BE
        + r"\s+)?(?:\w+\s+and\s+)?(?:clear|free)\s+of\s+(?:(?:any|focal|acute)\s+){0,2}(?:air[\s-]?space\s+)?"
        r"(?:consolidation|opacit(?:y|ies)|infiltrates?|disease|process|pathology|abnormalit(?:y|ies))",
        dict.fromkeys(OPACITY_FAMILY, "negative"),
    ),
)

_PLURAL = re.compile(r"\((e?s)\)$")


def expand(phrase: str) -> list[str]:
    """Expand the "(s)"/"(es)" plural notation of a phrase into its spellings."""
    match = _PLURAL.search(phrase)
    if match is None:
        return [phrase]
    stem = phrase[: match.start()]
    return [stem, stem + match.group(1)]
