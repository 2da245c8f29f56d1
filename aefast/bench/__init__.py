"""`aefast bench`: microbenchmarks of every operator (aefast.bench.cases) timed with
contenders alternating (aefast.bench.harness)."""
