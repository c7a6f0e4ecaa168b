"""`udajax_demo`: a procedurally generated street-scene domain shift (no download).

Two builder configs share one scene-layout sampler (same layout statistics) and differ only in
rendering:
  source: saturated "synthetic" materials, sharp edges, mild noise, flat lighting;
  target: a shifted palette (hue rotated by 30 degrees, desaturated, warm cast), other textures
          (concrete panels instead of bricks and windows, grainy asphalt, leaf pattern), a lighting
          gradient, gamma, stronger sensor noise and blur.
Shapes, edges and layout are shared, so features that transfer exist; colours and textures are
shifted, so a source-only model does clearly worse on the target.

Every example is a pure function of (BASE_SEED, domain, split, index); 96x192 (H x W) images,
labels in the 19 Cityscapes train ids (255 never occurs). Classes drawn: road, sidewalk, building,
wall, fence, pole, traffic light, traffic sign, vegetation, terrain, sky, person, car (13 of 19).

Splits per config: train (500 images) and validation (100 images).
"""

from typing import Optional

import numpy as np

from udajax.datasets import common

HEIGHT, WIDTH = 96, 192
BASE_SEED = 20210105
SPLIT_SIZES = {"source": {"train": 500, "validation": 100},
               "target": {"train": 500, "validation": 100}}
_DOMAIN_ID = {"source": 0, "target": 1}
_SPLIT_ID = {"train": 0, "validation": 1}

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, RIDER,
 CAR) = range(14)
DEMO_CLASSES = (ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY,
                PERSON, CAR)

# Material base colours (RGB) per train id. The target palette is the source one with the hue
# rotated by 30 degrees around the grey axis, saturation reduced and a warm cast (a global,
# class-consistent appearance change: classes stay distinguishable within each domain).
_SOURCE_PALETTE = {
    ROAD: (95, 90, 100), SIDEWALK: (185, 160, 140), BUILDING: (160, 95, 70), WALL: (200, 195, 150),
    FENCE: (140, 110, 60), POLE: (55, 55, 60), LIGHT: (30, 30, 30), SIGN: (235, 205, 30),
    VEGETATION: (50, 150, 40), TERRAIN: (160, 185, 80), SKY: (110, 170, 240), PERSON: (200, 50, 60),
}


def _hue_rotation(degrees: float, saturation: float) -> np.ndarray:
  """3x3 RGB matrix rotating hue around the grey axis and scaling saturation."""
  a = np.deg2rad(degrees)
  u = np.ones(3) / np.sqrt(3.0)
  cross = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
  rot = np.cos(a) * np.eye(3) + np.sin(a) * cross + (1 - np.cos(a)) * np.outer(u, u)
  grey = np.outer(u, u)
  return grey + saturation * (rot - grey)


_TARGET_COLOUR = _hue_rotation(30.0, 0.85)
_TARGET_CAST = np.array([1.08, 1.0, 0.85])


def _target_colour(rgb):
  return np.clip((_TARGET_COLOUR @ np.asarray(rgb, np.float64)) * _TARGET_CAST * 0.9 + 12, 0, 255)


_PALETTES = {
    "source": _SOURCE_PALETTE,
    "target": {k: tuple(_target_colour(v)) for k, v in _SOURCE_PALETTE.items()},
}


# ----------------------------------------------------------------------------------------------
# Layout: label map + per-pixel "material" colour for instance-coloured things (cars, clothes).


class _Canvas:

  def __init__(self, rng):
    self.rng = rng
    self.label = np.full((HEIGHT, WIDTH), SKY, np.uint8)
    self.inst = np.zeros((HEIGHT, WIDTH), np.int32)  # 0 = stuff; k > 0 = instance k
    self.inst_colour = [None]  # random colour factor of each instance (rendered per domain)
    self.yy, self.xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)

  def paint(self, mask, cls, instance=False):
    self.label[mask] = cls
    if instance:
      self.inst_colour.append(self.rng.uniform(0.0, 1.0, size=3))
      self.inst[mask] = len(self.inst_colour) - 1
    else:
      self.inst[mask] = 0

  def rect(self, x0, y0, x1, y1):
    return (self.xx >= x0) & (self.xx < x1) & (self.yy >= y0) & (self.yy < y1)

  def ellipse(self, cx, cy, rx, ry):
    return ((self.xx - cx) / max(rx, 0.5)) ** 2 + ((self.yy - cy) / max(ry, 0.5)) ** 2 <= 1.0


