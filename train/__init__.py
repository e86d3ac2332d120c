"""Training loops on frozen bases: each `train/<name>.py` is `python -m train.<name>` and
`jaxadapt train <name>`, with its configs (`get_config()`) in `train/configs/`."""
