"""imdb-grad-accum, experiment 1 (one optimizer step per batch) and the building blocks every entry script shares."""

__project__ = "imdb-grad-accum"  # exp_2 checks it: a package named exp_1 from another project must not stand in
