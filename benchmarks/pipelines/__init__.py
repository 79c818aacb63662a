"""The pieces of benchmarks/bench.py, one module per pipeline: `common` (settings, machine, shards),
`encoder_only`, `naive`, `job` (vqpipe's job and the memory runs), `raydata` (the Ray Data recipe), `check`
(outputs compared row by row) and `report` (the Markdown tables)."""
