"""The Prefect-free core: typed records, planning, schemes, weight math, codecs for
pre-quantized sources, shard reading and writing, verify, and `pipeline.quantize`,
which runs the whole pipeline in one process."""
