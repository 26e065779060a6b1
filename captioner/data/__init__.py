"""Data: captions and images in, cached arrays out. Imports only captioner.utils.

coco (the COCO and Karpathy layouts), shapes and scenes (the built-in generated datasets), vocab (tokenization and
the vocabulary), embeddings (pretrained word vectors), datamodule (batches and the LightningDataModule).
"""
