"""ccam: voxel-level masks from slice-level tags on 3D medical volumes, by C-CAM (CVPR 2022)."""

from ccam import threads as _threads

_threads.prepare_openmp()  # idle OpenMP threads sleep instead of spinning (must precede `import torch`)

__version__ = "0.1.0"
