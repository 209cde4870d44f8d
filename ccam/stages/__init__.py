"""One module per stage command; importing this package registers them all, in pipeline order.

A module registers its `Stage` with `ccam.runner.register`; it may also export extra click
commands in a module-level ``COMMANDS`` list (they replace the generated command of that name).
"""

from ccam.stages import prepare
from ccam.stages import train_pcam, sample  # P-CAM, CAMs, coarse masks, M_GC / M_s
from ccam.stages import train_ccam, pseudo_masks, ablation  # C-CAM, pseudo-masks, ablation table
from ccam.stages import refine  # affinity refinement (AffinityNet + random walk), optional
from ccam.stages import train_seg, predict, evaluate  # segmenter, prediction, evaluation
from ccam.stages import export, demo  # commands only, no pipeline stage

MODULES = [prepare, train_pcam, sample, train_ccam, pseudo_masks, refine, train_seg, predict, evaluate, ablation, export, demo]
