"""PIL-exact image operations in TensorFlow, for the tf.data input pipeline (udajax/input_pipeline).

* `tf_resize_image` / `tf_resize_label`: bicubic with antialiasing, rounded and clipped like PIL's
  uint8 output, for images; PIL-style nearest neighbour for labels.
* `gaussian_blur`: PIL's `GaussianBlur(radius=sigma)`, which approximates a Gaussian of standard
  deviation sigma by 3 passes of a fractional box blur per axis with edge-replicated borders.
* `normalize`: RGB -> BGR minus the reference's mean (`udajax.images.IMAGE_MEAN_BGR`), no scaling.
"""

from udajax.datasets.common import tf  # importing it hides accelerators from TF
from udajax.images import IMAGE_MEAN_BGR


def _pil_nearest_indices(in_size, out_size):
  """PIL nearest: src = floor((dst + 0.5) * in / out)."""
  scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
  src = tf.floor((tf.range(out_size, dtype=tf.float64) + 0.5) * scale)
  return tf.minimum(tf.cast(src, tf.int32), in_size - 1)


def tf_resize_label(label, size):
  """(H, W) label -> size (h, w) by PIL-style nearest neighbour (no-op when equal)."""
  h, w = size
  shape = tf.shape(label)
  def _resize():
    out = tf.gather(label, _pil_nearest_indices(shape[0], h), axis=0)
    return tf.gather(out, _pil_nearest_indices(shape[1], w), axis=1)
  same = tf.logical_and(tf.equal(shape[0], h), tf.equal(shape[1], w))
  return tf.cond(same, lambda: label, _resize)


def tf_resize_image(image, size):
  """(H, W, 3) uint8 -> (h, w, 3) float32 bicubic (antialiased, like PIL), rounded to [0, 255]."""
  shape = tf.shape(image)
  def _resize():
    out = tf.image.resize(tf.cast(image, tf.float32), size, method="bicubic", antialias=True)
    return tf.clip_by_value(tf.round(out), 0.0, 255.0)
  same = tf.logical_and(tf.equal(shape[0], size[0]), tf.equal(shape[1], size[1]))
  return tf.cond(same, lambda: tf.cast(image, tf.float32), _resize)


def pil_box_weight(sigma):
  """Edge weight a of one box pass of PIL's `GaussianBlur(radius=sigma)`, 0 <= sigma <= 2.4.

  PIL approximates a Gaussian of standard deviation sigma by 3 box blurs of fractional radius
  r = l + a (Gwosdek et al. 2011). For sigma <= 2.4, l = 0 and a = sigma^2 / (6 - 2 sigma^2), so a
  pass is the 3-tap kernel [a, 1, a] / (1 + 2a).
  """
  s2 = tf.square(tf.clip_by_value(tf.cast(sigma, tf.float32), 0.0, 2.4))
  return s2 / (6.0 - 2.0 * s2)


def _three_box_passes(img, a, axis):
  """PIL's 3 passes of the box kernel [a, 1, a] / (1 + 2a) along `axis`, edge-replicated borders."""
  w_side = a / (1.0 + 2.0 * a)
  w_mid = 1.0 / (1.0 + 2.0 * a)
  pad = [[0, 0]] * 3
  pad[axis] = [1, 1]
  for _ in range(3):
    n = tf.shape(img)[axis]
    p = tf.pad(img, pad, mode="SYMMETRIC")  # replicating one edge pixel = symmetric padding by one
    if axis == 0:
      img = w_mid * img + w_side * (p[:n] + p[2:])
    else:
      img = w_mid * img + w_side * (p[:, :n] + p[:, 2:])
  return img


def _blur_axis(img, a, axis):
  """Exactly `_three_box_passes`, fast: the composite 7-tap kernel as a depthwise convolution for
  the interior, and the 3-pass recursion on 6-line strips for the 3 lines at each border."""
  n = tf.shape(img)[axis]
  a2, a3 = a * a, a * a * a
  outer, inner = 3 * a2, 3 * a + 3 * a3
  k7 = tf.stack([a3, outer, inner, 1 + 6 * a2, inner, outer, a3]) / tf.pow(1 + 2 * a, 3)
  channels = img.shape[-1] or 3
  shape = [7, 1, 1, 1] if axis == 0 else [1, 7, 1, 1]
  filt = tf.tile(tf.reshape(k7, shape), [1, 1, channels, 1])
  pad = [[0, 0]] * 4
  pad[axis + 1] = [3, 3]
  mid = tf.nn.depthwise_conv2d(tf.pad(img[None], pad), filt, [1, 1, 1, 1], "VALID")[0]
  if axis == 0:
    top = _three_box_passes(img[:6], a, 0)[:3]
    bottom = _three_box_passes(img[n - 6:], a, 0)[3:]
    return tf.concat([top, mid[3:n - 3], bottom], axis=0)
  top = _three_box_passes(img[:, :6], a, 1)[:, :3]
  bottom = _three_box_passes(img[:, n - 6:], a, 1)[:, 3:]
  return tf.concat([top, mid[:, 3:n - 3], bottom], axis=1)


def gaussian_blur(image, sigma):
  """(H, W, C) float image, scalar 0 <= sigma <= 2.4 -> PIL's GaussianBlur(radius=sigma).

  Like PIL: 3 horizontal then 3 vertical passes of the box kernel [a, 1, a] / (1 + 2a), each with
  edge-replicated borders (computed as one 7-tap depthwise convolution plus exact borders when
  the image has at least 12 rows and columns). PIL also rounds to uint8 after every pass; we
  round once at the end (mean difference below one grey level).
  """
  a = pil_box_weight(sigma)
  shape = tf.shape(image)
  big = tf.logical_and(shape[0] >= 12, shape[1] >= 12)
  def fast():
    return _blur_axis(_blur_axis(image, a, 1), a, 0)
  def exact():
    return _three_box_passes(_three_box_passes(image, a, 1), a, 0)
  return tf.cond(big, fast, exact)


_RGB_TO_BGR = tf.constant([[0, 0, 1], [0, 1, 0], [1, 0, 0]], tf.float32, shape=[1, 1, 3, 3])


def normalize(image):
  """float32 RGB (H, W, 3) in [0, 255] -> BGR minus the reference mean (exact in float32).

  A 1x1 convolution with a permutation matrix plus a bias: several times faster on CPU than
  `image[..., ::-1] - mean` (a reversed-stride slice).
  """
  out = tf.nn.conv2d(image[None], _RGB_TO_BGR, strides=1, padding="VALID")[0]
  return tf.nn.bias_add(out, -tf.constant(IMAGE_MEAN_BGR, tf.float32))
