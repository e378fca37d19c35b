"""must-ray: multi-task self-training (MuST, Ghiasi et al., ICCV 2021) on Ray.

Specialised teachers pseudo-label unlabelled images with Ray Data into Parquet examples tables;
one multi-task student trains on those tables with Ray Train.
"""
__version__ = "0.1.0"
