"""The `vlm` command line: sits above the shared package `vlm` and both services.

Nothing imports this package except the `vlm` console script; `vlm`, `preprocessor_svc`,
`model_svc` and `bench` never import it.
"""
