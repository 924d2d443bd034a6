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


def group_strip(
    source_png: bytes, edit_pngs: list[bytes], rewards: list[float], label: str, cell: int = 96
) -> Image.Image:
    """One row: the source, then every edit, each ``cell`` px square, with ``label`` and each edit's reward written
    under it (for TensorBoard / W&B image grids of the best and worst groups of a step)."""
    from PIL import ImageDraw

    tiles = [from_png(source_png), *(from_png(p) for p in edit_pngs)]
    captions = [label[:14], *(f"{r:.2f}" for r in rewards)]
    strip = Image.new("RGB", (cell * len(tiles), cell + 14), "white")
    draw = ImageDraw.Draw(strip)
    for i, (tile, caption) in enumerate(zip(tiles, captions, strict=True)):
        strip.paste(tile.resize((cell, cell)), (i * cell, 0))
        draw.text((i * cell + 3, cell + 1), caption, fill="black")
    return strip


def stack_rows(rows: list[Image.Image]) -> Image.Image:
    """Rows of possibly different widths, top to bottom, on white."""
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for row in rows:
        out.paste(row, (0, y))
        y += row.height
    return out
