"""Method speed and memory on a CUDA GPU: PuLID-FLUX vs bare FLUX.1-dev, InstantID vs bare SDXL.

No real weights exist on our machines, and FLOPs do not depend on weight values, so this script
builds full-size architectures with RANDOM weights in the real on-disk layout of
`generation.model_registry` and loads them through our real methods (`PulidFluxMethod.load`,
`InstantIdSdxlMethod.load`, with their strict loaders), next to the stock diffusers pipelines
built from the same folders. Per configuration it loads, generates one warm-up image (for the
compiled mode: the compilation), then times `--images` images at 1024x1024 in bf16: seconds per
image, seconds per step (median interval between step callbacks, synchronised) and peak GPU memory.

What is real size and what is not (see bench/README-queue-and-methods.md):
- real size: the FLUX.1-dev transformer (19 double / 38 single blocks, 24 x 128 heads), FLUX VAE,
  SDXL base UNet and VAE, IdentityNet ControlNet (`ControlNetModel.from_unet`), InstantID Resampler
  + IP processors, PuLID IDFormer + 20 cross-attentions, EVA02-CLIP-L-336, BiSeNet;
- small: the text encoders (2 layers each; they run once per image, not per step) with the real
  output widths: T5 d_model 4096 (512 tokens) and CLIP pooled 768 for FLUX; CLIP 768 + 1280 hidden
  (cross-attention 2048) and pooled 1280 for SDXL; byte-level tokenizers;
- the face: a real photo (skimage astronaut) with fixed keypoints and a random unit 512-d vector
  standing in for the ArcFace embedding (the offline dlib embedder gives 128-d; the ID encoders
  are built for 512-d as released).
- `--weights memory` (default): the two large denoisers (FLUX transformer 23.8 GB, SDXL UNet 5.1 GB,
  plus the IdentityNet) are random-initialised directly on the GPU and handed to the pipelines'
  `from_pretrained` as components, so `Method.load` runs as in production except for reading those
  files; everything else is read from disk by the real loaders. `--weights disk` writes them too
  (~32 GB) and loads everything from disk.

    python bench/gpu_methods.py                                  # full size, CUDA, eager + compiled
    python bench/gpu_methods.py --device cpu --tiny              # CPU smoke run of the same code path
    python bench/gpu_methods.py --only flux --modes eager --images 1

Also runs ../shared/tools/gpu_anchor.py (stock diffusers forwards, `--anchor PATH`) first, if it exists.
JSON on stdout, progress on stderr; timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOALS = {
    "pulid_vs_bare_flux_max": 1.15,
    "instantid_vs_bare_sdxl_max": 1.3,
    "compiled_pulid_vs_eager_bare_flux_max": 0.85,
}
#: stock diffusers on an H200, random full-size weights, bf16, 1024x1024 (gpu_anchor.py)
REFERENCE_H200 = {
    "flux_s_per_step_eager": 0.177,
    "flux_s_per_step_compiled": 0.136,
    "flux_tflop_per_step": 74,
    "sdxl_unet_cfg_s_per_step_eager": 0.051,
    "sdxl_unet_cfg_s_per_step_compiled": 0.033,
}
PROMPT = "a portrait photo of a woman in a yellow raincoat walking through a neon-lit street at night"
#: skimage.data.astronaut(): face box and the 5 keypoints dlib finds (eyes, nose, mouth corners)
ASTRONAUT_BOX = (179.0, 83.0, 266.0, 170.0)
ASTRONAUT_KEYPOINTS = [[203.2, 101.5], [246.8, 104.0], [225.0, 127.0], [201.0, 140.0], [245.0, 141.0]]
FACE_EMBEDDING_DIMS = 512  # ArcFace (antelopev2), what PuLID and InstantID were trained on

_started = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _started:7.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------


@dataclass
class Sizes:
    flux_transformer: dict
    flux_vae: dict
    flux_clip_hidden: int  # CLIP-L pooled width FLUX's pooled_projection_dim reads
    flux_t5_d_model: int  # T5 width FLUX's joint_attention_dim reads
    sdxl_unet: dict
    sdxl_vae: dict
    sdxl_clip_hidden: int
    sdxl_clip2_hidden: int  # OpenCLIP-bigG stand-in: hidden + pooled projection width
    controlnet_cond_channels: tuple
    eva: dict
    bisenet_width: int
    idformer: dict
    ca: dict
    resampler: dict
    ip_num_tokens: int = 16
    notes: list = field(default_factory=list)


def full_sizes() -> Sizes:
    return Sizes(
        flux_transformer=dict(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        flux_vae=dict(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
            shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
        ),
        flux_clip_hidden=768,
        flux_t5_d_model=4096,
        sdxl_unet=dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32,
        ),
        sdxl_vae=dict(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
            force_upcast=True,
        ),
        sdxl_clip_hidden=768,
        sdxl_clip2_hidden=1280,
        controlnet_cond_channels=(16, 32, 96, 256),
        eva={},  # EvaVisionTransformer defaults: EVA02-CLIP-L-14-336
        bisenet_width=64,
        idformer={},  # IDFormer defaults: the released PuLID-FLUX v0.9.1 sizes, 512-d ArcFace + 768-d EVA input
        ca=dict(dim=3072, dim_head=128, heads=16, kv_dim=2048),
        resampler={},  # Resampler defaults: InstantID's release (512-d input, 16 tokens of 2048)
    )  # fmt: skip


def tiny_sizes() -> Sizes:
    """The tiny test models' sizes (generation.tiny), with 512-d face embeddings."""
    from generation.tiny.base_models import (
        FLUX_JOINT_DIM,
        FLUX_POOLED_DIM,
        flux_transformer_config,
        flux_vae_config,
        sdxl_unet_config,
        sdxl_vae_config,
    )
    from generation.tiny.instantid import CONDITIONING_CHANNELS
    from generation.tiny.pulid import TINY_EVA, TINY_FLUX_INNER_DIM, TINY_IDFORMER, TINY_IDFORMER_MAPPING_DIM

    return Sizes(
        flux_transformer=flux_transformer_config(),
        flux_vae=flux_vae_config(),
        flux_clip_hidden=FLUX_POOLED_DIM,
        flux_t5_d_model=FLUX_JOINT_DIM,
        sdxl_unet=sdxl_unet_config(),
        sdxl_vae=sdxl_vae_config(),
        sdxl_clip_hidden=32,
        sdxl_clip2_hidden=32,
        controlnet_cond_channels=CONDITIONING_CHANNELS,
        eva=dict(TINY_EVA),
        bisenet_width=8,
        idformer=dict(
            TINY_IDFORMER, vit_dim=TINY_EVA["width"], mapping_dim=TINY_IDFORMER_MAPPING_DIM,
            id_input_dim=FACE_EMBEDDING_DIMS + TINY_EVA["embed_dim"],
        ),
        ca=dict(dim=TINY_FLUX_INNER_DIM, dim_head=TINY_FLUX_INNER_DIM, heads=1, kv_dim=TINY_IDFORMER["output_dim"]),
        resampler=dict(dim=64, depth=2, dim_head=64, heads=2, num_queries=16, embedding_dim=FACE_EMBEDDING_DIMS,
                       output_dim=64),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Random models in the real layout
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def building_on(device: str, dtype):
    """Modules created inside are allocated on `device` in `dtype` (no CPU copy of a 12B model)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def ready(module, device: str, dtype):
    return module.to(device, dtype).eval().requires_grad_(False)


class Builder:
    """Writes the component folders/files under `models_dir` and makes the random denoisers."""

    def __init__(self, models_dir: Path, sizes: Sizes, device: str, dtype, weights: str):
        self.models_dir = models_dir
        self.sizes = sizes
        self.device = device
        self.dtype = dtype
        self.weights = weights  # "memory" or "disk"

    # -- denoisers (fresh random weights on the device for every configuration) --

    def flux_transformer(self):
        from diffusers import FluxTransformer2DModel

        with building_on(self.device, self.dtype):
            model = FluxTransformer2DModel(**self.sizes.flux_transformer)
        return ready(model, self.device, self.dtype)

    def sdxl_unet(self):
        from diffusers import UNet2DConditionModel

        with building_on(self.device, self.dtype):
            model = UNet2DConditionModel(**self.sizes.sdxl_unet)
        return ready(model, self.device, self.dtype)

    def controlnet(self, unet):
        """IdentityNet as InstantID made it: a ControlNet initialised from the SDXL UNet."""
        import torch
        from diffusers import ControlNetModel

        with building_on(self.device, self.dtype):
            model = ControlNetModel.from_unet(
                unet, conditioning_embedding_out_channels=self.sizes.controlnet_cond_channels
            )
            # zero-initialised output convolutions would be skipped by nothing, but keep them non-trivial
            for module in [model.controlnet_cond_embedding.conv_out, *model.controlnet_down_blocks]:
                torch.nn.init.normal_(module.weight, std=0.02)
        return ready(model, self.device, self.dtype)

    # -- folders --

    def write_all(self, families: list[str]) -> dict:
        timings = {}
        for family in families:
            started = time.perf_counter()
            if family == "flux":
                self.write_flux()
                self.write_pulid()
            else:
                self.write_sdxl()
            timings[f"{family}_write_s"] = round(time.perf_counter() - started, 1)
            log(f"{family}: components written in {timings[f'{family}_write_s']} s ({self.weights} denoisers)")
        return timings

    def _model_index(self, directory: Path, pipeline_class: str, components: dict, **extra) -> None:
        import diffusers

        index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__, **extra, **components}
        (directory / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))

    def _denoiser_folder(self, factory, meta_factory, folder: Path) -> None:
        """Weights on disk (`--weights disk`) or only config.json (memory: the pipelines get the module)."""
        if self.weights == "disk":
            model = factory()
            model.save_pretrained(folder, safe_serialization=True)
            del model
            free_memory()
        else:
            with building_on("meta", self.dtype):
                meta_factory().save_config(folder)

    def write_flux(self) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        from generation.model_registry import component_path
        from generation.tiny.text import (
            write_clip_text_model,
            write_clip_tokenizer,
            write_t5_encoder,
            write_t5_tokenizer,
        )

        directory = component_path(self.models_dir, "flux")
        directory.mkdir(parents=True, exist_ok=True)
        FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        ).save_pretrained(directory / "scheduler")  # fmt: skip
        AutoencoderKL(**self.sizes.flux_vae).save_pretrained(directory / "vae")
        self._denoiser_folder(
            self.flux_transformer,
            lambda: FluxTransformer2DModel(**self.sizes.flux_transformer),
            directory / "transformer",
        )
        write_clip_tokenizer(directory / "tokenizer")
        write_clip_text_model(directory / "text_encoder", hidden_size=self.sizes.flux_clip_hidden, seed=2)
        write_t5_tokenizer(directory / "tokenizer_2")  # model_max_length 512: FLUX-dev's T5 sequence length
        write_t5_encoder(directory / "text_encoder_2", d_model=self.sizes.flux_t5_d_model, seed=3)
        self._model_index(
            directory,
            "FluxPipeline",
            {
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "T5EncoderModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "tokenizer_2": ["transformers", "T5TokenizerFast"],
                "transformer": ["diffusers", "FluxTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
        )

    def write_pulid(self) -> None:
        """pulid_flux_v0.9.1.safetensors, EVA02_CLIP_L_336_psz14_s6B.pt, parsing_bisenet.pth (random, real keys)."""
        import torch
        from safetensors.torch import save_file
        from torch import nn

        from generation.model_registry import component_path
        from generation.pulid.bisenet import BiSeNet
        from generation.pulid.encoders import IDFormer, PerceiverAttentionCA
        from generation.pulid.eva_clip import EvaVisionTransformer
        from generation.pulid.flux_hooks import num_ca_modules

        config = self.sizes.flux_transformer
        count = num_ca_modules(config["num_layers"], config["num_single_layers"])
        with building_on(self.device, torch.float32):
            encoder = IDFormer(**self.sizes.idformer)
            ca = nn.ModuleList(PerceiverAttentionCA(**self.sizes.ca) for _ in range(count))
            eva = EvaVisionTransformer(**self.sizes.eva)
            for name, param in eva.named_parameters():  # zero-initialised tokens/biases would be atypical
                if name in ("cls_token", "pos_embed") or name.endswith(("q_bias", "v_bias")):
                    nn.init.normal_(param, std=0.02)
            parser = BiSeNet(num_classes=19, base_width=self.sizes.bisenet_width)

        def cpu(state: dict, dtype=self.dtype) -> dict:
            return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
                    for k, v in state.items()}  # fmt: skip

        state = {f"pulid_encoder.{k}": v for k, v in cpu(encoder.state_dict()).items()}
        state.update({f"pulid_ca.{k}": v for k, v in cpu(ca.state_dict()).items()})
        path = component_path(self.models_dir, "pulid_flux_weights")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, path)
        path = component_path(self.models_dir, "eva_clip")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({f"visual.{k}": v for k, v in cpu(eva.state_dict()).items()}, path)
        path = component_path(self.models_dir, "face_parsing")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(cpu(parser.state_dict(), torch.float32), path)  # BiSeNet stays fp32, as facexlib's
        del encoder, ca, eva, parser, state
        free_memory()

    def write_sdxl(self) -> None:
        import torch
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

        from generation.instantid.attention import install_ip_processors
        from generation.instantid.resampler import Resampler
        from generation.model_registry import component_path
        from generation.tiny.text import write_clip_text_model, write_clip_tokenizer

        directory = component_path(self.models_dir, "sdxl")
        directory.mkdir(parents=True, exist_ok=True)
        EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
            steps_offset=1,
        ).save_pretrained(directory / "scheduler")  # fmt: skip
        AutoencoderKL(**self.sizes.sdxl_vae).save_pretrained(directory / "vae")
        self._denoiser_folder(self.sdxl_unet, lambda: UNet2DConditionModel(**self.sizes.sdxl_unet), directory / "unet")
        write_clip_tokenizer(directory / "tokenizer")
        write_clip_text_model(directory / "text_encoder", hidden_size=self.sizes.sdxl_clip_hidden, seed=2)
        write_clip_tokenizer(directory / "tokenizer_2")
        write_clip_text_model(
            directory / "text_encoder_2",
            hidden_size=self.sizes.sdxl_clip2_hidden,
            projection_dim=self.sizes.sdxl_clip2_hidden,
            seed=3,
        )
        self._model_index(
            directory,
            "StableDiffusionXLPipeline",
            {
                "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
            force_zeros_for_empty_prompt=True,
        )

        # ip-adapter.bin: the Resampler + to_k_ip/to_v_ip of every cross-attention, named by a UNet of this config
        cross_dim = self.sizes.sdxl_unet["cross_attention_dim"]
        with building_on("meta", torch.float32):
            meta_unet = UNet2DConditionModel(**self.sizes.sdxl_unet)
        tokens = self.sizes.ip_num_tokens
        processors = install_ip_processors(meta_unet, cross_attention_dim=cross_dim, num_tokens=tokens)
        processors = processors.to_empty(device="cpu")
        for param in processors.parameters():
            torch.nn.init.normal_(param, std=0.02)
        with building_on(self.device, torch.float32):
            resampler = Resampler(**self.sizes.resampler)
        path = component_path(self.models_dir, "instantid_ip_adapter")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "image_proj": {k: v.detach().to("cpu", self.dtype) for k, v in resampler.state_dict().items()},
                "ip_adapter": {k: v.detach().to("cpu", self.dtype) for k, v in processors.state_dict().items()},
            },
            path,
        )
        del meta_unet, processors, resampler

        folder = component_path(self.models_dir, "instantid_controlnet")
        if self.weights == "disk":
            unet = self.sdxl_unet()
            self.controlnet(unet).save_pretrained(folder, safe_serialization=True)
            del unet
            free_memory()
        else:
            from diffusers import ControlNetModel

            with building_on("meta", self.dtype):
                meta = ControlNetModel.from_unet(
                    UNet2DConditionModel(**self.sizes.sdxl_unet),
                    conditioning_embedding_out_channels=self.sizes.controlnet_cond_channels,
                    load_weights_from_unet=False,
                )
            meta.save_config(folder)
            # the registry wants the weights file to exist; the memory mode never reads it
            (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def injected(cls, **components):
    """`cls.from_pretrained(...)` gets `components` (already built modules) as keyword arguments."""
    original = cls.from_pretrained

    def from_pretrained(*args, **kwargs):
        return original(*args, **{**kwargs, **components})

    with mock.patch.object(cls, "from_pretrained", from_pretrained):
        yield


@contextlib.contextmanager
def returning(cls, module):
    """`cls.from_pretrained(...)` returns `module` (memory mode for the IdentityNet ControlNet)."""
    with mock.patch.object(cls, "from_pretrained", lambda *args, **kwargs: module):
        yield


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------


def reference_face():
    import numpy as np

    from generation.methods.base import ReferenceFace

    try:
        from skimage import data

        image = data.astronaut()
    except ImportError:  # the GPU machine may lack scikit-image: any RGB photo-sized array has the same cost
        image = np.full((512, 512, 3), 128, dtype=np.uint8)
    vector = np.random.default_rng(0).standard_normal(FACE_EMBEDDING_DIMS).astype(np.float32)
    return ReferenceFace(
        image=image,
        box=ASTRONAUT_BOX,
        keypoints=np.asarray(ASTRONAUT_KEYPOINTS, dtype=np.float32),
        embedding=vector / np.linalg.norm(vector),
        embedder="arcface_antelopev2",
        quality={},
    )


def compile_flux_blocks(transformer) -> None:
    """What `PulidFluxMethod.load(compile_blocks=True)` does, for the stock pipeline."""
    for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
        block.compile()


class StepClock:
    """Step callback: synchronises the device and records the time of each finished step."""

    def __init__(self, device: str):
        self.device = device
        self.times: list[float] = []

    def __call__(self, *args, **kwargs):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def diffusers_callback(self, pipe, index, timestep, callback_kwargs):
        self()
        return {}


def measure(label: str, build, generate, *, device: str, images: int, compiled: bool) -> dict:
    """Load (build), one warm-up image, `images` timed images; figures of one configuration."""
    import statistics

    import torch

    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if compiled:
        torch._dynamo.reset()  # each compiled configuration compiles from scratch (first call reported)
    free_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    subject = build()
    sync()
    result = {"load_s": round(time.perf_counter() - started, 2)}
    if cuda:
        result["weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        result["load_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock(device)
    started = time.perf_counter()
    generate(subject, clock)
    sync()
    result["first_image_s"] = round(time.perf_counter() - started, 2)
    log(f"  {label}: loaded in {result['load_s']} s, first image {result['first_image_s']} s")
    per_image, per_step = [], []
    for _ in range(images):
        clock = StepClock(device)
        started = time.perf_counter()
        generate(subject, clock)
        sync()
        per_image.append(time.perf_counter() - started)
        per_step += [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    result["s_per_image"] = round(statistics.mean(per_image), 3)
    result["s_per_image_all"] = [round(t, 3) for t in per_image]
    result["s_per_step"] = round(statistics.median(per_step), 4) if per_step else None
    result["steps_seen"] = len(clock.times)
    if cuda:
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    log(f"  {label}: {result['s_per_image']} s/image, {result['s_per_step']} s/step, peak {result.get('peak_gib')} GiB")
    del subject
    free_memory()
    return result


def flux_configs(builder: Builder, args, compiled: bool) -> dict:
    from diffusers import FluxPipeline

    from generation.methods.base import GenerationRequest, LoadOptions
    from generation.methods.pulid_flux import PulidFluxMethod

    device, dtype, models_dir = args.device, builder.dtype, builder.models_dir
    folder = models_dir / "flux1-dev"
    face = reference_face()

    def build_bare():
        extra = {} if builder.weights == "disk" else {"transformer": builder.flux_transformer()}
        pipe = FluxPipeline.from_pretrained(folder, dtype=dtype, **extra).to(device)
        pipe.set_progress_bar_config(disable=True)
        if compiled:
            compile_flux_blocks(pipe.transformer)
        return pipe

    def run_bare(pipe, clock):
        return pipe(
            prompt=PROMPT, width=args.size, height=args.size, num_inference_steps=args.flux_steps, guidance_scale=3.5,
            generator=_generator(), callback_on_step_end=clock.diffusers_callback,
        ).images  # fmt: skip

    def build_pulid():
        options = LoadOptions(device=device, dtype=dtype, compile_blocks=compiled)
        if builder.weights == "disk":
            return PulidFluxMethod.load(models_dir, options)
        with injected(FluxPipeline, transformer=builder.flux_transformer()):
            return PulidFluxMethod.load(models_dir, options)

    request = GenerationRequest(
        references=[face], prompt=PROMPT, width=args.size, height=args.size, steps=args.flux_steps, guidance=3.5
    )

    def run_pulid(method, clock):
        return method.generate(request, clock)

    mode = "compiled" if compiled else "eager"
    log(f"flux {mode}: bare FluxPipeline")
    bare = measure(f"flux {mode} bare", build_bare, run_bare, device=device, images=args.images, compiled=compiled)
    log(f"flux {mode}: PuLID-FLUX (PulidFluxMethod.load)")
    pulid = measure(f"flux {mode} pulid", build_pulid, run_pulid, device=device, images=args.images, compiled=compiled)
    return {"bare_flux": bare, "pulid_flux": pulid, **ratios(pulid, bare, "pulid_vs_bare")}


def sdxl_configs(builder: Builder, args, compiled: bool) -> dict:
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    from generation.methods.base import GenerationRequest, LoadOptions
    from generation.methods.instantid_sdxl import InstantIdSdxlMethod, _compile_transformer_blocks

    device, dtype, models_dir = args.device, builder.dtype, builder.models_dir
    folder = models_dir / "stable-diffusion-xl-base-1.0"
    face = reference_face()

    def build_bare():
        extra = {} if builder.weights == "disk" else {"unet": builder.sdxl_unet()}
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype, add_watermarker=False, **extra).to(device)
        pipe.set_progress_bar_config(disable=True)
        if compiled:
            _compile_transformer_blocks(pipe.unet)
        return pipe

    def run_bare(pipe, clock):
        return pipe(
            prompt=PROMPT, width=args.size, height=args.size, num_inference_steps=args.sdxl_steps, guidance_scale=5.0,
            generator=_generator(), callback_on_step_end=clock.diffusers_callback,
        ).images  # fmt: skip

    def build_instantid():
        options = LoadOptions(device=device, dtype=dtype, compile_blocks=compiled)
        if builder.weights == "disk":
            return InstantIdSdxlMethod.load(models_dir, options)
        unet = builder.sdxl_unet()
        controlnet = builder.controlnet(unet)
        with injected(StableDiffusionXLControlNetPipeline, unet=unet), returning(ControlNetModel, controlnet):
            return InstantIdSdxlMethod.load(models_dir, options)

    request = GenerationRequest(
        references=[face], prompt=PROMPT, width=args.size, height=args.size, steps=args.sdxl_steps, guidance=5.0
    )

    def run_instantid(method, clock):
        return method.generate(request, clock)

    mode = "compiled" if compiled else "eager"
    log(f"sdxl {mode}: bare StableDiffusionXLPipeline")
    bare = measure(f"sdxl {mode} bare", build_bare, run_bare, device=device, images=args.images, compiled=compiled)
    log(f"sdxl {mode}: InstantID (InstantIdSdxlMethod.load)")
    instantid = measure(
        f"sdxl {mode} instantid", build_instantid, run_instantid, device=device, images=args.images, compiled=compiled
    )
    return {"bare_sdxl": bare, "instantid_sdxl": instantid, **ratios(instantid, bare, "instantid_vs_bare")}


def _generator():
    import torch

    return torch.Generator("cpu").manual_seed(0)


def ratios(method: dict, bare: dict, prefix: str) -> dict:
    out = {f"{prefix}_image": round(method["s_per_image"] / bare["s_per_image"], 3)}
    if method.get("s_per_step") and bare.get("s_per_step"):
        out[f"{prefix}_step"] = round(method["s_per_step"] / bare["s_per_step"], 3)
    return out


def goals_met(results: dict) -> dict:
    met = {}
    flux, sdxl = results.get("flux", {}), results.get("sdxl", {})
    for mode in ("eager", "compiled"):
        if mode in flux:
            ratio = flux[mode]["pulid_vs_bare_image"]
            goal = GOALS["pulid_vs_bare_flux_max"]
            met[f"pulid_vs_bare_flux_{mode}"] = {"ratio": ratio, "goal_max": goal, "met": ratio <= goal}
        if mode in sdxl:
            ratio = sdxl[mode]["instantid_vs_bare_image"]
            goal = GOALS["instantid_vs_bare_sdxl_max"]
            met[f"instantid_vs_bare_sdxl_{mode}"] = {"ratio": ratio, "goal_max": goal, "met": ratio <= goal}
    if "eager" in flux and "compiled" in flux:
        ratio = round(flux["compiled"]["pulid_flux"]["s_per_image"] / flux["eager"]["bare_flux"]["s_per_image"], 3)
        goal = GOALS["compiled_pulid_vs_eager_bare_flux_max"]
        met["compiled_pulid_vs_eager_bare_flux"] = {"ratio": ratio, "goal_max": goal, "met": ratio <= goal}
    return met


# --------------------------------------------------------------------------------------------
# Anchor (stock diffusers forwards) and main
# --------------------------------------------------------------------------------------------


def run_anchor(path: Path | None, tiny: bool, timeout: int) -> dict:
    if path is None:
        return {"skipped": "--no-anchor"}
    if not path.exists():
        message = f"{path} not found; stock anchor skipped (pass --anchor PATH)"
        log(message)
        return {"skipped": message}
    env = {**os.environ, "ONLY_FWD": "1"}
    if tiny:
        env["TINY"] = "1"  # CPU dry run; without COMPILE it also runs its tiny LoRA steps
    else:
        env["COMPILE"] = "1"
    log(f"anchor: {path} ({'TINY=1' if tiny else 'COMPILE=1 ONLY_FWD=1'}, timeout {timeout} s)")
    started = time.perf_counter()
    try:
        completed = subprocess.run(
            [sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
        stdout, rc = completed.stdout, completed.returncode
        stderr_tail = completed.stderr[-1500:]
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc, stderr_tail = "timeout", ""
    lines = []
    for line in stdout.splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(line))
    result = {"path": str(path), "env": "TINY=1" if tiny else "COMPILE=1 ONLY_FWD=1", "rc": rc,
              "wall_s": round(time.perf_counter() - started, 1), "results": lines}  # fmt: skip
    if rc not in (0,):
        result["stderr_tail"] = stderr_tail
    log(f"anchor: rc {rc}, {len(lines)} results in {result['wall_s']} s")
    return result


def setup_django(work_dir: Path) -> None:
    """Settings only (no database is touched): InstantID asks the configured face embedder for its width."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "alkemy.settings")
    os.environ.setdefault("SECRET_KEY", "bench-only-secret-key")  # settings refuse to start without one
    os.environ["ALKEMY_DATA_DIR"] = str(work_dir / "data")
    # The ID encoders are built for 512-d ArcFace input; name that embedder (its files are never loaded here).
    os.environ["ALKEMY_FACE_EMBEDDER"] = "arcface_antelopev2"
    import django

    django.setup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (only with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, 2 steps, 64x64: a smoke run of the code path")
    parser.add_argument("--only", choices=["flux", "sdxl"], help="one family only")
    parser.add_argument("--modes", default=None, help="comma list of eager,compiled (default: both; tiny: eager)")
    parser.add_argument("--images", type=int, default=None, help="timed images per configuration (default 2; tiny 1)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 1024; tiny 64)")
    parser.add_argument("--flux-steps", type=int, default=None, help="default 28; tiny 2")
    parser.add_argument("--sdxl-steps", type=int, default=None, help="default 30; tiny 2")
    parser.add_argument("--weights", choices=["memory", "disk"], default="memory", help="see the module docstring")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the model folders go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the written model folders")
    parser.add_argument("--anchor", type=Path, default=ROOT.parent / "shared" / "tools" / "gpu_anchor.py")
    parser.add_argument("--no-anchor", action="store_true")
    parser.add_argument("--anchor-timeout", type=int, default=300)
    parser.add_argument(
        "--cpu-threads", type=int, default=1, help="torch threads with --device cpu (1 is steadier on a shared box)"
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    args.modes = [m for m in (args.modes or ("eager" if args.tiny else "eager,compiled")).split(",") if m]
    args.images = args.images or (1 if args.tiny else 2)
    args.size = args.size or (64 if args.tiny else 1024)
    args.flux_steps = args.flux_steps or (2 if args.tiny else 28)
    args.sdxl_steps = args.sdxl_steps or (2 if args.tiny else 30)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        message = (
            f"CUDA is not available (torch {torch.__version__}, host {platform.node()}): the full-size benchmark "
            "needs an NVIDIA GPU. For a CPU smoke run of the same code path use: --device cpu --tiny"
        )
        print(message, file=sys.stderr)
        print(json.dumps({"benchmark": "gpu_methods", "error": message}))
        sys.exit(2)
    if not args.tiny and not args.device.startswith("cuda"):
        sys.exit("full-size models on a CPU would take hours; use --tiny with --device cpu")

    import diffusers

    if not args.device.startswith("cuda") and args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
        os.environ["OMP_NUM_THREADS"] = str(args.cpu_threads)  # the anchor subprocess too
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="alkemy-gpu-methods-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    setup_django(work_dir)
    warnings.filterwarnings("ignore", message="invalid value encountered in cast")  # random weights: NaN pixels

    result: dict = {
        "benchmark": "gpu_methods",
        "date": time.strftime("%Y-%m-%d"),
        "mode": "tiny" if args.tiny else "full",
        "device": torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda,
        "config": {
            "dtype": str(dtype).removeprefix("torch."),
            "size": args.size,
            "flux_steps": args.flux_steps,
            "sdxl_steps": args.sdxl_steps,
            "timed_images": args.images,
            "warmup_images": 1,
            "modes": args.modes,
            "weights": args.weights,
            "flux_guidance": 3.5,
            "sdxl_guidance": 5.0,
            "face_embedding_dims": FACE_EMBEDDING_DIMS,
        },  # fmt: skip
        "goals": GOALS,
        "reference_h200_stock": REFERENCE_H200,
    }
    families = [args.only] if args.only else ["flux", "sdxl"]
    try:
        result["anchor"] = run_anchor(None if args.no_anchor else args.anchor.resolve(), args.tiny, args.anchor_timeout)
        sizes = tiny_sizes() if args.tiny else full_sizes()
        builder = Builder(work_dir / "models", sizes, args.device, dtype, args.weights)
        result["build"] = builder.write_all(families)
        for family in families:
            result[family] = {}
            for mode in args.modes:
                configs = flux_configs if family == "flux" else sdxl_configs
                result[family][mode] = configs(builder, args, compiled=mode == "compiled")
        result["goals_met"] = goals_met(result)
    finally:
        if not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
    result["wall_s"] = round(time.monotonic() - _started, 1)
    text = json.dumps(result, indent=2)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
