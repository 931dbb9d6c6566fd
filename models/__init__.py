"""Pure PyTorch: the pix2pix colorizer, Lab colour science and the model artifact.

No Ray, no storage, no CLI here (DESIGN.md): everything above imports this, never the reverse.
"""
