"""Quickstart: knowledge neurons of "banana" in the embedded model, from Python (README, "Use from Python").

    python examples/quickstart.py [output folder]          # about a minute on a laptop CPU

It identifies banana's neurons on one selected sample (the two-stage filter with the default rule), captions the image
cleanly and with the neurons zeroed and patched, draws the top neuron's heatmap panel (the paper's Fig. 3), and writes
``quickstart.json`` and ``neuron.png`` into the output folder (default ``runs/quickstart``).
"""

import json
import sys
from pathlib import Path

import knexp

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart")
# a small toy-world split and one traced object keep it quick; drop these overrides for the full defaults
s = knexp.session("model=embedded", "knowledge=banana", "data.num_images=60", "data.per_knowledge=1",
                  "trace.objects=[banana]", "logger=none", output_dir=out)

found = s.identify(method="ours")  # selection under the paper's constraints, then stage 1 and stage 2
print(found.selection.message)
sample = found.results[0]
neurons = sample.neurons
print("neurons per layer:\n" + neurons.frame().groupby("layer").size().to_string())

image = s.data.load_image(sample.candidate.image_id)
captions = {
    "clean": s.caption([image])[0],
    "zeroed": s.caption([image], neurons=neurons, intervention="zero")[0],  # ablate the set at every image position
    "patched": s.caption([image], neurons=neurons, intervention="inpainted")[0],  # shift it as removing the banana did
    "inpainted image": sample.candidate.inpainted_caption,  # what the counterfactual image itself gives
}
for name, text in captions.items():
    print(f"{name:>16}: {text}")

heat = s.heatmap(sample)
figure = s.figure(sample, out / "neuron.png")
where = heat.scores  # how the map points at the banana (docs/method.md, "Localization measures")
print(f"top neuron L{heat.layer} U{heat.unit}: pointing {where['pointing']:.2f}, area-matched IoU "
      f"{where['area_iou']:.2f}, AUC {where['auc']:.2f} -> {figure}")

summary = {"knowledge": found.knowledge, "image_id": sample.candidate.image_id,
           "selected_caption": sample.candidate.original_caption, "rule": sample.rule, "size": len(neurons),
           "layers": sorted(set(neurons.layers.tolist())), "live_window": found.context.live_layers,
           "captions": captions, "top_neuron": [heat.layer, heat.unit], **where, "figure": str(figure),
           "mentions": {name: s.knowledge.mentioned_in(text) for name, text in captions.items()}}
out.mkdir(parents=True, exist_ok=True)
(out / "quickstart.json").write_text(json.dumps(summary, indent=1))
