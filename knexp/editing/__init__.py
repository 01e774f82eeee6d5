"""Editing: act on found neurons for good, by a weight edit of their output weights (METHOD.md, "Beyond the paper").

``sets``     the neuron set an object's edit uses (the consensus of its identification samples) and the random controls;
``rules``    how a set becomes an edit of its ``down_proj`` columns (zero, mean, kn, optimized);
``fit``      the gradient fit of the optimized rule and of the fine-tuning baseline;
``weights``  the edit as an object (applied for a ``with`` block, restored bit for bit) and as a safetensors file.
How an edit is scored lives in ``knexp.evaluation.edit_measures``; ``task=edit`` (``knexp.tasks.edit``) runs both.
"""
