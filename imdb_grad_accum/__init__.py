"""imdb-grad-accum: the library behind the experiment scripts in exp_1/ and exp_2/ (docs/design.md has the map)."""
