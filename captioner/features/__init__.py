"""Image features: the pretrained CNNs (encoders), JPEG decoding (jpeg) and the cached extraction (extraction).
Imports only captioner.data and captioner.utils."""
