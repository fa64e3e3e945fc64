"""Objectives over generated images: JPEG compressibility, colorfulness and the LAION aesthetic predictor.

An image travels through the text path (the score cache, `moalign eval`) as an `ImageResponse`: a string
holding a digest of its pixels, which the cache keys by, with the image attached. `Objective.score`
hands scorers the image itself, so `python:module:function` works over images too.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moalign.errors import MoalignError, first_line
from moalign.models import pick_device
from moalign.objectives.base import Objective, register

LAION_HEAD = "sac+logos+ava1-l14-linearMSE.pth"  # the improved aesthetic predictor's published head
CLIP_L14 = "openai/clip-vit-large-patch14"


class ImageResponse(str):
    """A generated image as a string (its pixels' digest) with the PIL image attached."""

    image: Image.Image

    def __new__(cls, image: Image.Image) -> ImageResponse:
        digest = hashlib.sha1(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()
        response = super().__new__(cls, f"image:{digest}")
        response.image = image
        return response

    def __reduce__(self):  # pickles as its image (the default would pass the digest to __new__)
        return ImageResponse, (self.image,)


def _rgb(image: Image.Image) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise MoalignError(f"an image objective got a {type(image).__name__}, not an image; use it on image runs")
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def jpeg_kilobytes(image: Image.Image, quality: int = 95) -> float:
    """The size of the image as a JPEG at `quality`, in kilobytes (1000 bytes)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


@register("jpeg_compressibility", "minus the image's JPEG size in KB at quality 95 (RiC, DDPO); option quality")
class JpegCompressibility(Objective):
    name = "jpeg_compressibility"
    modality = "image"

    def __init__(self, argument: str = "", quality: int = 95):
        if not 1 <= int(quality) <= 100:
            raise MoalignError(f"jpeg_compressibility: quality must be in 1..100, got {quality}")
        self.quality = int(quality)

    def _score(self, prompts, responses):
        return [-jpeg_kilobytes(_check(image), self.quality) for image in responses]


def _check(image) -> Image.Image:
    _rgb(image)  # raises the one-line error for a non-image
    return image


def colorfulness(image: Image.Image) -> float:
    """Hasler & Süsstrunk (2003): σ_rgyb + 0.3·μ_rgyb over rg = R − G and yb = (R + G)/2 − B (0–255 scale)."""
    pixels = _rgb(image)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    rg, yb = red - green, 0.5 * (red + green) - blue
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


@register("colorfulness", "Hasler–Süsstrunk colorfulness of the image (0 for grey)")
class Colorfulness(Objective):
    name = "colorfulness"
    modality = "image"

    def __init__(self, argument: str = ""):
        pass

    def _score(self, prompts, responses):
        return [colorfulness(image) for image in responses]


def load_head(path: str | os.PathLike) -> torch.nn.Sequential:
    """The LAION aesthetic MLP from its state dict: `layers.{i}.weight/bias` of Linear layers in order.

    The published head (768→1024→128→64→16→1) has dropout between its layers and no activation, so at
    inference it is this chain of Linear layers; the shapes are read from the file, which lets a tiny head
    stand in for it in tests."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as error:
        raise MoalignError(f"aesthetic: cannot read the MLP head {path} ({first_line(error)})") from None
    indices = sorted({int(key.split(".")[1]) for key in state if key.startswith("layers.") and key.endswith(".weight")})
    if not indices:
        raise MoalignError(f"aesthetic: {path} holds no `layers.N.weight` tensors of an MLP head")
    layers = []
    for i in indices:
        weight, bias = state[f"layers.{i}.weight"], state.get(f"layers.{i}.bias")
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        layer.load_state_dict({"weight": weight, **({"bias": bias} if bias is not None else {})})
        layers.append(layer)
    return torch.nn.Sequential(*layers).eval()


def _resolve_head(argument: str, head: str) -> Path:
    """A head file, a folder holding `head`, or a hub repository holding `head`."""
    path = Path(argument)
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / head).is_file():
            raise MoalignError(f"aesthetic:{argument}: the folder has no {head} (option head=FILE)")
        return path / head
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(argument, head))
    except Exception as error:  # offline, no such repository or file: all one answer for the user
        raise MoalignError(f"aesthetic:{argument}: cannot find the head {head} ({type(error).__name__})") from None


@register(
    "aesthetic",
    "LAION aesthetic predictor: MLP head on L2-normalised CLIP ViT-L/14 image embeddings, "
    "aesthetic:HEAD_FILE_OR_FOLDER_OR_HUB_ID; options clip=openai/clip-vit-large-patch14, head=FILE, "
    "batch_size=32, device=auto",
    "transformers; the CLIP model and the head on disk or in the hub cache",
)
class Aesthetic(Objective):
    name = "aesthetic"
    modality = "image"

    def __init__(
        self, argument: str, clip: str = CLIP_L14, head: str = LAION_HEAD, batch_size: int = 32, device: str = "auto"
    ):
        from transformers import CLIPImageProcessor, CLIPModel

        if not argument:
            raise MoalignError("aesthetic objective needs its MLP head: aesthetic:PATH_OR_HUB_ID")
        self.head_path = _resolve_head(argument, head)
        self.head = load_head(self.head_path)
        self.clip_path, self.batch_size, self.device = clip, int(batch_size), pick_device(device)
        try:
            self.processor = CLIPImageProcessor.from_pretrained(clip)
            self.clip = CLIPModel.from_pretrained(clip).to(self.device).eval()
        except OSError as error:
            raise MoalignError(f"aesthetic: cannot load CLIP {clip} ({first_line(error)})") from None
        width = self.head[0].in_features
        if self.clip.config.projection_dim != width:
            raise MoalignError(
                f"aesthetic: the head takes {width}-d embeddings but {clip} makes {self.clip.config.projection_dim}-d"
            )
        self.head.to(self.device)

    @property
    def cache_key(self) -> str:
        stamp = os.path.getmtime(self.head_path)  # a head retrained in place must not reuse stale scores
        return f"{self.spec}@{stamp}"

    @torch.inference_mode()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """L2-normalised CLIP image embeddings, as the predictor was trained on."""
        pixels = self.processor(images=[_check(i).convert("RGB") for i in images], return_tensors="pt")
        features = self.clip.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
        if not isinstance(features, torch.Tensor):  # transformers 5 may return an output object
            features = features.pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @torch.inference_mode()
    def _score(self, prompts, responses):
        scores = []
        for start in range(0, len(responses), self.batch_size):
            embeddings = self.embed(list(responses[start : start + self.batch_size]))
            scores.extend(self.head(embeddings).reshape(-1).cpu().tolist())
        return scores
