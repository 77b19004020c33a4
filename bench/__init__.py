"""`make bench`: the performance harness of issue 3 (not part of the octaskly package).

`python -m bench.run --help` lists the scenarios and flags; results go to stdout and to
`bench/results/<UTC timestamp>.json` (git-ignored) so runs can be compared.
"""
