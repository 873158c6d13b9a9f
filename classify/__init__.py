"""Classifier heads and their fusion: numpy arrays in, class probabilities out."""
