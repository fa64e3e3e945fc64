"""One file per training method; each ends in a run directory that `moalign.policy` can load."""
