"""The embedded default data: a labelled image source cut into a seed set, an uncurated pool and evaluation
splits, with planted copies and distractors recorded, so that curation is scored instead of assumed.

| module | holds |
|---|---|
| ``bundled.py`` | images that come with installed packages: MNIST digits, photographs |
| ``sources.py`` | Fashion-MNIST or an ImageFolder as the source |
| ``build.py`` | ``dinov2 prepare-default``: the draw, the planted copies, the folder and its manifests |
| ``ground_truth.py`` | what was planted, and ``score_curation`` |
"""
