"""The model families as every layer sees them, registered in MODEL_INITIALIZER under InternEvo's model_type
names (MODEL_INITIALIZER imports this module at its first lookup).

A ModelSpec bundles a family's model (pytrain.model.families.Family: parameter names, attention kind and
with it the tensor-parallel plan pytrain.parallel applies, fields, InternEvo's defaults) with its checkpoint
adapters: the Hugging Face class its weights map to (pytrain.checkpoint.hf; None: none) and how its
InternEvo checkpoint files name its parameters (pytrain.checkpoint.internlm). It lives above the model and
checkpoint packages because it knows both, and the model package must know neither checkpoint formats nor
parallelism; the checkpoint adapters find a model's spec by its family's name in MODEL_INITIALIZER.

A spec is a model builder: spec(**fields) builds the plain model, and its signature is the family's fields
with their defaults, which is what the config checks a file's model section against. A new dense family
that fits the decoder is one `register(ModelSpec(Family(...), hf=...))` (README's "Adding a family").
"""

import inspect
from dataclasses import dataclass

from pytrain.checkpoint import hf
from pytrain.checkpoint.hf import HFClass
from pytrain.checkpoint.internlm import INTERNEVO, InternEvoAdapter
from pytrain.model import families
from pytrain.model.decoder import Decoder
from pytrain.model.families import Family
from pytrain.registry import MODEL_INITIALIZER


@dataclass(frozen=True)
class ModelSpec:
    """A family with its checkpoint adapters (the module docstring); called, it builds the plain model."""

    family: Family
    hf: HFClass | None = None
    internevo: InternEvoAdapter = INTERNEVO
    aliases: tuple[str, ...] = ()  # other model_type names it is registered under

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def __signature__(self) -> inspect.Signature:
        return self.family.signature

    def __call__(self, **fields) -> Decoder:
        return self.family.build(**fields)


def register(spec: ModelSpec) -> ModelSpec:
    """Registers the spec in MODEL_INITIALIZER under its family's name and its aliases."""
    for name in (spec.name, *spec.aliases):
        MODEL_INITIALIZER.register_module(module_name=name, module=spec)
    return spec


for spec in (
    ModelSpec(families.INTERNLM, hf=hf.LLAMA),
    ModelSpec(families.INTERNLM2, hf=hf.LLAMA, aliases=("INTERNLM2_PUBLIC",)),
    ModelSpec(families.LLAMA2, hf=hf.LLAMA, aliases=("LLAMA",)),
    ModelSpec(families.QWEN2, hf=hf.QWEN2),
    ModelSpec(families.INTERNLM_MOE, hf=hf.MIXTRAL),
    ModelSpec(families.MIXTRAL_MOE, hf=hf.MIXTRAL),
    ModelSpec(families.QWEN2_MOE, hf=hf.QWEN2_MOE),
    ModelSpec(families.QWEN3, hf=hf.QWEN3),
    ModelSpec(families.QWEN3_MOE, hf=hf.QWEN3_MOE),
    ModelSpec(families.GEMMA, hf=hf.GEMMA),
    ModelSpec(families.INTERNLM3, hf=hf.INTERNLM3),
    ModelSpec(families.BAICHUAN2, hf=hf.BAICHUAN2),
):
    register(spec)
