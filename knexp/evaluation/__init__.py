"""Evaluation stage: captions under an intervention on neuron sets (``perturb``), the protocol of one knowledge's
evaluation (``protocol``), and their scores: Table II (``scores``), Table III (``text_metrics``), object mentions
(``mentions``)."""
