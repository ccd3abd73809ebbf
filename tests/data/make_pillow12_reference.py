"""Record the release's resize and CLIP preprocessing as run on Pillow < 13.

The release ran on Pillow < 13, whose bicubic resize always goes horizontally first;
Pillow 13 goes vertically first when the height loses more than twice as many pixels as
the width, and rounds differently there. The project's venv has Pillow 13, so this script
runs in a side venv with the release's stack and records what it computes into
``pillow12_reference.npz`` (a few KB) beside it; tests/test_preprocess.py checks
``trace_rt.preprocess`` against the record. It imports nothing of trace_rt.

    python -m venv /tmp/oldpil
    /tmp/oldpil/bin/pip install "pillow<13" numpy "transformers==4.40.0"
    /tmp/oldpil/bin/python tests/data/make_pillow12_reference.py

Recorded with Pillow 12.3.0, transformers 4.40.0 (the versions are stored in the file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL
import transformers
from PIL import Image
from transformers import CLIPImageProcessor

OUT = Path(__file__).with_name("pillow12_reference.npz")
# (in_h, in_w, out_h, out_w): each loses more height than twice its width loss, where the
# two pass orders round differently.
RESIZES = [(61, 17, 20, 8), (97, 31, 30, 12), (50, 10, 12, 24), (40, 40, 9, 33)]
# Unpadded CLIP preprocessing (image_aspect_ratio != "pad") of a tall frame.
FRAME_HW = (80, 20)
PROCESSOR = {
    "size": {"shortest_edge": 16},
    "crop_size": {"height": 16, "width": 16},
    "resample": 3,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def synthetic_image(h: int, w: int, salt: int) -> np.ndarray:
    """A deterministic noisy uint8 [h, w, 3] image with hard edges (a multiplicative hash,
    so that the test regenerates it without a stored input or a random generator)."""
    i, j, c = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing="ij")
    x = (i * 7919 + j * 104729 + c * 1299709 + salt * 15485863).astype(np.uint64)
    x = (x * np.uint64(2654435761)) >> np.uint64(13)
    img = (x % np.uint64(256)).astype(np.uint8)
    edges = (i // 3 + j // 2) % 2 == 0  # a checkerboard of 0/255 blocks
    return np.where(edges, img, np.where(img > 127, 255, 0).astype(np.uint8))


def main() -> None:
    assert int(PIL.__version__.split(".")[0]) < 13, f"need Pillow < 13, have {PIL.__version__}"
    out: dict[str, np.ndarray] = {
        "pillow_version": np.array(PIL.__version__),
        "transformers_version": np.array(transformers.__version__),
    }
    for k, (h, w, oh, ow) in enumerate(RESIZES):
        img = Image.fromarray(synthetic_image(h, w, k))
        out[f"resize_{h}x{w}_to_{oh}x{ow}"] = np.asarray(img.resize((ow, oh), Image.BICUBIC))
    frame = synthetic_image(*FRAME_HW, len(RESIZES))
    pixels = CLIPImageProcessor(**PROCESSOR)([Image.fromarray(frame)], return_tensors="np")
    out["clip_unpadded_80x20"] = pixels["pixel_values"].astype(np.float32)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes) with Pillow {PIL.__version__}")


if __name__ == "__main__":
    main()
