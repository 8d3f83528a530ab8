"""Running a method for a character: the synchronous core the job system and `manage.py generate` share."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from django.conf import settings
from PIL import Image

from alkemy.errors import AlkemyError
from characters.faces import resolve_embedder_name
from characters.models import Character
from generation.identity import IdentityScore, score_images
from generation.methods import method_class
from generation.methods.base import GenerationMethod, GenerationRequest, LoadOptions, StepCallback
from generation.references import character_identity, reference_faces


@dataclass
class GeneratedOutput:
    image: Image.Image
    seed: int
    score: IdentityScore


def load_method(method: str, *, models_dir: Path | None = None, options: LoadOptions | None = None) -> GenerationMethod:
    try:
        cls = method_class(method)
    except KeyError as exc:
        raise AlkemyError(str(exc.args[0]), code="unknown_method", field="method") from None
    return cls.load(Path(models_dir or settings.ALKEMY_MODELS_DIR), options or LoadOptions.for_device())


def generate_for_character(
    *,
    character: Character,
    method: GenerationMethod,
    request: GenerationRequest,
    on_step: StepCallback | None = None,
    needs_references: bool = True,
) -> list[GeneratedOutput]:
    """Generate `request.num_images` images, one seed each (seed, seed+1, ...), each identity-scored.

    Images are generated one at a time so that every output is reproducible from its own seed;
    `on_step` sees the steps of all images as one sequence. What the method meters (tokens,
    images) is added up in `request.usage`. A method that carries the identity in its weights
    (a LoRA) runs without reference photos; its outputs are scored when the character has an
    identity, else they say `no_identity`.
    """
    embedder = resolve_embedder_name()  # scores the outputs
    try:
        # PuLID and InstantID get the references in their weights' embedding space (embedding_space_mismatch if none)
        space = getattr(method, "embedding_space", None)  # stand-ins for a method may lack the attributes
        faces = reference_faces(character=character, embedder=space or embedder, method=getattr(method, "key", ""))
    except AlkemyError:
        if needs_references:
            raise
        faces = []
    try:
        identity = character_identity(character=character, embedder=embedder)
    except AlkemyError:
        identity = None
    count = request.num_images
    outputs: list[GeneratedOutput] = []
    for index in range(count):
        single = replace(request, references=faces, seed=request.seed + index, num_images=1, usage={})

        def step_of_all(step: int, total: int, index: int = index) -> None:
            if on_step is not None:
                on_step(index * total + step, count * total)

        try:
            image = method.generate(single, step_of_all)[0]
        finally:  # a request that failed may still have been billed (a blocked reply): keep its usage
            for meter, quantity in single.usage.items():
                if isinstance(quantity, int | float):
                    request.usage[meter] = request.usage.get(meter, 0) + quantity
                else:  # a label of what was metered (e.g. Gemini's `model`), the same for every image
                    request.usage[meter] = quantity
        if identity is None:
            score = IdentityScore(None, "no_identity")
        else:
            score = score_images([image], identity=identity, embedder=embedder)[0]
        outputs.append(GeneratedOutput(image=image, seed=single.seed, score=score))
    return outputs
