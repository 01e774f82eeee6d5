"""Identification stage: the passes each sample needs, reduced per neuron, and the methods that rank them."""
