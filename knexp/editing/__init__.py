"""Editing: act on found neurons for good, by a weight edit (docs/method.md, "Editing with the found neurons").

``target``      what an edit is for: erase k, or swap it for k' (the goal's words, the loss, the success tests);
``sets``        the set an object's edit uses (the consensus of its identification samples), the random controls;
``forcing``     teacher forcing: the position that predicts k, a caption forced after its image, log-probabilities;
``inputs``      what a rule may build its context from (the model, the identification, the data, locality inputs);
``fit``         the gradient fit of the optimized rule and of the fine-tuning baseline;
``rules``       how a set becomes an edit of its ``down_proj`` columns (zero, mean, kn, optimized), one class each;
``preserved``   the preserved keys: second moments of the MLP inputs where an edit must change nothing;
``input_null``  the input-side rule: the set's ``up_proj`` rows, kept off the preserved keys;
``rank_one``    the ROME-style baseline that edits a whole ``down_proj``;
``prompts``     T-generality's questions;
``make``        the ``edit`` group's settings and a timed rule.
The edit as an object and a file is ``knexp.models.weight_edit``; how an edit is scored lives in
``knexp.evaluation.edit_measures``; ``task=edit`` (``knexp.tasks.edit``) runs both.
"""
