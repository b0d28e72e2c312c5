"""Copy detection: telling an edited copy of an image from a look-alike, for dedup.

| module | holds |
|---|---|
| ``edits.py`` | the one vocabulary of copy edits: planted copies, calibration copies, the descriptor's training views |
| ``copy_descriptor.py`` | a hand-made descriptor (low DCT frequencies + colour histogram), no training |
| ``network.py`` | the trained descriptor's network (residual CNN, GeM pooling) and its folder on disk |
| ``loss.py``, ``training.py`` | SSCD-style training on the pool itself, without labels: InfoNCE + entropy |
| ``calibration.py`` | dedup thresholds from held-out synthetic copies against unrelated pool images |
| ``stage.py`` | ``dinov2 train-descriptor``: train, calibrate, write the folder |
| ``verify.py`` | pixel verification of candidate pairs: the two images aligned, then correlated |

``embed.model: descriptor:<folder>`` embeds with the trained descriptor; ``dedup.verify`` verifies its pairs.
"""
