"""squadtune's Prefect-free core: the chat format, SQuAD I/O, model loading and generation,
training pieces, the metric, the served model and the registry.

Nothing here imports Prefect or the pipeline's config package: the served model ships this
package alone, and the Prefect stages in `tasks/` are thin steps over it.
"""
