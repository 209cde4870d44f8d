"""ccam: voxel-level masks from slice-level tags on 3D medical volumes, by C-CAM (CVPR 2022)."""

__version__ = "0.1.0"
