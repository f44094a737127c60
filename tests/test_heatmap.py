"""The routing heatmap: the colour scale, one cell per (layer, expert), readable sizes, and Pillow's absence."""

from __future__ import annotations

import sys

import pytest
from PIL import Image

from goat_hf.heatmap import BALANCED, CELL_WIDTH, MAX_GRID_HEIGHT, OVER, UNDER, draw_load_heatmap, share_colour


@pytest.mark.parametrize("num_experts", [2, 8])
def test_colour_scale_is_white_at_balance_blue_when_idle_red_at_twice(num_experts):
    assert share_colour(1 / num_experts, num_experts) == BALANCED
    assert share_colour(0.0, num_experts) == UNDER
    assert share_colour(2 / num_experts, num_experts) == OVER == share_colour(1.0, num_experts)
    colours = [share_colour(share / num_experts, num_experts) for share in (0.0, 0.5, 1.0, 1.5, 2.0)]
    warmth = [red - blue for red, _, blue in colours]
    assert warmth == sorted(warmth)  # from blue through white to red


def colour_runs(image: Image.Image, y: int) -> list[tuple[tuple[int, int, int], int]]:
    """(colour, length) of the runs of scale colours along the pixel row y."""
    runs: list[list] = []
    for x in range(image.width):
        pixel = image.getpixel((x, y))
        if pixel not in (UNDER, BALANCED, OVER):
            continue
        if runs and runs[-1][0] == pixel and runs[-1][2] == x - 1:
            runs[-1][1:] = [runs[-1][1] + 1, x]
        else:
            runs.append([pixel, 1, x])
    return [(colour, length) for colour, length, _ in runs]


def test_each_cell_shows_its_layer_and_expert(tmp_path):
    loads = {"layers.0.q_proj": [1.0, 0.0, 0.0, 0.0], "layers.0.v_proj": [0.25, 0.25, 0.25, 0.25]}
    image = Image.open(draw_load_heatmap(loads, tmp_path / "map.png")).convert("RGB")
    top, height = 8 + 2 * 14, 14  # below the title and the expert numbers; 14 px rows
    assert colour_runs(image, top + height // 2) == [(OVER, CELL_WIDTH), (UNDER, 3 * CELL_WIDTH)]
    assert colour_runs(image, top + height + height // 2) == [(BALANCED, 4 * CELL_WIDTH)]


def test_many_layers_keep_the_picture_bounded(tmp_path):
    loads = {f"model.layers.{i}.mlp.down_proj": [0.5, 0.5] for i in range(500)}
    image = Image.open(draw_load_heatmap(loads, tmp_path / "map.png"))
    assert MAX_GRID_HEIGHT // 2 < image.height < MAX_GRID_HEIGHT + 200


def test_without_pillow_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="needs Pillow: pip install pillow"):
        draw_load_heatmap({"layer": [1.0]}, tmp_path / "map.png")
