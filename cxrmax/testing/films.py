"""Synthetic chest films that show what their study's labels say, where the report says it.

The mini MIMIC-CXR and the demo's teachers need pictures a tiny VLM can read findings and *sides*
from: a film that only says "something is wrong" lets a model learn how often each finding occurs,
never where it is, so laterality drift can neither be learned nor trained away. Each finding is drawn
as its textbook sign, large and contrasted enough to survive the demo's 112-pixel images:

=========================== ==========================================================================
observation                 sign on a frontal film
=========================== ==========================================================================
Pleural Effusion            dense meniscus filling the stated costophrenic angle, rising laterally
Pneumothorax                black rim without lung markings along the stated lung's apex and side,
                            bounded by a thin bright visceral pleural line
Cardiomegaly                heart shadow wider than half the chest (cardiothoracic ratio > 0.5)
Enlarged Cardiomediastinum  widened upper mediastinum
Consolidation / Pneumonia   dense lobar opacity in the stated lower (pneumonia: mid) zone
Atelectasis                 plate-like band at the stated lung base
Lung Opacity                hazy opacity at the stated lung base
Lung Lesion                 round nodule in the stated upper zone
Edema                       bilateral perihilar haze (bat-wing)
Pleural Other               thickened pleural stripe along the stated lateral chest wall
Fracture                    cortical step across a lateral rib on the stated side
Support Devices             bright tube down the midline and a line into the right shoulder
=========================== ==========================================================================

Conventions: films are displayed as radiologists read them, so the patient's **left is on the image's
right**. An uncertain (-1) finding is drawn at half contrast; negative and unmentioned ones are not
drawn. Anatomy (lung size, heart position, exposure, rotation) and noise vary per film from the seed,
so a model must read the sign, not memorise a template. Lateral views show the anatomy only (no side
can be read from them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

#: Observations drawn on one side (their sides come from the study's ``sides``; None = both).
SIDED = (
    "Pleural Effusion",
    "Pneumothorax",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Lung Opacity",
    "Lung Lesion",
    "Pleural Other",
    "Fracture",
)

_AIR, _SOFT, _LUNG, _BONE = 12.0, 118.0, 46.0, 200.0


def _strength(labels: dict[str, int | None], name: str) -> float:
    """1 for a positive finding, 0.5 for an uncertain one, 0 otherwise."""
    value = labels.get(name)
    return 1.0 if value == 1 else 0.5 if value == -1 else 0.0


def _sides(side: str | None) -> tuple[int, ...]:
    """Image-side signs for a patient side: left -> +1 (image right), right -> -1, else both."""
    if side == "left":
        return (1,)
    if side == "right":
        return (-1,)
    return (-1, 1)


@dataclass
class _Chest:
    """One frontal film being drawn: the image, its coordinates and the lungs' shape."""

    img: np.ndarray
    u: np.ndarray  # -0.5 (image left) .. 0.5 (image right = patient left)
    v: np.ndarray  # -0.5 (top) .. 0.5 (bottom)
    lungs: dict[int, np.ndarray]  # image side (-1, +1) -> mask
    cx: float  # lung centres' distance from the midline
    w: float
    h: float
    cy: float

    def brighten(self, mask: np.ndarray, level: float, strength: float) -> None:
        self.img[mask] = self.img[mask] * (1 - strength) + level * strength

    def zone(self, s: int, top: float, bottom: float) -> np.ndarray:
        """Rows of lung ``s`` between ``top`` and ``bottom`` (in lung heights from its centre)."""
        return self.lungs[s] & (self.v > self.cy + top * self.h) & (self.v < self.cy + bottom * self.h)


def _draw_sided(c: _Chest, name: str, s: int, strength: float) -> None:
    """The sign of one lateralised finding on image side ``s``."""
    u, v = c.u, c.v
    lateral = s * u  # grows toward the chest wall on that side
    if name == "Pleural Effusion":
        # meniscus: fluid fills the angle and climbs the lateral chest wall
        level = c.cy + c.h - c.h * (0.5 + 0.3 * (lateral - c.cx) / c.w)
        c.brighten(c.lungs[s] & (v > level), 165.0, strength)
    elif name == "Pneumothorax":
        # the collapsed lung: a smaller ellipse; outside it a black rim without markings
        inner = ((u - s * c.cx) / (c.w * 0.7)) ** 2 + ((v - c.cy - 0.06) / (c.h * 0.75)) ** 2
        rim = c.lungs[s] & (inner > 1) & ((lateral > c.cx - 0.3 * c.w) | (v < c.cy - 0.45 * c.h))
        edge = c.lungs[s] & ~rim & (np.abs(inner - 1) < 0.12)
        c.img[rim] = c.img[rim] * (1 - strength) + 8.0 * strength
        c.brighten(edge, 120.0, strength)
    elif name in ("Consolidation", "Pneumonia"):
        cy = c.cy + (0.55 if name == "Consolidation" else 0.0) * c.h
        blob = c.lungs[s] & (((lateral - c.cx) / (0.75 * c.w)) ** 2 + ((v - cy) / (0.32 * c.h)) ** 2 < 1)
        c.brighten(blob, 150.0, strength)
    elif name == "Atelectasis":
        c.brighten(c.zone(s, 0.55, 0.72) & (np.abs(lateral - c.cx) < 0.9 * c.w), 150.0, strength)
    elif name == "Lung Opacity":
        c.brighten(c.zone(s, 0.45, 1.0), 110.0, strength)
    elif name == "Lung Lesion":
        nodule = ((u - s * (c.cx + 0.01)) / 0.04) ** 2 + ((v - (c.cy - 0.45 * c.h)) / 0.04) ** 2 < 1
        c.brighten(nodule, 190.0, strength)
    elif name == "Pleural Other":
        c.brighten(c.lungs[s] & (lateral > c.cx + 0.72 * c.w), 150.0, strength)
    elif name == "Fracture":
        rib = (np.abs(lateral - (c.cx + 0.6 * c.w)) < 0.05) & (np.abs(v - (c.cy - 0.05)) < 0.012)
        c.brighten(rib, 235.0, strength)


