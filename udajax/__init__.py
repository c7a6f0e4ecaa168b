"""udajax: unsupervised domain adaptation for semantic segmentation in JAX/Flax.

Reimplements Toldo, Michieli, Zanuttigh, "Unsupervised Domain Adaptation in Semantic
Segmentation via Orthogonal and Clustered Embeddings" (WACV 2021).

Importing `udajax` (and `udajax.models`, `udajax.losses`, `udajax.train_step`) needs only
jax/flax/optax/numpy; TensorFlow, TFDS and clu are imported only by the data and logging modules.
"""

__version__ = "0.1.0"
