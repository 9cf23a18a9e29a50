"""Evaluation protocols on frozen or fine-tuned backbones: kNN, linear probe, fine-tuning."""