def _frontal(
    img: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    body: np.ndarray,
    rng: np.random.Generator,
    labels: dict[str, int | None],
    sides: dict[str, str | None],
) -> None:
    cx = 0.17 + rng.uniform(-0.015, 0.015)
    w, h = 0.15 * rng.uniform(0.92, 1.08), 0.33 * rng.uniform(0.92, 1.06)
    cy = -0.02 + rng.uniform(-0.02, 0.02)
    lungs = {s: ((u - s * cx) / w) ** 2 + ((v - cy) / h) ** 2 < 1 for s in (-1, 1)}
    chest = _Chest(img, u, v, lungs, cx, w, h, cy)
    both = lungs[-1] | lungs[1]
    img[both] = _LUNG
    ribs = (np.sin((v * 28 + 3 * u**2 * 10 + rng.uniform(0, 2)) * math.pi) > 0.75) & both
    img[ribs] += 22.0
    # vascular markings: faint texture inside the lungs (absent where a pneumothorax is)
    img[both & (np.sin(u * 90 + v * 40) * np.sin(v * 70 - u * 30) > 0.55)] += 9.0
    heart_cx = 0.05 + rng.uniform(-0.015, 0.015)
    cardiomegaly = labels.get("Cardiomegaly")
    heart_w = (0.21 if cardiomegaly == 1 else 0.165 if cardiomegaly == -1 else 0.115) * rng.uniform(
        0.95, 1.05
    )
    img[((u - heart_cx) / heart_w) ** 2 + ((v - 0.18) / 0.13) ** 2 < 1] = 168.0
    media_w = 0.05 + 0.05 * _strength(labels, "Enlarged Cardiomediastinum")
    img[(np.abs(u) < media_w) & (v > -0.4) & (v < 0.12)] = 176.0
    img[(np.abs(u) < 0.025) & body] = _BONE
    edema = _strength(labels, "Edema")
    if edema:
        hilar = np.exp(-(((np.abs(u) - 0.1) / 0.09) ** 2) - (v / 0.16) ** 2) * both
        img[:] += 70.0 * edema * hilar
    for name in SIDED:
        strength = _strength(labels, name)
        for s in _sides(sides.get(name)) if strength else ():
            _draw_sided(chest, name, s, strength)
    devices = _strength(labels, "Support Devices")
    if devices:
        chest.brighten((np.abs(u - 0.012) < 0.009) & (v > -0.5) & (v < 0.05), 250.0, devices)
        line = (np.abs(v - (-0.32 + 0.9 * (u + 0.35) ** 2)) < 0.008) & (u > -0.4) & (u < -0.02)
        chest.brighten(line, 250.0, devices)


def synthetic_chest(
    width: int,
    height: int,
    seed: int,
    view: str = "PA",
    labels: dict[str, int | None] | None = None,
    sides: dict[str, str | None] | None = None,
) -> np.ndarray:
    """A synthetic chest film as uint8 (height, width) showing ``labels`` at ``sides``.

    Drawn on a grid of at most 640 pixels and upscaled, so full-size films cost milliseconds; the
    same arguments give the same film."""
    labels = labels or {}
    sides = sides or {}
    scale = max(1, max(width, height) // 640)
    w0, h0 = max(8, width // scale), max(8, height // scale)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h0, 0:w0].astype(np.float32)
    angle = rng.uniform(-0.04, 0.04)  # slight patient rotation
    u0, v0 = x / w0 - 0.5 + rng.uniform(-0.02, 0.02), y / h0 - 0.5 + rng.uniform(-0.02, 0.02)
    u = u0 * math.cos(angle) - v0 * math.sin(angle)
    v = u0 * math.sin(angle) + v0 * math.cos(angle)
    img = np.full((h0, w0), _AIR, np.float32)
    body = (u / 0.46) ** 2 + ((v - 0.05) / 0.52) ** 2 < 1
    img[body] = _SOFT
    if view not in ("LATERAL", "LL"):
        _frontal(img, u, v, body, rng, labels, sides)
    else:
        lung = ((u + 0.03) / 0.3) ** 2 + ((v + 0.02) / 0.34) ** 2 < 1
        img[lung] = 55.0
        img[(u > 0.28) & (u < 0.34) & body] = _BONE
        img[((u + 0.15) / 0.14) ** 2 + ((v - 0.15) / 0.14) ** 2 < 1] = 150.0
    exposure, contrast = rng.uniform(-10, 10), rng.uniform(0.9, 1.1)
    img = (img - 100.0) * contrast + 100.0 + exposure
    img += rng.normal(0.0, rng.uniform(2.5, 6.0), size=img.shape).astype(np.float32)
    small = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(1.2))
    if (w0, h0) != (width, height):
        small = small.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(small)