def sample_layout(rng: np.random.Generator) -> _Canvas:
  """Draws one street scene (the same distribution for both domains)."""
  c = _Canvas(rng)
  yy, xx = c.yy, c.xx
  horizon = HEIGHT * rng.uniform(0.35, 0.5)
  vx = WIDTH * rng.uniform(0.35, 0.65)
  road_w = WIDTH * rng.uniform(0.28, 0.5)
  side_w = road_w * rng.uniform(1.35, 1.8)
  t = np.clip((yy - horizon) / (HEIGHT - horizon), 0.0, None)  # 0 at the horizon, 1 at the bottom
  ground = yy >= horizon

  # Skyline: building blocks, trees and gaps above the horizon.
  x = 0.0
  while x < WIDTH:
    w = rng.uniform(12, 45)
    kind = rng.choice(3, p=[0.65, 0.25, 0.1])
    if kind == 0:
      top = horizon - rng.uniform(0.15, 0.95) * horizon
      c.paint(c.rect(x, top, x + w, horizon + 1), BUILDING)
    elif kind == 1:
      r = w / 2
      c.paint(c.ellipse(x + r, horizon - r * rng.uniform(0.4, 1.0), r, r * rng.uniform(0.7, 1.2)),
              VEGETATION)
      c.paint(c.rect(x, horizon - 2, x + w, horizon + 1), VEGETATION)
    x += w
  # Ground: road corridor, sidewalks, then building fronts or terrain strips on each side.
  dx = xx - vx
  for side in (-1, 1):
    outer = (dx * side >= t * side_w) & ground
    c.paint(outer, TERRAIN if rng.uniform() < 0.35 else BUILDING)
  c.paint(ground & (np.abs(dx) < t * side_w), SIDEWALK)
  c.paint(ground & (np.abs(dx) < t * road_w), ROAD)
  # Low walls / fences along the outer edge of a sidewalk.
  for side in (-1, 1):
    u = rng.uniform()
    if u < 0.5:
      band = ground & (dx * side >= t * side_w) & (dx * side < t * side_w + 16 * t + 1)
      c.paint(band, WALL if u < 0.25 else FENCE)

  # Things, far to near (painter's algorithm): poles with signs/lights, trees, persons, cars.
  things = []
  for _ in range(rng.integers(1, 5)):
    things.append(("pole", rng.uniform(0.15, 1.0), rng.choice([-1, 1])))
  for _ in range(rng.integers(0, 3)):
    things.append(("tree", rng.uniform(0.15, 1.0), rng.choice([-1, 1])))
  for _ in range(rng.integers(0, 5)):
    things.append(("person", rng.uniform(0.2, 1.0), rng.choice([-1, 1])))
  for _ in range(rng.integers(0, 5)):
    things.append(("car", rng.uniform(0.15, 1.0), rng.uniform(-0.75, 0.75)))
  things.sort(key=lambda th: th[1])
  for kind, depth, where in things:
    gy = horizon + depth * (HEIGHT - horizon)  # ground contact row
    if kind == "pole":
      px = vx + where * depth * road_w * 1.08
      pw = max(1.0, 3.0 * depth)
      ph = 70.0 * depth + 6
      c.paint(c.rect(px - pw / 2, gy - ph, px + pw / 2, gy), POLE)
      top = rng.uniform()
      if top < 0.4:
        s = 9 * depth + 2
        c.paint(c.rect(px - s / 2, gy - ph - s * 0.9, px + s / 2, gy - ph + 0.1 * s), SIGN)
      elif top < 0.7:
        s = 5 * depth + 1.5
        c.paint(c.rect(px - s / 2, gy - ph - 2.2 * s, px + s / 2, gy - ph + 0.2 * s), LIGHT)
    elif kind == "tree":
      px = vx + where * depth * (side_w + 0.15 * road_w)
      r = 22 * depth + 3
      c.paint(c.rect(px - max(1, 2 * depth), gy - 45 * depth - 3, px + max(1, 2 * depth), gy),
              VEGETATION)
      c.paint(c.ellipse(px, gy - 45 * depth - r * 0.6, r, r * 0.8), VEGETATION)
    elif kind == "person":
      px = vx + where * depth * (road_w + side_w) / 2
      ph = 38 * depth + 4
      pw = ph * 0.28
      body = c.ellipse(px, gy - ph * 0.45, pw / 2, ph * 0.45)
      head = c.ellipse(px, gy - ph * 0.9, pw * 0.3, ph * 0.1 + 0.5)
      c.paint(body | head, PERSON, instance=True)
    else:  # car
      cw = 55 * depth + 4
      ch = cw * rng.uniform(0.45, 0.6)
      px = vx + where * depth * road_w
      body = c.rect(px - cw / 2, gy - ch * 0.65, px + cw / 2, gy)
      cabin = c.rect(px - cw * 0.32, gy - ch, px + cw * 0.32, gy - ch * 0.6)
      c.paint(body | cabin, CAR, instance=True)
  return c


