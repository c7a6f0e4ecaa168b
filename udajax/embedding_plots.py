"""Pictures of a feature-space measurement (`udajax.embeddings.measure`): centroid cosine
heatmaps and the 2-D projection, as matplotlib figures, PNG files or (H, W, 3) uint8 arrays
for clu's image summaries. matplotlib's Agg canvas only (no pyplot, no display needed).
"""

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from udajax import labels as labels_lib

MARKERS = {0: "o", 1: "^"}  # source: circles, target: triangles
_MATRICES = (("cosine/source", "source centroids"), ("cosine/target", "target centroids"),
             ("cosine/source_target", "source (rows) vs target (columns)"))


def _heatmap(ax, matrix, names, title, first):
  masked = np.ma.masked_invalid(matrix)
  cmap = _cmap()
  image = ax.imshow(masked, cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest")
  ticks = np.arange(len(names))
  ax.set_xticks(ticks, labels=names, rotation=90, fontsize=6)
  # Class names on the first panel's rows only: text is most of the rendering time.
  ax.set_yticks(ticks, labels=names if first else [], fontsize=6)
  ax.set_title(title, fontsize=9)
  return image


def _cmap():
  import matplotlib
  return matplotlib.colormaps["RdBu_r"].with_extremes(bad="#d0d0d0")  # grey: absent classes


def _draw_cosine(fig, axes, result, names, colorbar_axes):
  image = None
  for i, (ax, (key, title)) in enumerate(zip(axes, _MATRICES)):
    image = _heatmap(ax, result["matrices"][key], names, title, first=i == 0)
  s = result["scalars"]
  axes[0].set_xlabel(f"orthogonality {s['orthogonality/source']:.3f}", fontsize=8)
  axes[1].set_xlabel(f"orthogonality {s['orthogonality/target']:.3f}", fontsize=8)
  axes[2].set_xlabel(f"alignment {s['alignment']:.3f}", fontsize=8)
  fig.colorbar(image, cax=colorbar_axes, label="cosine similarity")


def _draw_projection(ax, result, names):
  p = result["projection"]
  colors = labels_lib.PALETTE[:len(names)] / 255.0
  for domain, marker in MARKERS.items():
    sel = p["domains"] == domain
    if np.any(sel):
      ax.scatter(p["points"][sel, 0], p["points"][sel, 1], c=colors[p["classes"][sel]],
                 marker=marker, s=9, linewidths=0.2, edgecolors="k", alpha=0.8)
  ev = p["explained_variance"]
  ax.set_xlabel(f"PC 1 ({100 * ev[0]:.0f}% of the sample's variance)", fontsize=8)
  ax.set_ylabel(f"PC 2 ({100 * ev[1]:.0f}%)", fontsize=8)
  ax.tick_params(labelsize=6)
  s = result["scalars"]
  ax.set_title(f"PCA of {len(p['points'])} features; clustering "
               f"{s['clustering/joint/mean']:.2f}", fontsize=9)
  present = sorted(set(int(c) for c in p["classes"]))
  handles = [Line2D([], [], ls="", marker="o", color="0.3", label="source"),
             Line2D([], [], ls="", marker="^", color="0.3", label="target")]
  handles += [Line2D([], [], ls="", marker="s", color=colors[c], label=names[c]) for c in present]
  ax.legend(handles=handles, fontsize=5, loc="center left", bbox_to_anchor=(1.0, 0.5),
            frameon=False)


# Fixed axes positions (constrained layout would double the rendering time).
_BOTTOM, _HEIGHT = 0.24, 0.62


def cosine_figure(result, names, title=None) -> Figure:
  """Three heatmaps: source, target and source-vs-target centroid cosine similarity."""
  fig = Figure(figsize=(13, 4.8), dpi=100)
  axes = [fig.add_axes((left, _BOTTOM, 0.26, _HEIGHT)) for left in (0.07, 0.36, 0.65)]
  _draw_cosine(fig, axes, result, names, fig.add_axes((0.93, _BOTTOM + 0.1, 0.01,
                                                       _HEIGHT - 0.2)))
  if title:
    fig.suptitle(title, fontsize=10)
  return fig


def projection_figure(result, names, title=None) -> Figure:
  """The 2-D projection: colour = class (Cityscapes palette), marker = domain."""
  fig = Figure(figsize=(6.5, 5), dpi=100)
  _draw_projection(fig.add_axes((0.12, 0.1, 0.62, 0.8)), result, names)
  if title:
    fig.suptitle(title, fontsize=10)
  return fig


def overview_figure(result, names, title=None) -> Figure:
  """Heatmaps and projection in one row (what the trainer logs)."""
  fig = Figure(figsize=(19, 4.8), dpi=100)
  axes = [fig.add_axes((left, _BOTTOM, 0.18, _HEIGHT)) for left in (0.045, 0.235, 0.425)]
  _draw_cosine(fig, axes, result, names, fig.add_axes((0.612, _BOTTOM + 0.1, 0.007,
                                                       _HEIGHT - 0.2)))
  _draw_projection(fig.add_axes((0.685, 0.12, 0.23, 0.74)), result, names)
  if title:
    fig.suptitle(title, fontsize=11)
  return fig


def figure_array(fig: Figure) -> np.ndarray:
  """(1, H, W, 3) uint8 RGB of a figure (the layout clu's `write_images` takes)."""
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[None, :, :, :3].copy()


def save(fig: Figure, path: str) -> None:
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=100)
