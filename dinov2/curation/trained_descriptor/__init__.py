"""A copy-detection descriptor trained on the pool itself, without labels (SSCD, Pizzi et al. 2022, at CPU size).

| module | holds |
|---|---|
| ``copy_edits.py`` | training edits (crop, rotation, flip, colour, overlay, padding, blur, JPEG), calibration copies |
| ``model.py`` | the network (residual CNN, GeM pooling, L2-normalised projection) and its folder on disk |
| ``loss.py`` | InfoNCE between two views of each image, the entropy (KoLeo) regulariser |
| ``training.py`` | seeded, deterministic training |
| ``calibration.py`` | dedup thresholds from held-out synthetic copies against unrelated pool images |
| ``stage.py`` | ``dinov2 train-descriptor``: train, calibrate, write the folder |

``embed.model: descriptor:<folder>`` embeds with it and records its calibrated thresholds.
"""