# ----------------------------------------------------------------------------------------------
# Rendering per domain.


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of an (H, W, C) float image, edge-replicated borders."""
  r = max(1, int(np.ceil(3 * sigma)))
  k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  k /= k.sum()
  for axis in (0, 1):
    pad = [(0, 0)] * img.ndim
    pad[axis] = (r, r)
    p = np.pad(img, pad, mode="edge")
    n = img.shape[axis]
    img = sum(w * np.take(p, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
  return img


def render(c: _Canvas, domain: str, rng: np.random.Generator) -> np.ndarray:
  """Label layout -> (H, W, 3) uint8 image in the given domain's appearance."""
  pal = np.zeros((256, 3), np.float32)
  for cls, col in _PALETTES[domain].items():
    pal[cls] = col
  img = pal[c.label].copy()
  yy, xx = c.yy, c.xx
  lab = c.label
  # Instance colours: cars have random paint; persons random clothes around the class colour.
  inst_cols = np.asarray([(0, 0, 0)] + [list(v) for v in c.inst_colour[1:]], np.float32)
  icol = inst_cols[c.inst]
  is_car = lab == CAR
  is_person = lab == PERSON
  if domain == "source":
    car_col = 40 + 200 * icol  # vivid random paint
    img[is_car] = car_col[is_car]
    img[is_person] = img[is_person] * (0.75 + 0.5 * icol[is_person])
    # Textures: brick courses and window grid, striped road, leafy noise.
    b = lab == BUILDING
    windows = ((xx % 8) < 4) & ((yy % 9) < 5)
    img[b & windows] *= 0.55
    img[b & ((yy % 3) == 0)] *= 0.9
    img[(lab == FENCE) & ((xx % 4) < 2)] *= 0.6
    v = lab == VEGETATION
    img[v] *= (0.8 + 0.4 * rng.uniform(size=v.sum()))[:, None]
    img[lab == ROAD] += rng.normal(0, 4, size=((lab == ROAD).sum(), 1))
    img *= rng.uniform(0.9, 1.1)  # global exposure
    img += rng.normal(0, 3, size=img.shape)
  else:
    car_col = (40 + 200 * icol) @ _TARGET_COLOUR.T * _TARGET_CAST * 0.9 + 12  # same paint, shifted
    img[is_car] = car_col[is_car]
    img[is_person] = img[is_person] * (0.8 + 0.4 * icol[is_person])
    b = lab == BUILDING
    panels = ((xx % 5) < 1) | ((yy % 12) < 2)  # concrete panels instead of brick and windows
    img[b & panels] *= 1.25
    img[(lab == FENCE) & ((yy % 3) < 1)] *= 1.4
    v = lab == VEGETATION
    img[v] *= (0.85 + 0.3 * np.sin(xx[v] * 0.9) * np.cos(yy[v] * 0.7))[:, None]
    r = lab == ROAD
    img[r] *= (0.85 + 0.3 * rng.uniform(size=r.sum()))[:, None]  # grainy asphalt
    # Lighting: a horizontal gradient plus a darker bottom; colour cast; gamma.
    side = rng.choice([-1, 1])
    light = 1.0 + 0.35 * side * (xx / WIDTH - 0.5) - 0.25 * (yy / HEIGHT)
    img *= light[..., None]
    img *= np.asarray([1.05, 0.97, 0.85], np.float32) * rng.uniform(0.8, 1.05)
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** 0.8
    img = _blur(img, rng.uniform(0.8, 1.3))
    img += rng.normal(0, 7, size=img.shape)
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def generate(domain: str, split: str, index: int):
  """One example: ((H, W, 3) uint8 image, (H, W) uint8 train-id label); pure in its arguments."""
  rng = np.random.default_rng([BASE_SEED, _DOMAIN_ID[domain], _SPLIT_ID[split], index])
  canvas = sample_layout(rng)
  image = render(canvas, domain, rng)
  return image, canvas.label.copy()


class UdajaxDemo(common.Builder, skip_registration=True):
  """Procedural street scenes in two appearance domains (source / target); see module docstring."""

  name = "udajax_demo"
  VERSION = common.tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": ("Softer target shift (hue rotation 30 degrees, saturation 0.85); rebuilds stale "
                "demos."),
  }
  BUILDER_CONFIGS = [
      common.SegConfig(name="source", description="Source domain appearance.",
                       size=(WIDTH, HEIGHT)),
      common.SegConfig(name="target", description="Target domain appearance.",
                       size=(WIDTH, HEIGHT)),
  ]

  def __init__(self, *, sizes: Optional[dict] = None, **kwargs):
    super().__init__(**kwargs)
    self._sizes = sizes or SPLIT_SIZES[self.builder_config.name]
    self.build_stats = common.BuildStats()

  def _info(self):
    return self.dataset_info_from_configs(
        description=__doc__,
        features=common.seg_features(self.builder_config.size),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, n) for split, n in self._sizes.items()}

  def _generate_examples(self, split, n):
    domain = self.builder_config.name
    for i in range(n):
      image, label = generate(domain, split, i)
      self.build_stats.add(split, "examples")
      yield i, {
          "image": common.encode_png(image, compress_level=1),
          "label": common.encode_png(label, compress_level=1),
          "file_name": f"{domain}/{split}/{i:05d}.png",
      }
