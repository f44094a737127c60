"""Routing pictures in the experiment trackers: at each evaluation, the routing heatmap as an image and every layer's
expert loads and balance loss as scalars, next to the loss curves Trainer's own tracker callbacks draw.

Trainer reports to trackers through its integration callbacks (`report_to`); this callback hands them what
GoatTrainerMixin recorded at the last logging step (the training routing: `routing_loads`, `routing_aux`). Scalars
go through each tracker callback's own `on_log`, so they land where that tracker puts Trainer's metrics (under
`train/`); the image goes to TensorBoard and W&B, the trackers that show images beside the curves.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from transformers import TrainerCallback
from transformers.integrations import MLflowCallback, TensorBoardCallback, TrackioCallback, WandbCallback
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

from .heatmap import PILLOW_MISSING, render_load_heatmap

logger = logging.getLogger(__name__)

HEATMAP_TAG = "goat_routing_heatmap"  # under train/ like every training metric
SCALAR_TRACKERS = (TensorBoardCallback, WandbCallback, MLflowCallback, TrackioCallback)  # on_log only logs there


def routing_scalars(loads: dict[str, list[float]], aux: dict[str, float]) -> dict[str, float]:
    """`goat_load/<layer>/expert_<j>` (share of the layer's picks, 1/E = balanced) and `goat_aux/<layer>` (the
    layer's balance loss E·Σ f·P divided by k, 1.0 = balanced)."""
    scalars = {f"goat_load/{layer}/expert_{j}": share for layer, shares in loads.items() for j, share in
               enumerate(shares)}  # fmt: skip
    scalars.update({f"goat_aux/{layer}": value for layer, value in aux.items()})
    return scalars


class RoutingTrackerCallback(TrainerCallback):
    """Sends the routing of the last logged training steps to the trackers of `report_to` at each evaluation."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self._noted: set[str] = set()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loads = self.trainer.routing_loads
        if not state.is_world_process_zero or not loads:
            return  # before the first logging step there is no routing to show
        trackers = [cb for cb in self.trainer.callback_handler.callbacks if isinstance(cb, SCALAR_TRACKERS)]
        self._note_others(args.report_to or [])
        if not trackers:
            return
        scalars = routing_scalars(loads, self.trainer.routing_aux)
        image = self._image(loads)
        for tracker in trackers:
            tracker.on_log(args, state, control, logs=scalars)
            if image is not None:
                _log_image(tracker, args, state, image)

    def _image(self, loads: dict[str, list[float]]) -> Any:
        try:
            return render_load_heatmap(loads)
        except ImportError:
            self._note("pillow", f"{PILLOW_MISSING}; the trackers get the routing scalars without the heatmap.")
            return None

    def _note_others(self, report_to: list[str]) -> None:
        for name in report_to:
            if INTEGRATION_TO_CALLBACK.get(name, SCALAR_TRACKERS[0]) not in SCALAR_TRACKERS:
                self._note(name, f"GOAT routing is not sent to {name!r}: it goes to TensorBoard, W&B, MLflow and "
                                 "Trackio (the heatmap image to the first two).")  # fmt: skip

    def _note(self, key: str, message: str) -> None:
        if key not in self._noted:
            self._noted.add(key)
            logger.info(message)


def _log_image(tracker: TrainerCallback, args: Any, state: Any, image: Any) -> None:
    tag = f"train/{HEATMAP_TAG}"
    if isinstance(tracker, TensorBoardCallback) and tracker.tb_writer is not None:
        tracker.tb_writer.add_image(tag, np.asarray(image), state.global_step, dataformats="HWC")
        tracker.tb_writer.flush()
    elif isinstance(tracker, WandbCallback) and tracker._wandb is not None and tracker._initialized:
        tracker._wandb.log({tag: tracker._wandb.Image(image), "train/global_step": state.global_step})
