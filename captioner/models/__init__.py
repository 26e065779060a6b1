"""Captioning models and their decoding (beam search, sampling). Imports only captioner.data, captioner.features
and captioner.utils."""
