"""Class names -> prompts -> token ids, truncated to the longest prompt."""

from typing import Mapping, Optional, Sequence

import open_clip
import torch

DEFAULT_TEMPLATE = "a medical image showing {}."


def class_prompts(
    class_names: Sequence[str], template: str = DEFAULT_TEMPLATE, descriptions: Optional[Mapping[str, str]] = None
) -> list:
    """One prompt per class: ``template.format(description or name)``.

    Args:
        class_names: the K class names, in label order.
        template: a format string with one ``{}``, e.g. ``"a chest X-ray showing {}."``.
        descriptions: optional class name -> longer description used in its place.

    Example:
        >>> class_prompts(["normal lungs", "pneumonia"], "a chest X-ray showing {}.")
        ['a chest X-ray showing normal lungs.', 'a chest X-ray showing pneumonia.']
    """
    if isinstance(class_names, str) or len(class_names) == 0:
        raise ValueError(f"class_names must be a non-empty list of class names; got {class_names!r}")
    if template.count("{}") != 1:
        raise ValueError(f"the prompt template must contain exactly one '{{}}'; got {template!r}")
    descriptions = descriptions or {}
    unknown = sorted(set(descriptions) - set(class_names))
    if unknown:
        raise ValueError(f"descriptions name classes that do not exist: {unknown}; classes are {list(class_names)}")
    return [template.format(descriptions.get(name, name)) for name in class_names]


def tokenize_prompts(prompts: Sequence[str], model: str = "ViT-B-16", context_length: int = 77) -> torch.Tensor:
    """Token ids (K, n) for K prompts, n = the longest prompt (with its end token).

    The text towers are causal, so the tokens after a prompt's end token never
    change its feature: cutting the padding to the longest prompt is exact and
    saves up to 77/n of the text tower's work.
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of strings; got {prompts!r}")
    empty = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if empty:
        raise ValueError(f"prompts at positions {empty} are empty or not strings")
    name = model if isinstance(model, str) and model in open_clip.list_models() else "ViT-B-16"
    tokenizer = open_clip.get_tokenizer(name, context_length=context_length)
    tokens = tokenizer(list(prompts))
    n = int((tokens != 0).sum(dim=1).max())
    return tokens[:, :n].contiguous()
