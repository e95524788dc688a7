"""The one comparison harness: logits of any model over batches (:mod:`.logits`), and
A/B-interleaved latency of any runners (:mod:`.latency`). Prune's accuracy checks, export's
parity, INT8 evaluation, bench and the benchmarks all go through these two loops, so their
numbers are comparable (after Polygraphy's comparator)."""
