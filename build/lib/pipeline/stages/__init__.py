"""The pipeline's stages, one module each (`python -m pipeline.stages.<name>`, what dvc.yaml runs).

Each has a typed core `run(config, inputs...) -> metrics`, an `execute(config)` that resolves the
project's paths and tracks the run, and a thin `main(argv)`. Stages import the libraries in
`pipeline/`, never each other: they meet only at files with documented schemas.
"""
