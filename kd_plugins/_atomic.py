"""Old import path of the atomic directory helpers; they live in :mod:`kd_plugins._checkpoint`."""

from ._checkpoint import apply_umask, atomic_dir, fsync_tree, publish_dir

__all__ = ["atomic_dir", "publish_dir", "apply_umask", "fsync_tree"]
