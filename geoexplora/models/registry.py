"""Names of the backbones we build, and parsing of ``--init`` / ``--init-weights``.

Configuration is kept apart from weights: an :class:`Architecture` says which timm ViT to build
(and with which overrides); an :class:`InitSpec` says where its initial weights come from. Any
timm ``VisionTransformer`` name works; the registry below lists the ones we know the source
family of (which self-supervised objective made them), plus tiny configurations for tests and CPU
runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from geoexplora.errors import UserError, opt

# The paper's source model (the adapt command may choose its own default).
DEFAULT_INIT = "vit_large_patch14_dinov2.lvd142m"


@dataclass(frozen=True)
class Architecture:
    """A buildable ViT: the timm entry point plus keyword overrides (JSON-able values only)."""

    name: str
    timm_name: str
    family: str
    overrides: dict = field(default_factory=dict)
    default_tag: str | None = None  # the timm pretrained tag whose weights this name means

    def timm_kwargs(self, extra: dict | None = None) -> dict:
        return {**self.overrides, **(extra or {})}


def _dinov2(size: str, reg: bool) -> Architecture:
    name = f"vit_{size}_patch14_{'reg4_' if reg else ''}dinov2"
    return Architecture(name, name, "dinov2", default_tag="lvd142m")


_TINY = {"embed_dim": 64, "depth": 4, "num_heads": 2}

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        *(_dinov2(s, reg) for s in ("small", "base", "large", "giant") for reg in (False, True)),
        Architecture("vit_base_patch16_224", "vit_base_patch16_224", "mae", default_tag="mae"),
        Architecture("vit_large_patch16_224", "vit_large_patch16_224", "mae", default_tag="mae"),
        # Tiny configurations (tests, CPU smoke runs): DINOv2-shaped (layer scale, patch 14) and
        # MAE-shaped (patch 16). No published weights: use --init-weights PATH or random.
        Architecture(
            "geo_vit_tiny_patch14", "vit_small_patch14_dinov2", "dinov2", overrides=dict(_TINY)
        ),
        Architecture(
            "geo_vit_tiny_patch14_reg4",
            "vit_small_patch14_reg4_dinov2",
            "dinov2",
            overrides=dict(_TINY),
        ),
        Architecture("geo_vit_tiny_patch16", "vit_base_patch16_224", "mae", overrides=dict(_TINY)),
    ]
}

_FAMILY_BY_TAG = {"mae": "mae", "lvd142m": "dinov2", "dino": "dinov2"}


def get_architecture(name: str, overrides: dict | None = None) -> Architecture:
    """The architecture for a registry or timm name (without a weights tag)."""
    import timm

    if name in ARCHITECTURES:
        arch = ARCHITECTURES[name]
    elif timm.is_model(name):
        family = "dinov2" if "dinov2" in name else "unknown"
        arch = Architecture(name, name, family)
    else:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UserError(
            f"{opt('init')} {name}: unknown model name; known: {known} (or any timm ViT name)"
        )
    if overrides:
        arch = Architecture(
            arch.name,
            arch.timm_name,
            arch.family,
            {**arch.overrides, **overrides},
            arch.default_tag,
        )
    return arch


@dataclass(frozen=True)
class InitSpec:
    """Where the initial weights come from.

    ``kind``: ``timm`` (a timm/registry name, weights from the hub cache, a local file or random),
    ``torchgeo`` (a torchgeo weight enum) or ``model_file`` (a geoexplora model to keep adapting).
    ``weights``: ``"pretrained"`` (the name's published weights), ``"random"``, or a local Path.
    """

    kind: str
    init: str
    arch_name: str | None = None
    tag: str | None = None
    weights: str | Path = "pretrained"
    torchgeo_enum: str | None = None
    model_path: Path | None = None

    def describe(self) -> dict:
        return {
            "init": self.init,
            "kind": self.kind,
            "arch": self.arch_name,
            "tag": self.tag,
            "init_weights": str(self.weights),
        }


_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin", ".ckpt")


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.endswith(_CHECKPOINT_SUFFIXES)


def resolve_init(init: str | None, init_weights: str | None = None) -> InitSpec:
    """Parse the ``--init`` and ``--init-weights`` strings into an :class:`InitSpec`.

    Only checks what can be checked without loading: names exist, files exist, the combination
    makes sense. A raw checkpoint given as ``--init`` is refused with the right spelling.
    """
    init = (init or DEFAULT_INIT).strip()
    weights: str | Path
    if init_weights is None:
        weights = "pretrained"
    elif init_weights.strip().lower() == "random":
        weights = "random"
    else:
        weights = Path(init_weights).expanduser()
        if not weights.is_file():
            raise UserError(f"{opt('init_weights')} {init_weights}: no such file")

    if init.startswith("torchgeo:"):
        enum = init.split(":", 1)[1]
        if weights == "random":
            raise UserError(
                f"{opt('init')} {init} names pretrained weights; use its timm architecture "
                "name for a random initialisation"
            )
        return InitSpec("torchgeo", init, weights=weights, torchgeo_enum=enum)

    if init.startswith(HF_HUB_PREFIX):
        return _hf_hub_spec(init, weights)

    if Path(init).expanduser().is_file() or _looks_like_path(init):
        path = Path(init).expanduser()
        if not path.is_file():
            raise UserError(f"{opt('init')} {init}: no such file")
        if init_weights is not None:
            raise UserError(
                f"{opt('init')} {init} is a model file; it carries its own weights, so "
                f"{opt('init_weights')} cannot be used with it"
            )
        return InitSpec("model_file", init, weights=path, model_path=path)

    arch_name, _, tag_text = init.partition(".")
    arch = get_architecture(arch_name)
    tag = tag_text or None
    if weights == "pretrained" and tag is None and arch.default_tag is None:
        raise UserError(
            f"{opt('init')} {init}: this architecture has no published weights here; pass "
            f"{opt('init_weights')} PATH (a checkpoint) or {opt('init_weights')} random"
        )
    return InitSpec("timm", init, arch_name=arch.name, tag=tag or arch.default_tag, weights=weights)


HF_HUB_PREFIX = "hf-hub:"  # timm's spelling of a Hugging Face Hub model: hf-hub:org/name
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm pushes, in its order


def _hf_hub_spec(init: str, weights: str | Path) -> InitSpec:
    """``hf-hub:org/name`` as timm publishes models on the Hugging Face Hub: the repo's
    ``config.json`` names the timm architecture, and its weights file (fetched into, or found in,
    the Hugging Face cache; offline: only found) is then read like any local timm checkpoint.
    ``--init-weights`` (a file, or ``random``) replaces the repo's weights."""
    import json

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
    )

    repo = init[len(HF_HUB_PREFIX) :]
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError(f"{init}: not a Hugging Face repo; write hf-hub:ORG/NAME", option="init")

    def fetch(filename: str) -> Path:
        from geoexplora.log import library_warnings_quiet

        try:
            with library_warnings_quiet("huggingface_hub"):
                return Path(hf_hub_download(repo, filename))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
            if isinstance(exc, RemoteEntryNotFoundError):  # the repo has no such file
                raise
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"{init}: cannot get {filename} of {repo} ({why}); fetch it where there is a "
                f"network (hf download {repo}) or pass {opt('init_weights')} PATH",
                option="init",
            ) from exc

    try:
        config = json.loads(fetch("config.json").read_text(encoding="utf-8"))
    except RemoteEntryNotFoundError as exc:
        raise UserError(
            f"{init}: {repo} has no config.json (not a timm model)", option="init"
        ) from exc
    arch = get_architecture(str(config.get("architecture", "")))
    if weights == "pretrained":
        unavailable: list[UserError] = []  # not cached, offline (or a network failure)
        for filename in HF_WEIGHT_FILES:
            try:
                weights = fetch(filename)
                break
            except RemoteEntryNotFoundError:
                continue
            except UserError as exc:
                unavailable.append(exc)
        else:
            if unavailable:
                raise unavailable[0]
            raise UserError(
                f"{init}: {repo} has none of {', '.join(HF_WEIGHT_FILES)}", option="init"
            )
    return InitSpec("timm", init, arch_name=arch.name, tag=None, weights=weights)


def source_family(spec: InitSpec, arch: Architecture) -> str:
    """The self-supervised family of the initial weights (decides the default adapt objective)."""
    if spec.tag is None or spec.tag == arch.default_tag:
        return arch.family
    return _FAMILY_BY_TAG.get(spec.tag, "supervised")
