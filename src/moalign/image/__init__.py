"""Rewards-in-Context for text-to-image models: data, pipelines, the recipe, the policy and its HTTP route.

data.py      image–caption datasets (hub, or imagefolder folders with metadata.jsonl), checked up front
pipeline.py  diffusers pipelines: loading, captions within the text encoder's budget, denoiser inputs
ric.py       `moalign ric-image`: the recipe (prepare, offline, MORS) on the Transformers Trainer
policy.py    the steerable image policy `moalign eval`, `generate` and `serve` use
serve.py     `POST /v1/images/generations` (OpenAI's images API) with a `preference` field
"""
