"""PNG encode/decode for images on the wire (no pickle; size-checked)."""

from __future__ import annotations

import io

from PIL import Image

MAX_IMAGE_PIXELS = 64 * 1024 * 1024


def to_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def from_png(data: bytes) -> Image.Image:
    """Decode PNG/JPEG bytes to an RGB image. Raises ValueError on anything that is not a readable image."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image too large: {image.width}x{image.height}")
        return image.convert("RGB")
    except (OSError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ValueError(f"not a readable image: {exc}") from None
