"""imdb-grad-accum, experiment 2: exact gradient accumulation, by hand (main.py) and through Accelerate."""

import exp_1

if getattr(exp_1, "__project__", None) != "imdb-grad-accum":
    raise ImportError(f"the package exp_1 at {exp_1.__file__} belongs to another project installed under the same "
                      "name; install imdb-grad-accum in a virtual environment of its own")
