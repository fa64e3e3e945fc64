"""`POST /v1/images/generations`: OpenAI's images API on an image run, base64 PNGs, the preference in the
extra field `preference` (as for the text endpoints).

    client.images.generate(model=RUN, prompt="a red circle", n=2, response_format="b64_json",
                           extra_body={"preference": [0.3, 0.7], "seed": 1})

`moalign serve` adds the route when the run's policy makes images (`modality == "image"`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import time
from dataclasses import replace
from typing import Any

from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from moalign.errors import MoalignError
from moalign.serve.schemas import MAX_SEED, ApiError


class ImageRequest(BaseModel):
    """OpenAI's image generation body (quality, style and other unknown fields are ignored) plus moalign's
    `preference`, `seed`, `steps` and `guidance_scale`."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str | None = None
    response_format: str | None = None
    user: str | None = None
    preference: list[float] | dict[str, float] | str | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def add_image_routes(app: FastAPI, server: Any) -> None:
    """Add the images endpoint to the server's app; `server` validates the model name and the preference."""
    policy = server.policy
    pipeline = policy.pipeline
    side = pipeline.unet.config.sample_size * getattr(pipeline, "vae_scale_factor", 1)
    native = f"{side}x{side}"
    busy = asyncio.Lock()  # one pipeline call at a time: it is not re-entrant

    @app.post("/v1/images/generations")
    async def images(body: ImageRequest) -> dict[str, Any]:
        server.check_model(body.model)
        if body.response_format not in (None, "b64_json"):
            raise ApiError(400, "response_format: only b64_json is served (images are not stored for URLs)")
        if body.size not in (None, "auto", native):
            raise ApiError(400, f"size: this pipeline makes {native} images, not {body.size}", "size")
        weights = server.preference(body.preference)
        seed = secrets.randbelow(2**31) if body.seed is None else body.seed
        overrides = {"seed": seed, "steps": body.steps, "guidance_scale": body.guidance_scale}
        sampling = replace(policy.sampling, **{k: v for k, v in overrides.items() if v is not None})
        try:
            async with busy:
                made = await asyncio.to_thread(policy.images, [body.prompt] * body.n, weights, sampling)
        except MoalignError as error:
            raise ApiError(400, str(error)) from None
        caption = policy.prompt_for(body.prompt, weights)
        return {
            "created": int(time.time()),
            "data": [{"b64_json": png_base64(image), "revised_prompt": caption} for image in made],
            "moalign": {"preference": weights.tolist(), "seed": seed, "served_by": policy.served_by(weights)},
        }
