"""The pipeline's stages as Prefect tasks, one thin module each, in pipeline order:

plan -> download -> quantize (and upload) -> finalize (-> verify)

Each wraps a function of the Prefect-free core, `tasks/core/`, which holds the
planning, the weight math, shard I/O and verify.
"""
