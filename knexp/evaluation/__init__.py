"""Evaluation stage: scoring captions (object mentions) and, later, captions under neuron perturbation."""
