"""Caption metrics: the COCO metrics (metrics) and the vectorised CIDEr-D (cider) that SCST uses as its reward.
Imports only captioner.data and captioner.utils."""
