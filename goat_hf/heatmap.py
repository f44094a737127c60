"""The routing heatmap of model cards and trackers: each layer's share of routed tokens per expert (Pillow)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

CELL_WIDTH, MAX_CELL_HEIGHT, MAX_GRID_HEIGHT = 28, 14, 900  # pixels
LABEL_HEIGHT, PAD = 14, 8
PILLOW_MISSING = "The routing heatmap needs Pillow: pip install pillow (or goat_hf[heatmap])"
UNDER, BALANCED, OVER = (33, 102, 172), (247, 247, 247), (178, 24, 43)  # blue, white, red


def draw_load_heatmap(loads: dict[str, list[float]], path: str | os.PathLike) -> Path:
    """Draw `loads` ({layer name: E shares summing to 1}) with `render_load_heatmap` and save it as a PNG."""
    path = Path(path)
    render_load_heatmap(loads).save(path, format="PNG")
    return path


def render_load_heatmap(loads: dict[str, list[float]]) -> Image.Image:
    """`loads` ({layer name: E shares summing to 1}) as a layers x experts grid, a Pillow RGB image.

    White is the balanced share 1/E; blue fades to 0 (an idle expert), red saturates at 2/E and above (an
    expert taking twice its share). Rows are labelled with the layer names (every few rows when there are many).
    """
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as error:
        raise ImportError(PILLOW_MISSING) from error

    names, rows = list(loads), list(loads.values())
    num_experts = len(rows[0])
    cell_height = max(1, min(MAX_CELL_HEIGHT, MAX_GRID_HEIGHT // len(rows)))
    label_every = math.ceil(LABEL_HEIGHT / cell_height)
    font = ImageFont.load_default(size=11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = int(max(probe.textlength(name, font=font) for name in names)) + PAD
    grid_x, grid_y = PAD + label_width, PAD + 2 * LABEL_HEIGHT
    title = "Share of routed tokens per expert (rows: layers)"
    width = max(grid_x + num_experts * CELL_WIDTH, PAD + int(probe.textlength(title, font=font)), 260) + PAD
    height = grid_y + len(rows) * cell_height + 3 * LABEL_HEIGHT + 2 * PAD

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((PAD, PAD), title, fill="black", font=font)
    expert_every = math.ceil(24 / CELL_WIDTH * len(str(num_experts)))
    for j in range(0, num_experts, expert_every):
        draw.text((grid_x + j * CELL_WIDTH + CELL_WIDTH // 2, grid_y - 2), str(j), fill="black", font=font, anchor="mb")
    for i, (name, shares) in enumerate(zip(names, rows, strict=True)):
        top = grid_y + i * cell_height
        for j, share in enumerate(shares):
            left = grid_x + j * CELL_WIDTH
            draw.rectangle(
                (left, top, left + CELL_WIDTH - 1, top + cell_height - 1), fill=share_colour(share, num_experts)
            )
        if i % label_every == 0:
            draw.text((grid_x - PAD // 2, top + cell_height / 2), name, fill="black", font=font, anchor="rm")
    _draw_legend(draw, font, PAD, grid_y + len(rows) * cell_height + PAD, num_experts)
    return image


def share_colour(share: float, num_experts: int) -> tuple[int, int, int]:
    """Diverging colour: 0 -> blue, 1/E -> white, >= 2/E -> red."""
    t = max(0.0, min(2.0, share * num_experts)) - 1.0  # [-1, 1], 0 = balanced
    end = OVER if t > 0 else UNDER
    return tuple(round(b + abs(t) * (e - b)) for b, e in zip(BALANCED, end, strict=True))


def _draw_legend(draw, font, left: int, top: int, num_experts: int) -> None:
    bar_width = 200
    for x in range(bar_width):
        share = 2.0 / num_experts * x / (bar_width - 1)
        draw.line((left + x, top, left + x, top + LABEL_HEIGHT - 2), fill=share_colour(share, num_experts))
    below = top + LABEL_HEIGHT
    draw.text((left, below), "0", fill="black", font=font, anchor="lt")
    draw.text((left + bar_width // 2, below), "1/E (balanced)", fill="black", font=font, anchor="mt")
    draw.text((left + bar_width, below), ">= 2/E", fill="black", font=font, anchor="rt")
