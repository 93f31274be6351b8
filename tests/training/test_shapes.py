"""The built-in shapes data set: deterministic per seed, balanced, 64x64 RGB, splits disjoint."""

from __future__ import annotations

import numpy as np

from training import shapes


def test_same_seed_same_images_different_seed_different() -> None:
    a, la = shapes.generate(seed=3, split="train", count=16)
    b, lb = shapes.generate(seed=3, split="train", count=16)
    c, _ = shapes.generate(seed=4, split="train", count=16)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)
    # an image depends on (seed, split, index) only, not on how many were asked for
    more, _ = shapes.generate(seed=3, split="train", count=20)
    assert np.array_equal(more[:16], a)


def test_train_and_val_never_share_an_image() -> None:
    train, _ = shapes.generate(0, "train", 24)
    val, _ = shapes.generate(0, "val", 24)
    assert not any(np.array_equal(t, v) for t in train for v in val)


def test_images_are_64x64_rgb_balanced_and_varied() -> None:
    k = len(shapes.CLASSES)
    assert k >= 6
    images, labels = shapes.generate(0, "val", 6 * k)
    assert images.shape == (6 * k, 64, 64, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [6] * k
    # random colours and noisy backgrounds: no two images alike, and every image has texture
    assert len({img.tobytes() for img in images}) == 6 * k
    assert all(img.std() > 5 for img in images)
