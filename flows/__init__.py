"""Prefect flows of ptqflow and the `model_free_ptq` entry point."""


def __getattr__(name: str):
    # Imported on first use so `ptqflow --help` does not load torch and Prefect.
    if name in ("model_free_ptq", "quantize_checkpoint"):
        from flows import quantize

        return getattr(quantize, name)
    if name == "reindex_fused_weights":
        from flows.reindex import reindex_fused_weights

        return reindex_fused_weights
    if name == "verify_checkpoint":
        from flows.verify import verify_checkpoint

        return verify_checkpoint
    raise AttributeError(name)


__all__ = ["model_free_ptq", "quantize_checkpoint", "reindex_fused_weights", "verify_checkpoint"]
